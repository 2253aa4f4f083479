"""From an experiment's `config.data` to tokenizers and grain pipelines.

The batch formats are those of train/data/pipeline.py. The tokenizers and the decoder's start
token are those of train/run_tokenizers.py (trained ones cached for resuming and inference).
"""

import dataclasses
import os

import jax
from jax.experimental import multihost_utils

from train import run_tokenizers
from train.data import examples, pipeline, tokenizers
from train.data.sources import get_source, prepare


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

  data_dir: str | None = None
  decoder_start_id: int | None = None  # seq2seq: run_tokenizers.decoder_start_id

  def source(self, split: str):
    return get_source(self.data.source, split, data_dir=self.data_dir,
                      **self.source_options())

  def source_options(self) -> dict:
    """The source's options: for a local dataset only the task (the rest is for preparing)."""
    options = local_options(self.task, self.data)
    return {"task": options["task"]} if self.data.source.startswith("local:") else options

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
    limit = segment_limit(d)
    if self.task == "lm":
      # A pair cut in pieces would teach later pieces of a response without their prompt.
      instruct = examples.instruct(d)
      return pipeline.lm_pipeline(source, self.input_tokenizer, seq_len=d.seq_len, pack=pack,
                                  max_segments_per_row=limit,
                                  instruct=instruct,
                                  overlong="truncate" if instruct else "split", **common)
    if self.task == "seq2seq":
      return pipeline.seq2seq_pipeline(source, self.input_tokenizer, self.target_tokenizer,
                                       inputs_len=d.inputs_len, targets_len=d.targets_len,
                                       pack=pack, max_segments_per_row=limit,
                                       decoder_start_id=self.decoder_start_id,
                                       **common)
    if self.task == "classify":
      return pipeline.classification_pipeline(source, self.input_tokenizer, seq_len=d.seq_len,
                                              **common)
    return pipeline.mlm_pipeline(source, self.input_tokenizer, seq_len=d.seq_len,
                                 mask_rate=d.mask_rate, **common)


def max_segments_per_row(config) -> int | None:
  """The most segments a row of the train batches' segment ids holds (grain's packing writes
  ids 1, ..., k with k at most this; one a row unpacked), or None where packing sets no limit.
  """
  if config.task not in ("lm", "seq2seq"):
    return None
  if not config.data.pack:
    return 1
  return segment_limit(config.data) or None


def segment_limit(data) -> int:
  """data.max_segments_per_row; 0 (no limit) for runs saved before the key existed."""
  return data.get("max_segments_per_row", 0)


LOCAL_TASKS = {"lm": "lm", "mlm": "lm", "seq2seq": "seq2seq", "classify": "classification"}


def local_options(task: str, data) -> dict:
  """data.source_options; for a local dataset its `task` defaults to the experiment's."""
  options = dict(data.source_options)
  if data.source.startswith("local:"):
    options.setdefault("task", LOCAL_TASKS[task])
  return options


def make_inputs(config, workdir: str) -> Inputs:
  """Builds (or loads the cached) tokenizers of `config.data` for `config.task`.

  A local dataset (`local:PATH`) is prepared first, once, under data.data_dir (default
  WORKDIR/data); preparing again reuses it while the files are unchanged.
  """
  data = config.data
  data_dir = data.data_dir or None
  if data.source.startswith("local:"):
    data_dir = data_dir or os.path.join(workdir, "data")
    if jax.process_index() == 0:
      prepare(data.source, data_dir=data_dir, **local_options(config.task, data))
    multihost_utils.sync_global_devices("tapete: local dataset prepared")
  inputs = Inputs(config.task, data, config.seed, None, None, data_dir)

  def texts(fields):
    def read():
      source = inputs.source(data.train_split)
      count = min(len(source), data.tokenizer_train_examples)
      return (source[i][field] for i in range(count) for field in fields)
    return read

  inputs.input_tokenizer, inputs.target_tokenizer = run_tokenizers.make_tokenizers(
      config, workdir, texts)
  if config.task == "seq2seq":
    inputs.decoder_start_id = run_tokenizers.decoder_start_id(config, inputs.target_tokenizer)
  return inputs


