"""BERT base masked-LM pretraining on lm1b from tfds (or local text files).

  python -m train --config=experiments/bert_base.py --workdir=/tmp/bert_base

Post-LN, learned positions and token types, embedding LayerNorm, exact GELU, tied MLM
decoder; 15% of tokens masked (80% mask token, 10% random, 10% kept); AdamW (0.9, 0.999,
1e-6), weight decay 0.01, peak 1e-4 with 10,000 warmup steps and linear decay, 256 sequences
of 128 tokens a step. The tokenizer is a 30,522-piece SentencePiece model with a mask token.

Tiny variant (the bundled text, seconds on a CPU):
  python -m train --config=experiments/bert_base.py:tiny --workdir=/tmp/bert_tiny
"""

from train.run.config import base_config, parse_variant, shrink_to_tiny

VARIANTS = ("tiny",)


def get_config(variant: str = ""):
  v = parse_variant(variant, *VARIANTS)
  c = base_config()
  c.task = "mlm"

  c.data.source = "lm1b"
  c.data.eval_split = "test"
  c.data.tokenizer = "sentencepiece"
  c.data.vocab_size = 30_522
  c.data.seq_len = 128
  c.data.mask_rate = 0.15
  c.data.num_workers = 4

  c.model.preset = "bert_base"
  c.model.dtype = "bfloat16"

  c.optim.optimizer = "adamw"
  c.optim.learning_rate = 1e-4
  c.optim.schedule = "linear"
  c.optim.warmup_steps = 10_000
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-6
  c.optim.weight_decay = 0.01
  c.optim.clip_norm = 1.0

  c.train.num_steps = 1_000_000
  c.train.batch_size = 256
  c.train.log_every = 100
  c.train.eval_every = 10_000
  c.train.eval_batches = 100
  c.train.checkpoint_every = 10_000

  if v.tiny:
    shrink_to_tiny(c, local_data="experiments/data/tiny_corpus.txt", task="lm")
    c.data.seq_len = 64
  return c
