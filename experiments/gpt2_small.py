"""GPT-2 small language model on lm1b from tfds, or on your own text files.

  python -m train --config=experiments/gpt2_small.py --workdir=/tmp/gpt2_small
  python -m train --config=experiments/gpt2_small.py --workdir=/tmp/gpt2_mine \\
      --config.data.source=local:/path/to/texts

Pre-LN, learned positions, GELU (tanh), output tied to the token table, context 1024; AdamW
(0.9, 0.95), weight decay 0.1, peak 6e-4 with 2,000 warmup steps and cosine decay, clipping
1.0, ~0.5M tokens a step; bf16 compute and logits (softmax in float32), the vocabulary padded
to a multiple of 128, layers unrolled without remat. The tokenizer is a 32k SentencePiece
model trained on the data (~111M parameters; 124M with GPT-2's own 50,257-token BPE file,
which works too: data.tokenizer=pretrained, data.tokenizer_path=...).

Tiny variant (the bundled text, seconds on a CPU):
  python -m train --config=experiments/gpt2_small.py:tiny --workdir=/tmp/gpt2_tiny
"""

from train.run.config import base_config, parse_variant, shrink_to_tiny

VARIANTS = ("tiny",)


def get_config(variant: str = ""):
  v = parse_variant(variant, *VARIANTS)
  c = base_config()
  c.task = "lm"

  c.data.source = "lm1b"
  c.data.eval_split = "test"
  c.data.tokenizer = "sentencepiece"
  c.data.vocab_size = 32_768
  c.data.seq_len = 1024
  c.data.num_workers = 4
  # lm1b averages ~27 words a sentence (0.83B words in 30.3M sentences), ~30-40 tokens with
  # BOS/EOS, so ~30 to a 1,024-token row: 64 rarely closes a row early. Each batch's attention
  # is compiled for its own most segments a row, rounded up (train.run.inputs.BatchLayout).
  c.data.max_segments_per_row = 64

  c.model.preset = "gpt2"
  c.model.dtype = "bfloat16"
  c.model.logits_dtype = "bfloat16"   # the loss takes them as they are, softmax in float32
  c.model.vocab_pad_multiple = 128    # GPT-2's 50,257 ids -> a 50,304-row table
  c.model.dropout_rate = 0.0

  c.optim.optimizer = "adamw"
  c.optim.learning_rate = 6e-4
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 2_000
  c.optim.end_learning_rate_factor = 0.1
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.95, 1e-8
  c.optim.weight_decay = 0.1
  c.optim.clip_norm = 1.0

  c.train.num_steps = 100_000
  c.train.batch_size = 512
  c.train.log_every = 50
  c.train.eval_every = 2_000
  c.train.eval_batches = 50
  c.train.checkpoint_every = 2_000
  c.decode.method = "sample"
  c.decode.top_k = 40
  c.decode.max_new_tokens = 64

  if v.tiny:
    shrink_to_tiny(c, local_data="experiments/data/tiny_corpus.txt", task="lm")
    c.data.seq_len = 64
    c.model.logits_dtype = "float32"
    c.decode.max_new_tokens = 16
  return c
