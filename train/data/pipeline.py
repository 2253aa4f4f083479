"""grain input pipelines: shard by host, shuffle, tokenize, pack or pad, batch.

A *source* is any random-access sequence of dicts (a list, `tfds.data_source`, a
`grain.MapDataset`) with the canonical fields of its task: LM {"text"}, or {"prompt",
"response"} with instruct=True; seq2seq {"inputs", "targets"}; classification {"text",
"label"} (+ "text_pair").

Each `*_pipeline(source, tokenizer, ...)` returns a `Pipeline`; `iter(pipeline)`
gives a `BatchIterator` of host-local numpy batches (B = batch_size):

  LM (`lm_pipeline`), examples packed several to a row (or one a row, pack=False):
    inputs       int32   [B, T]  BOS + the example's tokens
    targets      int32   [B, T]  the example's tokens + EOS (the next token)
    segment_ids  int32   [B, T]  1, 2, ... for the examples of a row; 0 = padding
    positions    int32   [B, T]  0, 1, ... restarting at each example
    weights      float32 [B, T]  1 on real targets, 0 on padding
  With instruct=True an example is BOS + prompt + response (inputs) and prompt + response +
  EOS (targets), and the weights are 0 on the prompt's targets too: only the response and
  its EOS are learned (`examples.instruct_tokens`; the weights are packed with the tokens).
  Each example holds its own inputs and targets, so no target crosses a boundary;
  models mask attention with `segment_ids` (equal ids attend) and causality. Rows of one
  example (pack=False, or a batch that packing left so) keep their ids and positions here;
  the training loop leaves them out for the model (train.run.inputs.BatchLayout), whose
  attention is then plain causal attention.
  seq2seq (`seq2seq_pipeline`), packed the same way on both sides:
    encoder_tokens, encoder_segment_ids, encoder_positions        int32 [B, S]
    decoder_inputs (decoder start, BOS by default, + target tokens: targets shifted right),
    decoder_targets (target tokens + EOS), decoder_segment_ids,
    decoder_positions                                             int32 [B, T]
    weights                                                       float32 [B, T]
  classification (`classification_pipeline`), one example a row:
    tokens       int32   [B, T]  BOS text EOS (text_pair EOS), e.g. [CLS] a [SEP] b [SEP]
    padding_mask bool    [B, T]  True on tokens
    token_types  int32   [B, T]  0 on the first text, 1 on the pair
    label        int32   [B]     (float32 with label_dtype="float32", e.g. glue/stsb)
    weights      float32 [B]     1 for examples, 0 for rows padding a final batch
  masked LM (`mlm_pipeline`), one example a row, BERT masking (80% mask id, 10%
  random id, 10% unchanged) of `mask_rate` of the tokens:
    tokens (masked), padding_mask, token_types as for classification; targets int32
    [B, T] (the original tokens); weights float32 [B, T] (1 where masked)

A finite pipeline (num_epochs set) pads its last batch with all-zero rows (weights
0), so every batch has the same shape. Hosts read disjoint shards of the source
(`process_index::process_count`); each epoch is shuffled anew from `seed`. A host's
finite pipeline may so end a batch before another's: train.run.inputs.BatchLayout.lockstep
gives the hosts as many batches each (all-zero ones after the end).

Nothing is dropped silently: `BatchIterator.counts` holds, for the examples behind
the batches returned so far, `examples` read, `empty` (blank text: dropped),
`invalid_utf8` (bytes decoded with replacement characters), `truncated`, `split`
(over-long LM examples cut into several), `dropped_long` (over-long seq2seq pairs,
overlong="drop") and `truncated_tokens`; train/engine/loop.py logs them (metrics.jsonl and a
line whenever examples were lost or cut). (`Pipeline.dataset`,
the grain dataset itself, yields these per row as an extra "counts" [B, 7].)

`get_state()` / `set_state()` (JSON-able, counts included; save it in the orbax
checkpoint, e.g. with `ocp.args.JsonSave`) make a resumed run see exactly the
batches it would have seen, given the same source, arguments and `num_workers`.
`num_workers > 0` tokenizes and packs in that many processes (grain
`mp_prefetch`); the batches then come in another, still deterministic, order.
"""

import functools
from typing import Any

from absl import flags
import grain
import jax
import numpy as np

from models.errors import InputError
from train.data import examples, packing
from train.data.tokenizers import Tokenizer


class Pipeline:
  """A grain dataset of batches; iterate it for a fresh `BatchIterator`."""

  def __init__(self, dataset: grain.IterDataset):
    self.dataset = dataset

  def __iter__(self) -> "BatchIterator":
    return BatchIterator(iter(self.dataset))


