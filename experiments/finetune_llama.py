"""A LLaMA-family model fine-tuned with LoRA: continued on your text, or taught to answer.

  python -m train --config=experiments/finetune_llama.py --workdir=/tmp/finetune_llama \\
      --config.init_from=hf:/path/to/llama --config.data.source=local:/path/to/texts
  python -m train --config=experiments/finetune_llama.py:instruct --workdir=/tmp/llama_sft \\
      --config.init_from=hf:/path/to/llama --config.data.source=local:/path/to/pairs.jsonl
  python -m train --config=experiments/finetune_llama.py:chat --workdir=/tmp/llama_chat \\
      --config.init_from=hf:/path/to/llama-instruct --config.data.source=local:/path/to/chats.jsonl

The folder is a Hugging Face llama, mistral, qwen2 or gemma checkpoint (config.json,
model.safetensors, tokenizer.json as transformers' save_pretrained writes them); its tokenizer,
its BOS (none for Qwen2: the EOS starts a row) and its generation_config.json EOS list are used.
Without a variant the model continues local text, one document a line (.txt), or a folder of
train/validation files (train/data/local.py); by default Shakespeare's speeches, one a line.
`:instruct` reads prompt -> response pairs, one {"prompt": ..., "response": ...} object a line
of a JSONL file (data.source_options.task="instruct"): each row is BOS + prompt + response +
EOS, and the loss falls on the response and its EOS only; `python -m train.generate` then
answers a prompt with a response. `:chat` reads conversations, one {"messages": [{"role":
"system"|"user"|"assistant", "content": ...}, ...]} object a line (data.source_options.task=
"chat"), rendered by the folder's own chat template (its tokenizer_config.json's or
chat_template.jinja; another with data.source_options.chat_template=PATH) and learned on the
assistant turns only (train/data/chat.py); by default 36 short conversations in Portuguese and
English. Rank-16 adapters on the four attention projections (the
rest frozen), bf16 compute, AdamW (0.9, 0.95), peak 2e-4 with 50 warmup steps and cosine
decay, 512-token rows of 16, 1,000 steps.

Tiny variants (a tiny random LLaMA built locally with transformers, the bundled text or 40
questions about capitals or the 36 conversations through a LLaMA-2 style template, seconds on
a CPU):
  python -m train --config=experiments/finetune_llama.py:tiny --workdir=/tmp/llama_tiny
  python -m train --config=experiments/finetune_llama.py:tiny,instruct --workdir=/tmp/sft_tiny
  python -m train --config=experiments/finetune_llama.py:tiny,chat --workdir=/tmp/chat_tiny
"""

from train.run.config import REPO_ROOT, base_config, parse_variant, shrink_training

VARIANTS = ("tiny", "instruct", "chat")
CONFLICTS = {("instruct", "chat"): "each reads its own data (prompt -> response pairs, or "
                                   "conversations): pick one"}


def get_config(variant: str = ""):
  v = parse_variant(variant, *VARIANTS, conflicts=CONFLICTS)
  c = base_config()
  c.task = "lm"
  c.init_from = "hf:Llama-3.2-1B"         # a local folder: pass --config.init_from=hf:FOLDER

  c.data.source = "local:asset:shakespeare_text"  # one speech a line
  c.data.tokenizer = "pretrained"         # the checkpoint folder's tokenizer.json
  c.data.seq_len = 512

  c.model.dtype = "bfloat16"

  c.lora.enabled = True
  c.lora.targets = r"self_attention/(query|key|value|out)/kernel"
  c.lora.rank = 16
  c.lora.alpha = 32.0

  c.optim.optimizer = "adamw"
  c.optim.learning_rate = 2e-4
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 50
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.95, 1e-8
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 1.0

  c.train.num_steps = 1000
  c.train.batch_size = 16
  c.train.log_every = 50
  c.train.eval_every = 250
  c.train.eval_batches = 20
  c.train.checkpoint_every = 250
  c.decode.method = "sample"
  c.decode.top_k = 40
  c.decode.max_new_tokens = 128

  if v.instruct:
    c.data.source = f"local:{REPO_ROOT / 'experiments/data/tiny_instruct.jsonl'}"
    c.data.source_options = {"task": "instruct"}  # {"prompt", "response"} a line
    c.decode.method = "greedy"

  if v.chat:
    c.data.source = f"local:{REPO_ROOT / 'experiments/data/tiny_chat.jsonl'}"
    c.data.source_options = {"task": "chat"}  # {"messages": [...]} a line
    c.decode.method = "greedy"

  if v.tiny:
    c.init_from = "hf:asset:tiny_llama"
    c.model.dtype = "float32"
    if v.chat:  # The tiny folder has no template: LLaMA-2's, with its <s> and </s>.
      c.data.source_options = {**c.data.source_options, "chat_template": str(
          REPO_ROOT / "experiments/data/llama2_chat_template.jinja")}
    elif not v.instruct:
      c.data.source = f"local:{REPO_ROOT / 'experiments/data/tiny_corpus.txt'}"
    c.data.source_options = {**c.data.source_options, "validation_fraction": 0.15,
                             "test_fraction": 0.15}
    c.data.seq_len = 128 if v.chat else 64  # a conversation: ~100 tokens at most
    shrink_training(c)
    c.optim.learning_rate = 1e-2
    c.train.num_steps = 8
    c.train.checkpoint_every = 4
    c.train.log_every = 1
    c.decode.max_new_tokens = 16
  return c
