"""From an experiment's `config.data` to tokenizers and grain pipelines.

The batch formats are those of train/data/pipeline.py. Tokenizers that are trained on the
training split (sentencepiece, word, char) are cached under `data.tokenizer_dir`, by default
`WORKDIR/tokenizers`, so that a resumed run and train.generate reuse the same vocabulary.
"""

import dataclasses
import itertools
import os

import jax

from train.data import pipeline, tokenizers
from train.data.sources import get_source

EXTENSIONS = {"sentencepiece": "model", "word": "json", "char": "json"}


@dataclasses.dataclass
class Inputs:
  """Tokenizers and pipeline factories of one experiment."""
  task: str
  data: object            # config.data
  seed: int
  input_tokenizer: tokenizers.Tokenizer
  target_tokenizer: tokenizers.Tokenizer

  @property
  def vocab_size(self) -> int:
    return max(self.input_tokenizer.vocab_size, self.target_tokenizer.vocab_size)

  def source(self, split: str):
    return get_source(self.data.source, split, data_dir=self.data.data_dir or None,
                      **dict(self.data.source_options))

  def train_pipeline(self, batch_size: int) -> pipeline.Pipeline:
    return self._pipeline(self.data.train_split, batch_size, pack=self.data.pack,
                          shuffle=True, num_epochs=None)

  def eval_pipeline(self, batch_size: int, *, pack: bool | None = None) -> pipeline.Pipeline:
    """One pass over the eval split, in order; pack=False gives one example a row."""
    return self._pipeline(self.data.eval_split, batch_size,
                          pack=self.data.pack if pack is None else pack, shuffle=False,
                          num_epochs=1)

  def _pipeline(self, split, batch_size, *, pack, shuffle, num_epochs):
    if batch_size % jax.process_count():
      raise ValueError(f"batch_size={batch_size} must divide among "
                       f"{jax.process_count()} processes.")
    common = dict(batch_size=batch_size // jax.process_count(), seed=self.seed,
                  shuffle=shuffle, num_epochs=num_epochs, num_workers=self.data.num_workers)
    source = self.source(split)
    d = self.data
    if self.task == "lm":
      return pipeline.lm_pipeline(source, self.input_tokenizer, seq_len=d.seq_len, pack=pack,
                                  **common)
    if self.task == "seq2seq":
      return pipeline.seq2seq_pipeline(source, self.input_tokenizer, self.target_tokenizer,
                                       inputs_len=d.inputs_len, targets_len=d.targets_len,
                                       pack=pack, **common)
    if self.task == "classify":
      return pipeline.classification_pipeline(source, self.input_tokenizer, seq_len=d.seq_len,
                                              **common)
    return pipeline.mlm_pipeline(source, self.input_tokenizer, seq_len=d.seq_len,
                                 mask_rate=d.mask_rate, **common)


def make_inputs(config, workdir: str) -> Inputs:
  """Builds (or loads the cached) tokenizers of `config.data` for `config.task`."""
  data = config.data
  tokenizer_dir = data.tokenizer_dir or os.path.join(workdir, "tokenizers")
  train_source = lambda: get_source(data.source, data.train_split,
                                    data_dir=data.data_dir or None,
                                    **dict(data.source_options))
  input_field, target_field = ("inputs", "targets") if config.task == "seq2seq" else (
      "text", "text")

  def texts(field):
    def read():
      source = train_source()
      count = min(len(source), data.tokenizer_train_examples)
      return (source[i][field] for i in range(count))
    return read

  def build(kind, path, field, name):
    if kind in EXTENSIONS and not path:
      path = os.path.join(tokenizer_dir, f"{name}.{EXTENSIONS[kind]}")
    return tokenizers.make_tokenizer(kind, path=path or None, texts=texts(field),
                                     vocab_size=data.vocab_size or None)

  input_tokenizer = build(data.tokenizer, data.tokenizer_path, input_field, "inputs")
  target_tokenizer = input_tokenizer
  if config.task == "seq2seq" and data.target_tokenizer:
    target_tokenizer = build(data.target_tokenizer, data.target_tokenizer_path, target_field,
                             "targets")
  return Inputs(config.task, data, config.seed, input_tokenizer, target_tokenizer)


def take(iterator, count: int):
  return list(itertools.islice(iterator, count))