class BatchIterator:
  """Batches, the counts behind them, and a JSON-able state to resume from."""

  def __init__(self, iterator: grain.DatasetIterator):
    self._iterator = iterator
    self._counts = np.zeros(len(examples.COUNTS), np.int64)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    self._counts += batch.pop("counts").sum(axis=0)
    return batch

  @property
  def counts(self) -> dict[str, int]:
    return dict(zip(examples.COUNTS, self._counts.tolist()))

  def get_state(self) -> dict[str, Any]:
    return {"grain": self._iterator.get_state(), "counts": self.counts}

  def set_state(self, state: dict[str, Any]) -> None:
    self._iterator.set_state(state["grain"])
    self._counts = np.array([state["counts"][k] for k in examples.COUNTS], np.int64)

  def close(self) -> None:
    self._iterator.close()


def lm_pipeline(source, tokenizer: Tokenizer, *, batch_size: int, seq_len: int,
                pack: bool = True, overlong: str = "split",
                num_packing_bins: int | None = None, max_segments_per_row: int = 0,
                text_key: str = "text",
                instruct: bool = False, prompt_key: str = "prompt",
                response_key: str = "response", chat_template=None, seed: int = 0,
                shuffle: bool = True,
                num_epochs: int | None = None, process_index: int | None = None,
                process_count: int | None = None, num_workers: int = 0) -> Pipeline:
  """Language modelling batches; over-long examples `overlong`="split"|"truncate";
  `instruct`: prompt -> response pairs, learned on the response only; `chat_template` (a
  train.data.chat.Template): {"messages"} conversations, learned on the assistant turns only;
  packed rows hold at most `max_segments_per_row` examples (0 = as many as fit)."""
  _check_choice("overlong", overlong, ("split", "truncate"))
  _check_positive(batch_size=batch_size, seq_len=seq_len)
  _check_not_negative(max_segments_per_row=max_segments_per_row)
  examples.bos_eos(tokenizer)
  weighted = instruct or chat_template is not None
  if chat_template is not None:
    tokenize = examples.Chat(tokenizer, chat_template, seq_len, overlong)
  elif instruct:
    tokenize = examples.Instruct(tokenizer, seq_len, overlong, prompt_key, response_key)
  else:
    tokenize = examples.LM(tokenizer, seq_len, overlong, text_key)
  lengths = {"inputs": seq_len, "targets": seq_len}
  pad_id = {"inputs": tokenizer.pad_id, "targets": tokenizer.pad_id}
  if weighted:
    lengths["weights"], pad_id["weights"] = seq_len, 0

  def after_tokenize(ds):
    if overlong == "split":
      ds = grain.experimental.FlatMapIterDataset(ds, packing.SplitLong(seq_len))
    ds = packing.DropFlagged(ds)
    return packing.pack(ds, lengths,
                        {"inputs": "inputs", "targets": "targets",
                         "segment_ids": "inputs_segment_ids",
                         "positions": "inputs_positions"},
                        weights_from="weights" if weighted else "targets_segment_ids",
                        pad_id=pad_id, batch_size=batch_size,
                        num_packing_bins=num_packing_bins, pack=pack,
                        max_segments_per_row=max_segments_per_row)

  return _pipeline(source, tokenize, after_tokenize, batch_size=batch_size, seed=seed,
                   shuffle=shuffle, num_epochs=num_epochs, process_index=process_index,
                   process_count=process_count, num_workers=num_workers)


def seq2seq_pipeline(source, input_tokenizer: Tokenizer,
                     target_tokenizer: Tokenizer | None = None, *, batch_size: int,
                     inputs_len: int, targets_len: int, pack: bool = True,
                     overlong: str = "truncate", num_packing_bins: int | None = None,
                     max_segments_per_row: int = 0,
                     inputs_key: str = "inputs", targets_key: str = "targets",
                     decoder_start_id: int | None = None, seed: int = 0, shuffle: bool = True,
                     num_epochs: int | None = None, process_index: int | None = None,
                     process_count: int | None = None,
                     num_workers: int = 0) -> Pipeline:
  """Encoder-decoder batches; over-long pairs `overlong`="truncate"|"drop"; the decoder
  inputs start from `decoder_start_id` (default: the target tokenizer's BOS, else EOS);
  packed rows hold at most `max_segments_per_row` pairs (0 = as many as fit)."""
  _check_choice("overlong", overlong, ("truncate", "drop"))
  _check_positive(batch_size=batch_size, inputs_len=inputs_len,
                  targets_len=targets_len)
  _check_not_negative(max_segments_per_row=max_segments_per_row)
  target_tokenizer = target_tokenizer or input_tokenizer
  examples.bos_eos(input_tokenizer), examples.bos_eos(target_tokenizer)
  tokenize = examples.Seq2Seq(input_tokenizer, target_tokenizer, inputs_len,
                              targets_len, overlong, inputs_key, targets_key,
                              decoder_start_id)

  def after_tokenize(ds):
    return packing.pack(
        packing.DropFlagged(ds),
        {"encoder_tokens": inputs_len, "decoder_inputs": targets_len,
         "decoder_targets": targets_len},
        {"encoder_tokens": "encoder_tokens",
         "encoder_segment_ids": "encoder_tokens_segment_ids",
         "encoder_positions": "encoder_tokens_positions",
         "decoder_inputs": "decoder_inputs", "decoder_targets": "decoder_targets",
         "decoder_segment_ids": "decoder_targets_segment_ids",
         "decoder_positions": "decoder_targets_positions"},
        weights_from="decoder_targets_segment_ids",
        pad_id={"encoder_tokens": input_tokenizer.pad_id,
                "decoder_inputs": target_tokenizer.pad_id,
                "decoder_targets": target_tokenizer.pad_id},
        batch_size=batch_size, num_packing_bins=num_packing_bins, pack=pack,
        max_segments_per_row=max_segments_per_row)

  return _pipeline(source, tokenize, after_tokenize, batch_size=batch_size, seed=seed,
                   shuffle=shuffle, num_epochs=num_epochs, process_index=process_index,
                   process_count=process_count, num_workers=num_workers)


