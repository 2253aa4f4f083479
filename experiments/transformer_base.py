"""The paper's base Transformer (Vaswani et al., 2017) on WMT14 English -> German, BLEU at eval.

  python -m train --config=experiments/transformer_base.py --workdir=/tmp/transformer_base

Needs wmt14_translate/de-en prepared as array_record (see train/data/sources.py). Post-LN,
sinusoidal positions, ReLU, one SentencePiece vocabulary shared by both sides and the output
layer, embeddings scaled by sqrt(d_model); Adam(0.9, 0.98, 1e-9) with the inverse-square-root
schedule (4,000 warmup steps), label smoothing 0.1, dropout 0.1, ~25k source + 25k target
tokens a batch, beam search 4 with length penalty 0.6.

Tiny variant (a bundled en-de file, seconds on a CPU):
  python -m train --config=experiments/transformer_base.py:tiny --workdir=/tmp/tb_tiny
"""

from train.run.config import base_config, parse_variant, shrink_to_tiny

VARIANTS = ("tiny",)


def get_config(variant: str = ""):
  v = parse_variant(variant, *VARIANTS)
  c = base_config()
  c.task = "seq2seq"
  c.label_smoothing = 0.1

  c.data.source = "wmt14_translate/de-en"
  c.data.source_options.source_language = "en"   # en -> de
  c.data.train_split = "train"
  c.data.eval_split = "validation"               # newstest2013
  c.data.tokenizer = "sentencepiece"             # shared by source and target
  c.data.vocab_size = 32_000
  c.data.tokenizer_train_examples = 1_000_000
  c.data.inputs_len = 256
  c.data.targets_len = 256
  c.data.num_workers = 4

  c.model.preset = "transformer_base"
  c.model.dtype = "bfloat16"

  c.optim.optimizer = "adamw"
  c.optim.schedule = "rsqrt"
  c.optim.learning_rate = (512 * 4000) ** -0.5   # d^-0.5 · warmup^-0.5: the paper's peak
  c.optim.warmup_steps = 4000
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.98, 1e-9
  c.optim.clip_norm = 0.0

  c.train.num_steps = 100_000
  c.train.batch_size = 96                        # rows of 256 packed tokens a side
  c.train.log_every = 100
  c.train.eval_every = 5_000
  c.train.eval_batches = 0
  c.train.checkpoint_every = 5_000
  c.decode.method = "beam"
  c.decode.beam_size = 4
  c.decode.length_penalty_alpha = 0.6
  c.decode.max_new_tokens = 256

  if v.tiny:
    shrink_to_tiny(c, local_data="experiments/data/en_de_tiny.tsv", task="seq2seq")
    c.data.inputs_len = c.data.targets_len = 48
    c.model.num_layers = 1
    c.decode.max_new_tokens = 16
  return c
