"""From an experiment's `config.data` to tokenizers and grain pipelines, and their batches to
what the model takes.

The batch formats are those of train/data/pipeline.py. The tokenizers and the decoder's start
token are those of train/run/run_tokenizers.py (trained ones cached for resuming and inference).
`BatchLayout` gives each batch the segment capacity its attention is compiled for, and the
fields the model then takes (rows of one example: no segment ids).
"""

import dataclasses
import itertools
import os
from typing import Iterator

import jax
from jax.experimental import multihost_utils
import numpy as np

from models import attention_kernels
from models.errors import InputError
from train.data import chat, examples, pipeline, tokenizers
from train.data.sources import get_source, prepare
from train.engine import parallel
from train.run import run_tokenizers


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
  chat_template: chat.Template | None = None  # task="chat"

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
      raise InputError(f"batch_size={batch_size} must divide among "
                       f"{jax.process_count()} processes.")
    common = dict(batch_size=batch_size // jax.process_count(), seed=self.seed,
                  shuffle=shuffle, num_epochs=num_epochs, num_workers=self.data.num_workers)
    source = self.source(split)
    d = self.data
    limit = max_segments_per_row(self.task, d) or 0  # 0: as many as fit
    if self.task == "lm":
      # A pair cut in pieces would teach later pieces of a response without their prompt.
      instruct = examples.instruct(d)
      weighted = instruct or self.chat_template is not None
      return pipeline.lm_pipeline(source, self.input_tokenizer, seq_len=d.seq_len, pack=pack,
                                  max_segments_per_row=limit,
                                  instruct=instruct, chat_template=self.chat_template,
                                  overlong="truncate" if weighted else "split", **common)
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


def max_segments_per_row(task: str, data) -> int | None:
  """The most segments a row of the train batches' segment ids holds (grain's packing writes
  ids 1, ..., k with k at most this; one a row unpacked), or None where packing sets no limit:
  data.max_segments_per_row, 0 (no limit) in runs saved before the key existed."""
  if task not in ("lm", "seq2seq"):
    return None
  if not data.pack:
    return 1
  return data.get("max_segments_per_row", 0) or None


# Per task, the fields that lay out packed rows: segment ids first, positions after.
LAYOUT_FIELDS = {"lm": (("segment_ids",), ("positions",)),
                 "seq2seq": (("encoder_segment_ids", "decoder_segment_ids"),
                             ("encoder_positions", "decoder_positions"))}


def local_capacity(segment_ids_BT: np.ndarray) -> int:
  """attention_kernels.segment_capacity of these rows: 1 where each row holds one example at
  its start (padding, id 0, only after it), else that of the most segments in a row (at least
  2). A RuntimeError where an id comes back after another: no kernel may be promised that."""
  ids_BT = np.asarray(segment_ids_BT)
  valid_BT = ids_BT != 0
  previous_BT = np.pad(ids_BT[:, :-1], ((0, 0), (1, 0)))
  starts_BT = valid_BT & (ids_BT != previous_BT)
  earlier_max_BT = np.pad(np.maximum.accumulate(ids_BT, axis=1)[:, :-1], ((0, 0), (1, 0)))
  if np.any(starts_BT & (ids_BT <= earlier_max_BT)):
    raise RuntimeError("A batch row has a segment id that is not above the ids before it; "
                       "grain's packing should not write that, so check the grain version.")
  runs = int(starts_BT.sum(axis=1).max(initial=0))
  one_each = runs <= 1 and not np.any(valid_BT[:, 1:] & ~valid_BT[:, :-1])
  return 1 if one_each else attention_kernels.segment_capacity(max(runs, 2))