def classification_pipeline(source, tokenizer: Tokenizer, *, batch_size: int,
                            seq_len: int, text_key: str = "text",
                            pair_key: str = "text_pair", label_key: str = "label",
                            label_dtype: str = "int32", seed: int = 0,
                            shuffle: bool = True, num_epochs: int | None = None,
                            process_index: int | None = None,
                            process_count: int | None = None,
                            num_workers: int = 0) -> Pipeline:
  """Single-text or text-pair classification (or regression: label_dtype="float32")."""
  _check_positive(batch_size=batch_size, seq_len=seq_len)
  _check_choice("label_dtype", label_dtype, ("int32", "float32"))
  examples.bos_eos(tokenizer)
  tokenize = examples.Classification(tokenizer, seq_len, text_key, pair_key,
                                     label_key, np.dtype(label_dtype).type)
  return _pipeline(source, tokenize, packing.DropFlagged, batch_size=batch_size,
                   seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                   process_index=process_index, process_count=process_count,
                   num_workers=num_workers)


def mlm_pipeline(source, tokenizer: Tokenizer, *, batch_size: int, seq_len: int,
                 mask_rate: float = 0.15, text_key: str = "text", seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 num_workers: int = 0) -> Pipeline:
  """BERT masked-LM batches, masks drawn from `seed` and the example's index."""
  _check_positive(batch_size=batch_size, seq_len=seq_len)
  examples.bos_eos(tokenizer)
  if tokenizer.mask_id is None:
    raise InputError("masked LM needs a tokenizer with a mask token ([MASK] or "
                     "<mask>); this one has none.")
  if not 0 < mask_rate < 1:
    raise InputError(f"mask_rate={mask_rate} must be between 0 and 1.")
  tokenize = examples.MLM(examples.Classification(tokenizer, seq_len, text_key,
                                                  None, None, np.int32), mask_rate)
  return _pipeline(source, tokenize, packing.DropFlagged, batch_size=batch_size,
                   seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                   process_index=process_index, process_count=process_count,
                   num_workers=num_workers, random=True)


# Threads that read and tokenize ahead, in order. grain's default (16 threads, 500 elements)
# scans its whole buffer at every element: on 2 cores, 100 batches of the quickstart took 3.7 s
# with it and 2.05 s with these, transformer_base's (HF tokenizer) 1.89 s and 1.29 s. More
# parallelism comes from worker processes (config.data.num_workers).
READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=64)


def _pipeline(source, tokenize, after_tokenize, *, batch_size: int, seed: int,
              shuffle: bool, num_epochs: int | None, process_index: int | None,
              process_count: int | None, num_workers: int,
              random: bool = False) -> Pipeline:
  """Shard, shuffle, repeat, tokenize; `after_tokenize`; batch; workers."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in "
                     f"[0, process_count={process_count}).")
  if num_workers < 0:
    raise InputError(f"num_workers={num_workers}: use 0 (no worker processes) or more.")
  if num_epochs is not None and num_epochs <= 0:
    raise InputError(f"num_epochs={num_epochs}: use a positive number, or None "
                     "to repeat forever.")
  if len(source) == 0:
    raise InputError("the source has no examples: is the split empty, or the "
                     "data not prepared?")
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if len(ds) == 0:
    raise InputError(f"process {process_index} of {process_count} gets no "
                     f"examples from a source of {len(source)}: use a larger "
                     "split or fewer processes.")
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  ds = ds.random_map(tokenize, seed=seed) if random else ds.map(tokenize)
  ds = after_tokenize(ds.to_iter_dataset(READ_OPTIONS))
  ds = ds.batch(batch_size, batch_fn=functools.partial(
      grain.experimental.batch_and_pad, batch_size=batch_size))
  if num_workers:
    if not flags.FLAGS.is_parsed():  # grain reads absl flags (google/grain#1355).
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return Pipeline(ds)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise InputError(f"{name}={value!r}: choose one of {allowed}.")


def _check_positive(**values: int) -> None:
  for name, value in values.items():
    if value <= 0:
      raise InputError(f"{name}={value} must be positive.")


def _check_not_negative(**values: int) -> None:
  for name, value in values.items():
    if value < 0:
      raise InputError(f"{name}={value} must be 0 (no limit) or more.")
