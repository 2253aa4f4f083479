"""GPT-2 trained further on your text: a Hugging Face GPT-2 folder, continued on local files.

  python -m train --config=experiments/finetune_gpt2.py --workdir=/tmp/finetune_gpt2 \\
      --config.init_from=hf:/path/to/gpt2 --config.data.source=local:/path/to/texts

The folder holds config.json, model.safetensors and tokenizer.json as transformers'
save_pretrained writes them (any GPT-2 size); its tokenizer and vocabulary are used as they are.
The text is one document a line (.txt), or a folder of train/validation files
(train/data/local.py); by default, the speeches of Shakespeare's plays, one a line
(train/assets/shakespeare.py, built when the run starts). AdamW (0.9, 0.95), peak 1e-4 with 100 warmup steps and
cosine decay, 256-token rows of 16, dropout 0.1, 2,000 steps. `--config.lora.enabled=True`
trains rank-8 adapters on the attention projections instead of every weight.

Tiny variant (a tiny random GPT-2 checkpoint built locally, the bundled text, seconds on a CPU):
  python -m train --config=experiments/finetune_gpt2.py:tiny --workdir=/tmp/finetune_gpt2_tiny
"""

from train.run.config import REPO_ROOT, base_config, parse_variant, shrink_training

VARIANTS = ("tiny",)


def get_config(variant: str = ""):
  v = parse_variant(variant, *VARIANTS)
  c = base_config()
  c.task = "lm"
  c.init_from = "hf:gpt2"                 # a local folder: pass --config.init_from=hf:FOLDER

  c.data.source = "local:asset:shakespeare_text"  # one speech a line
  c.data.tokenizer = "pretrained"         # the checkpoint folder's tokenizer.json
  c.data.seq_len = 256

  c.model.dropout_rate = 0.1
  c.lora.targets = r"self_attention/(query|value|out)/kernel"

  c.optim.optimizer = "adamw"
  c.optim.learning_rate = 1e-4
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 100
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.95, 1e-8
  c.optim.weight_decay = 0.01
  c.optim.clip_norm = 1.0

  c.train.num_steps = 2000
  c.train.batch_size = 16
  c.train.log_every = 50
  c.train.eval_every = 500
  c.train.eval_batches = 20
  c.train.checkpoint_every = 500
  c.decode.method = "sample"
  c.decode.top_k = 40
  c.decode.max_new_tokens = 64

  if v.tiny:
    c.model.dropout_rate = c.model.attention_dropout_rate = c.model.ffn_dropout_rate = 0.0
    c.init_from = "hf:asset:tiny_gpt2"
    c.data.source = f"local:{REPO_ROOT / 'experiments/data/tiny_corpus.txt'}"
    c.data.source_options = {"validation_fraction": 0.15, "test_fraction": 0.15}
    c.data.seq_len = 64
    shrink_training(c)
    c.decode.max_new_tokens = 16
  return c