class BatchLayout:
  """Each batch of a run with its segment capacity, as the model takes it (`__call__`).

  The capacity is the same on every process for the same step: 1 for rows of one example each,
  else a bucket of attention_kernels.segment_capacity over the most segments a row holds; None
  for tasks without segment ids (classify, mlm). The step is compiled once per capacity
  (loop.jit_train_step), so a run compiles a few programs.

  At capacity 1 (every row one example, padding after it) the batch loses its segment ids and
  positions, so the attention is plain causal self-attention (cuDNN's causal kernel, not its
  packed layout). A padding token comes after the row's tokens, so it reaches none of them, and
  it weighs 0 in the loss: the result is that of the segment ids. The bidirectional encoder of
  seq2seq gets its padding as `encoder_padding_mask` (the encoder ids' non-zeros) instead.

  One process reads the batch. Several read different rows, so they take the largest of their
  capacities (parallel.ProcessMax: one int a process a batch, exchanged host to host), except
  where the config unpacks (capacity 1, known to all). A finite pipeline (eval) goes through
  `lockstep`, whose exchange, packed or not, also tells when every process has run out.
  `name` keeps the exchanges of two layouts (train, eval) apart; each must be called on every
  process for the same batches."""

  def __init__(self, task: str, data, name: str = "train"):
    self.task, self.name = task, name
    self.packs = max_segments_per_row(task, data) != 1
    self.exchange = parallel.ProcessMax(f"segment_capacity/{name}")

  def __call__(self, batch: dict) -> tuple[int | None, dict]:
    """(capacity, the batch as the model takes it)."""
    if self.task not in LAYOUT_FIELDS:
      return None, batch
    capacity = self.local(batch)
    if self.packs:
      capacity = self.exchange(capacity)
    return capacity, self.shaped(capacity, batch)

  def lockstep(self, batches: Iterator[dict],
               limit: int = 0) -> Iterator[tuple[int | None, dict, dict]]:
    """A finite pipeline's batches (the first `limit`; 0: all), as many on every process:
    (capacity, the batch as the model takes it, the batch as read).

    Hosts read disjoint shards of the split, so one may run out of batches before another;
    until every process has, it reads empty batches instead: its first batch's shapes, all
    zeros (weights 0, segment ids 0), as the rows padding a last batch. One exchange a batch
    agrees on the capacity and on the end; a process without any batch stops them all."""
    empty = None
    for index in itertools.count():
      if limit and index >= limit:
        return
      batch = next(batches, None)
      if batch is not None:
        value = self.local(batch)
        empty = empty if empty is not None else jax.tree.map(np.zeros_like, batch)
      else:
        value = NO_BATCHES if empty is None else NO_MORE_BATCHES
      agreed = self.exchange(value)
      if agreed == NO_BATCHES:
        raise InputError(
            f"A process read no batch of the {self.name} split (its share of the examples was "
            f"empty or all dropped): use a larger split or fewer than {jax.process_count()} "
            "processes.")
      if agreed == NO_MORE_BATCHES:
        return
      capacity = agreed if self.task in LAYOUT_FIELDS else None
      batch = empty if batch is None else batch
      yield capacity, self.shaped(capacity, batch), batch

  def local(self, batch: dict) -> int:
    """This process's capacity for `batch` (1 for a task without segment ids)."""
    if self.task not in LAYOUT_FIELDS:
      return 1
    ids, _ = LAYOUT_FIELDS[self.task]
    capacity = max(local_capacity(batch[field]) for field in ids)
    if not self.packs and capacity != 1:
      raise RuntimeError(f"An unpacked batch (data.pack=False) holds rows of several segments "
                         f"(capacity {capacity}); the pipeline broke its layout.")
    return capacity

  def shaped(self, capacity: int | None, batch: dict) -> dict:
    """The batch as the model takes it at `capacity`."""
    if capacity != 1 or self.task not in LAYOUT_FIELDS:
      return batch
    ids, positions = LAYOUT_FIELDS[self.task]
    model_batch = {key: value for key, value in batch.items() if key not in ids + positions}
    if self.task == "seq2seq":
      model_batch["encoder_padding_mask"] = batch["encoder_segment_ids"] != 0
    return model_batch


# What `BatchLayout.lockstep` exchanges for a process out of batches: none at all (the largest
# int, so that every process sees it) or no more (0, below any capacity).
NO_BATCHES, NO_MORE_BATCHES = 2**31 - 1, 0


LOCAL_TASKS = {"lm": "lm", "mlm": "lm", "seq2seq": "seq2seq", "classify": "classification"}


def local_options(task: str, data) -> dict:
  """data.source_options but the chat template (run_tokenizers.chat_template); for a local
  dataset its `task` defaults to the experiment's."""
  options = dict(data.source_options)
  options.pop("chat_template", None)
  if data.source.startswith("local:"):
    options.setdefault("task", LOCAL_TASKS[task])
  return options


def make_inputs(task: str, data, seed: int, init_from: str, workdir: str) -> Inputs:
  """Builds (or loads the cached) tokenizers of the config's `data` section for `task`.

  A local dataset (`local:PATH`) is prepared first, once, under data.data_dir (default
  WORKDIR/data); preparing again reuses it while the files are unchanged.
  """
  data_dir = data.data_dir or None
  if data.source.startswith("local:"):
    data_dir = data_dir or os.path.join(workdir, "data")
    if jax.process_index() == 0:
      prepare(data.source, data_dir=data_dir, **local_options(task, data))
    multihost_utils.sync_global_devices("tapete: local dataset prepared")
  inputs = Inputs(task, data, seed, None, None, data_dir)

  def texts(fields):
    def read():
      source = inputs.source(data.train_split)
      count = min(len(source), data.tokenizer_train_examples)
      return (source[i][field] for i in range(count) for field in fields)
    return read

  inputs.input_tokenizer, inputs.target_tokenizer = run_tokenizers.make_tokenizers(
      data, task, init_from, workdir, texts)
  inputs.chat_template = run_tokenizers.chat_template(data, init_from, workdir)
  if task == "seq2seq":
    inputs.decoder_start_id = run_tokenizers.decoder_start_id(
        init_from, inputs.target_tokenizer, workdir)
  return inputs
