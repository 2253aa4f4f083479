"""One source example -> the token arrays of its task, with its counts.

How a task lays out its tokens is written once, as a function of the ids, and used by
training (the callables below) and by inference over a trained run (train/run/workdir.py):

  lm_tokens              BOS text, text EOS (inputs and next-token targets)
  instruct_tokens        lm_tokens of prompt + response, weighted 0 on the prompt's targets
                         (inference: lm_tokens of the prompt, the same row without the response)
  chat_row               a conversation through its chat template (train/data/chat.py), weighted
                         1 on the assistant turns' targets only
  seq2seq_tokens         source EOS; decoder start + target; target EOS
  classification_tokens  BOS text EOS [pair EOS], padded (classify, and mlm before masking)

The callables here run inside grain maps (in worker processes too, so they pickle).
Examples to drop (blank text, over-long pairs with overlong="drop") come back with
their counts set and empty or zero-weight arrays; `packing.DropFlagged` removes them.

Counts: what happened to each example on its way to a batch. Every example carries a "counts"
vector (one int a name of `COUNTS`) from tokenization to the batch, so the counts survive
worker processes and iterator checkpoints. This module imports no grain, so inference code
that lays out tokens (train.generate) loads without it.
"""

import dataclasses
import json

import numpy as np

from models.errors import InputError
from train.data import chat as conversations
from train.data.tokenizers import Tokenizer


COUNTS = ("examples", "empty", "invalid_utf8", "truncated", "split",
          "dropped_long", "truncated_tokens")
DROPPED = np.array([name in ("empty", "dropped_long") for name in COUNTS])


def new_counts() -> np.ndarray:
  """The counts of one example just read."""
  counts = np.zeros(len(COUNTS), np.int64)
  counts[COUNTS.index("examples")] = 1
  return counts


@dataclasses.dataclass(frozen=True)
class LM:
  """{"text"} -> {"inputs": BOS + ids, "targets": ids + EOS, "counts"}."""

  tokenizer: Tokenizer
  seq_len: int
  overlong: str
  text_key: str

  def __call__(self, example) -> dict[str, np.ndarray]:
    counts = new_counts()
    ids = _encode(self.tokenizer, example, self.text_key, counts)
    if not ids:
      return {"inputs": _NONE, "targets": _NONE, "counts": counts}
    inputs, targets = lm_tokens(self.tokenizer, ids)
    return _fit({"inputs": inputs, "targets": targets}, self.seq_len, self.overlong, counts)


@dataclasses.dataclass(frozen=True)
class Instruct:
  """{"prompt", "response"} -> {"inputs", "targets", "weights": `instruct_tokens`, "counts"}."""

  tokenizer: Tokenizer
  seq_len: int
  overlong: str
  prompt_key: str
  response_key: str

  def __call__(self, example) -> dict[str, np.ndarray]:
    counts = new_counts()
    prompt = _encode(self.tokenizer, example, self.prompt_key, counts)
    response = _encode(self.tokenizer, example, self.response_key, counts)
    if not prompt or not response:  # Counted as empty by _encode.
      return {"inputs": _NONE, "targets": _NONE, "weights": _NO_WEIGHTS, "counts": counts}
    row = dict(zip(("inputs", "targets", "weights"),
                   instruct_tokens(self.tokenizer, prompt, response)))
    return _fit(row, self.seq_len, self.overlong, counts)


@dataclasses.dataclass(frozen=True)
class Chat:
  """{"messages": JSON} -> {"inputs", "targets", "weights": `chat_row`, "counts"}."""

  tokenizer: Tokenizer
  template: conversations.Template
  seq_len: int
  overlong: str
  messages_key: str = "messages"

  def __call__(self, example) -> dict[str, np.ndarray]:
    counts = new_counts()
    messages = conversations.check_messages(json.loads(example[self.messages_key]))
    row = dict(zip(("inputs", "targets", "weights"),
                   chat_row(self.tokenizer, self.template, messages)))
    return _fit(row, self.seq_len, self.overlong, counts)


def _fit(row: dict[str, np.ndarray], seq_len: int, overlong: str,
         counts: np.ndarray) -> dict[str, np.ndarray]:
  """An lm row over `seq_len` truncated (overlong="truncate") or counted as to be split."""
  size = len(row["inputs"])
  if size > seq_len:
    if overlong == "truncate":
      counts[COUNTS.index("truncated")] = 1
      counts[COUNTS.index("truncated_tokens")] = size - seq_len
      row = {key: value[:seq_len] for key, value in row.items()}
    else:
      counts[COUNTS.index("split")] = 1
  return {**row, "counts": counts}


@dataclasses.dataclass(frozen=True)
class Seq2Seq:
  """{"inputs", "targets"} -> `seq2seq_tokens` of the pair."""

  input_tokenizer: Tokenizer
  target_tokenizer: Tokenizer
  inputs_len: int
  targets_len: int
  overlong: str
  inputs_key: str
  targets_key: str
  decoder_start_id: int | None = None

  def __call__(self, example) -> dict[str, np.ndarray]:
    counts = new_counts()
    source = _encode(self.input_tokenizer, example, self.inputs_key, counts)
    target = _encode(self.target_tokenizer, example, self.targets_key, counts)
    dropped = {"encoder_tokens": _NONE, "decoder_inputs": _NONE,
               "decoder_targets": _NONE, "counts": counts}
    if not source or not target:  # Counted as empty by _encode.
      return dropped
    tokens, excess = seq2seq_tokens(
        self.input_tokenizer, self.target_tokenizer, source, target,
        inputs_len=self.inputs_len, targets_len=self.targets_len,
        decoder_start_id=self.decoder_start_id)
    if excess and self.overlong == "drop":
      counts[COUNTS.index("dropped_long")] = 1
      return dropped
    if excess:
      counts[COUNTS.index("truncated")] = 1
      counts[COUNTS.index("truncated_tokens")] = excess
    return {**tokens, "counts": counts}


@dataclasses.dataclass(frozen=True)
class Classification:
  """{"text", "label"} (+ the pair) -> `classification_tokens`, the label and a weight."""

  tokenizer: Tokenizer
  seq_len: int
  text_key: str
  pair_key: str | None
  label_key: str | None
  label_dtype: type

  def __call__(self, example) -> dict[str, np.ndarray]:
    counts = new_counts()
    first = _encode(self.tokenizer, example, self.text_key, counts)
    has_pair = self.pair_key is not None and self.pair_key in example
    second = (_encode(self.tokenizer, example, self.pair_key, counts)
              if has_pair else None)
    label = (self.label_dtype(0) if self.label_key is None
             else _label(example, self.label_key, self.label_dtype))
    if not first or (has_pair and not second):  # Counted as empty by _encode.
      row = _padded_row(self.tokenizer, self.seq_len, [], [])
      return {**row, "label": label, "weights": np.float32(0.0), "counts": counts}
    row, cut = classification_tokens(self.tokenizer, self.seq_len, first, second)
    if cut:
      counts[COUNTS.index("truncated")] = 1
      counts[COUNTS.index("truncated_tokens")] = cut
    return {**row, "label": label, "weights": np.float32(1.0), "counts": counts}


@dataclasses.dataclass(frozen=True)
class MLM:
  """A padded single-text row with BERT's 80/10/10 masking of `mask_rate`."""

  row: Classification
  mask_rate: float

  def __call__(self, example, rng: np.random.Generator) -> dict[str, np.ndarray]:
    row = self.row(example)
    tokens = row.pop("tokens")
    del row["label"], row["weights"]
    candidates = np.flatnonzero(row["padding_mask"])[1:-1]  # Not BOS/EOS.
    chosen = rng.choice(candidates, _num_masked(len(candidates), self.mask_rate),
                        replace=False)
    kind = rng.random(len(chosen))
    masked = tokens.copy()
    masked[chosen[kind < 0.8]] = self.row.tokenizer.mask_id
    replaced = chosen[(kind >= 0.8) & (kind < 0.9)]
    masked[replaced] = rng.integers(0, self.row.tokenizer.vocab_size, len(replaced))
    weights = np.zeros(tokens.shape, np.float32)
    weights[chosen] = 1.0
    return {**row, "tokens": masked, "targets": tokens, "weights": weights}


def lm_tokens(tokenizer: Tokenizer, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets) of a text's ids: BOS + ids, and the next tokens ids + EOS."""
  bos, eos = bos_eos(tokenizer)
  return _ids([bos] + ids), _ids(ids + [eos])


def instruct_tokens(tokenizer: Tokenizer, prompt: list[int], response: list[int]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(inputs, targets, weights): `lm_tokens` of prompt + response, each target weighted 0 where
  it is a prompt token, 1 where it is a response token or the EOS."""
  inputs, targets = lm_tokens(tokenizer, prompt + response)
  weights = np.concatenate([np.zeros(len(prompt), np.float32),
                            np.ones(len(response) + 1, np.float32)])
  return inputs, targets, weights


def chat_row(tokenizer: Tokenizer, template: conversations.Template, messages: list[dict]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(inputs, targets, weights) of a conversation: its rendered tokens but the last, those but
  the first, and 1 where the target is a token of an assistant turn."""
  if not hasattr(tokenizer, "encoding"):
    raise InputError(f"task='chat' needs a Hugging Face tokenizer (data.tokenizer='pretrained'),"
                     f" not {type(tokenizer).__name__}.")
  ids, mask = conversations.chat_tokens(tokenizer, template, messages)
  return ids[:-1], ids[1:], mask[1:].astype(np.float32)


def chat(data) -> bool:
  """Whether a run's `config.data` reads chat conversations (a local chat dataset)."""
  return data.source.startswith("local:") and data.source_options.get("task") == "chat"


def instruct(data) -> bool:
  """Whether a run's `config.data` reads prompt -> response pairs (a local instruct dataset),
  whose rows `instruct_tokens` lays out and whose answers are the response alone."""
  return data.source.startswith("local:") and data.source_options.get("task") == "instruct"


def seq2seq_tokens(input_tokenizer: Tokenizer, target_tokenizer: Tokenizer,
                   source: list[int], target: list[int], *, inputs_len: int,
                   targets_len: int, decoder_start_id: int | None = None
                   ) -> tuple[dict[str, np.ndarray], int]:
  """({"encoder_tokens": source + EOS, "decoder_inputs": start + target (the targets
  shifted right), "decoder_targets": target + EOS}, each cut to its length; tokens cut).

  The decoder starts from `decoder_start_id`, by default the target tokenizer's BOS (its
  EOS where it has none); train/run/run_tokenizers.py's `decoder_start_id` picks a run's.
  """
  _, source_eos = bos_eos(input_tokenizer)
  bos, eos = bos_eos(target_tokenizer)
  start = bos if decoder_start_id is None else decoder_start_id
  encoder, decoder_inputs, decoder_targets = (
      _ids(source + [source_eos]), _ids([start] + target), _ids(target + [eos]))
  excess = (max(0, len(encoder) - inputs_len)
            + max(0, len(decoder_inputs) - targets_len))
  return {"encoder_tokens": encoder[:inputs_len],
          "decoder_inputs": decoder_inputs[:targets_len],
          "decoder_targets": decoder_targets[:targets_len]}, excess


def classification_tokens(tokenizer: Tokenizer, seq_len: int, first: list[int],
                          second: list[int] | None = None
                          ) -> tuple[dict[str, np.ndarray], int]:
  """({"tokens": BOS first EOS [second EOS] padded to seq_len, "padding_mask",
  "token_types": 0 on the first text, 1 on the pair}, tokens cut), the longer text cut first."""
  has_pair = bool(second)
  first, second = list(first), list(second or [])
  budget = seq_len - 2 - has_pair
  cut = max(0, len(first) + len(second) - budget)
  while len(first) + len(second) > budget:
    longer = first if len(first) >= len(second) else second
    longer.pop()
  bos, eos = bos_eos(tokenizer)
  return _padded_row(tokenizer, seq_len, [bos] + first + [eos],
                     second + [eos] if has_pair else []), cut


def _padded_row(tokenizer: Tokenizer, seq_len: int, first: list[int],
                second: list[int]) -> dict[str, np.ndarray]:
  tokens = np.full(seq_len, tokenizer.pad_id, np.int32)
  tokens[:len(first) + len(second)] = first + second
  token_types = np.zeros(seq_len, np.int32)
  token_types[len(first):len(first) + len(second)] = 1
  padding_mask = np.arange(seq_len) < len(first) + len(second)
  return {"tokens": tokens, "padding_mask": padding_mask, "token_types": token_types}


def _num_masked(num_tokens: int, mask_rate: float) -> int:
  return min(num_tokens, max(1, round(num_tokens * mask_rate)))


_NONE = np.zeros(0, np.int32)
_NO_WEIGHTS = np.zeros(0, np.float32)


def _ids(ids: list[int]) -> np.ndarray:
  return np.asarray(ids, np.int32)


def bos_eos(tokenizer: Tokenizer) -> tuple[int, int]:
  """BOS (EOS where the vocabulary has none, as GPT-2) and EOS."""
  if tokenizer.eos_id is None:
    raise InputError(f"{type(tokenizer).__name__} has no end-of-sequence token; "
                     "use a tokenizer with </s>, [SEP] or <|endoftext|>.")
  bos = tokenizer.eos_id if tokenizer.bos_id is None else tokenizer.bos_id
  return bos, tokenizer.eos_id


def _encode(tokenizer: Tokenizer, example, key: str, counts: np.ndarray) -> list[int]:
  """Ids of `example[key]`; blank text counts as `empty` and gives []."""
  try:
    text = example[key]
  except (KeyError, IndexError, TypeError):
    fields = sorted(example) if hasattr(example, "keys") else repr(example)
    raise InputError(
        f"an example has fields {fields} but the pipeline reads {key!r}: give the "
        "source canonical field names (see train/data/sources.py) or pass the "
        "pipeline's *_key argument.") from None
  if isinstance(text, bytes):
    try:
      text = text.decode("utf-8")
    except UnicodeDecodeError:
      counts[COUNTS.index("invalid_utf8")] = 1
      text = text.decode("utf-8", errors="replace")
  if not isinstance(text, str):
    raise InputError(f"field {key!r} holds {type(text).__name__}, not text.")
  ids = tokenizer.encode(text) if text.strip() else []
  if not ids:
    counts[COUNTS.index("empty")] = 1
  return list(ids)


def _label(example, key: str, dtype: type) -> np.number:
  value = example.get(key) if hasattr(example, "get") else None
  if value is None or not np.isscalar(value):
    raise InputError(f"an example has no {key!r} field (got {value!r}); "
                     "classification needs one, an integer (or a float for "
                     "regression with label_dtype='float32').")
  if dtype is np.int32 and value != int(value):
    raise InputError(f"label {value!r} is not an integer: for regression (e.g. "
                     "glue/stsb) pass label_dtype='float32'.")
  return dtype(value)
