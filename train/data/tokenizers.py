"""Tokenizers behind one small interface: bytes, SentencePiece, `tokenizers` files.

Every tokenizer has `encode(text) -> list[int]` (no special tokens added: the
pipelines add BOS/EOS themselves), `decode(ids) -> str` (drops a leading BOS,
stops at the first EOS, skips padding and other specials), `vocab_size`, and the
special ids `pad_id`, `bos_id`, `eos_id`, `unk_id`, `mask_id` (None where the
vocabulary has no such token).

  bytes          UTF-8 bytes shifted past 4 specials; needs no file.
  sentencepiece  trained once on the training split, cached as `<path>` (a
                 `.model` file) and loaded on later runs (as the Flax WMT example).
  pretrained     a Hugging Face `tokenizer.json`, or a BERT `vocab.txt` (WordPiece,
                 cased as the tokenizer_config.json beside it says; lowercased without
                 one, as BERT), or a folder holding one of them; for fine-tuning. Beside a
                 tokenizer.json, tokenizer_config.json names the special tokens and
                 generation_config.json the ids that end a generation (`stop_ids`).
  word / char    a `tokenizers` WordLevel vocabulary trained on the training split
                 (words split on whitespace, or single characters), cached as JSON.

`make_tokenizer(kind, path=..., texts=..., vocab_size=...)` picks one from a config.
A missing or corrupt file gives one `TokenizerError` naming the file and the fix.
"""

import abc
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence

import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from models.errors import InputError

Texts = Callable[[], Iterable[str]]  # Called only when a vocabulary must be trained.


class TokenizerError(InputError):
  """A tokenizer file is missing, unreadable or does not match the request."""


class Tokenizer(abc.ABC):
  """Text <-> ids. Subclasses set the special ids in `__init__`."""

  pad_id: int
  bos_id: int | None
  eos_id: int | None
  unk_id: int | None = None
  mask_id: int | None = None

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids, specials included."""

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Ids of `text`, without BOS/EOS."""

  @abc.abstractmethod
  def _decode_plain(self, ids: list[int]) -> str:
    """Text of ids that hold no BOS/EOS/padding."""

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """The ids that end a generation: the EOS (or what a generation_config.json lists)."""
    return () if self.eos_id is None else (self.eos_id,)

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    if ids and self.bos_id is not None and ids[0] == self.bos_id:
      ids = ids[1:]
    if self.eos_id is not None and self.eos_id in ids:
      ids = ids[: ids.index(self.eos_id)]
    skip = {self.pad_id, self.bos_id, self.eos_id}
    return self._decode_plain([i for i in ids if i not in skip])


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes; ids 0-3 are pad, bos, eos, mask, byte b is id b + 4."""

  pad_id, bos_id, eos_id, mask_id = 0, 1, 2, 3
  num_specials = 4

  @property
  def vocab_size(self) -> int:
    return 256 + self.num_specials

  def encode(self, text: str) -> list[int]:
    return [b + self.num_specials for b in text.encode("utf-8")]

  def _decode_plain(self, ids: list[int]) -> str:
    data = bytes(i - self.num_specials for i in ids if i >= self.num_specials)
    return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model: pad 0, bos 1, eos 2, unk 3, `<mask>` 4."""

  def __init__(self, model_proto: bytes, source: str = "<bytes>"):
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(model_proto)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError variants.
      raise TokenizerError(
          f"{source} is not a SentencePiece model ({e}); delete it so that it is "
          "retrained, or point the config at a valid `.model` file.") from e
    self.pad_id = self._sp.pad_id()
    self.bos_id = _none_if_negative(self._sp.bos_id())
    self.eos_id = _none_if_negative(self._sp.eos_id())
    self.unk_id = _none_if_negative(self._sp.unk_id())
    self.mask_id = _none_if_negative(self._sp.PieceToId("<mask>"))
    if self.mask_id == self.unk_id:
      self.mask_id = None

  @classmethod
  def load(cls, path: str) -> "SentencePieceTokenizer":
    return cls(_read_file(path, "SentencePiece model"), source=path)

  @classmethod
  def train_or_load(cls, path: str, texts: Texts, vocab_size: int, *,
                    max_chars: int = 10**7,
                    character_coverage: float = 1.0) -> "SentencePieceTokenizer":
    """Loads `path` if it exists, else trains on `texts()` and saves it there."""
    if not os.path.exists(path):
      proto = io.BytesIO()
      try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_limit_chars(texts(), max_chars),
            model_writer=proto, vocab_size=vocab_size, model_type="unigram",
            character_coverage=character_coverage, pad_id=0, bos_id=1,
            eos_id=2, unk_id=3, user_defined_symbols=["<mask>"], minloglevel=2)
      except RuntimeError as e:  # E.g. a vocabulary larger than the text allows.
        raise TokenizerError(
            f"training the SentencePiece model {path} failed: {e}") from e
      _write_atomically(path, proto.getvalue())
    tokenizer = cls.load(path)
    if tokenizer.vocab_size != vocab_size:
      raise TokenizerError(
          f"{path} holds a SentencePiece model of {tokenizer.vocab_size} pieces, "
          f"not the {vocab_size} asked for; delete it to retrain, or ask for "
          f"vocab_size={tokenizer.vocab_size}.")
    return tokenizer

  @property
  def vocab_size(self) -> int:
    return self._sp.GetPieceSize()

  def encode(self, text: str) -> list[int]:
    return self._sp.EncodeAsIds(text)

  def _decode_plain(self, ids: list[int]) -> str:
    return self._sp.DecodeIds(ids)

  def __getstate__(self):
    return {"proto": self._sp.serialized_model_proto()}

  def __setstate__(self, state):
    self.__init__(state["proto"])


_SPECIAL_NAMES = {
    "pad_id": ("[PAD]", "<pad>"),
    "bos_id": ("[CLS]", "<s>", "<bos>", "<|endoftext|>"),
    "eos_id": ("[SEP]", "</s>", "<eos>", "<|endoftext|>"),
    "unk_id": ("[UNK]", "<unk>"),
    "mask_id": ("[MASK]", "<mask>"),
}


class HFTokenizer(Tokenizer):
  """A `tokenizers.Tokenizer`; specials as its folder names them, else by their usual names.

  `named` maps attributes (bos_id, ...) to the token a tokenizer_config.json names for it
  (None: it has none); others are found by name. BOS is the token the tokenizer's template
  (post-processor) puts before every text, where it puts one (LLaMA's <s>, Gemma's <bos>).
  BERT's [CLS]/[SEP] serve as BOS/EOS; GPT-2's <|endoftext|> as BOS, EOS and padding
  (padding is masked out, so any valid id will do). `stop_ids`: a generation_config.json's
  eos_token_id list, else the EOS.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, named: dict | None = None,
               stop_ids: Sequence[int] | None = None):
    tokenizer.no_padding()  # A saved tokenizer.json may pad or truncate (all-MiniLM-L6-v2: to
    tokenizer.no_truncation()  # 128); `encode` returns every id, the pipelines pad and cut.
    self._tokenizer = tokenizer
    named = {**(named or {}), **_template_bos(tokenizer)}
    for attribute, names in _SPECIAL_NAMES.items():
      if attribute in named and named[attribute] is None:  # The folder says it has none.
        setattr(self, attribute, None)
        continue
      ids = [tokenizer.token_to_id(n) for n in (named.get(attribute), *names) if n]
      setattr(self, attribute, next((i for i in ids if i is not None), None))
    if self.pad_id is None:
      self.pad_id = self.eos_id if self.eos_id is not None else 0
    self._stop_ids = None if stop_ids is None else tuple(stop_ids)

  @classmethod
  def from_file(cls, path: str) -> "HFTokenizer":
    """`tokenizer.json`, a WordPiece `vocab.txt`, or a folder with either (tokenizer.json first)."""
    if os.path.isdir(path):
      for name in ("tokenizer.json", "vocab.txt"):
        if os.path.exists(os.path.join(path, name)):
          return cls.from_file(os.path.join(path, name))
      raise TokenizerError(
          f"{path} holds neither tokenizer.json nor vocab.txt; copy the "
          "pretrained model's tokenizer files there.")
    text = _read_file(path, "tokenizer file").decode("utf-8", errors="replace")
    lowercase = _lowercase(path) if path.endswith(".txt") else None
    try:
      tokenizer = (_wordpiece(path, lowercase) if path.endswith(".txt")
                   else tokenizers.Tokenizer.from_str(text))
    except Exception as e:  # tokenizers raises its own Exception subclasses.
      raise TokenizerError(
          f"{path} is not a valid tokenizer file ({e}); replace it with the "
          "pretrained model's tokenizer.json or vocab.txt.") from e
    if path.endswith(".txt"):
      return cls(tokenizer)
    folder = os.path.dirname(os.path.abspath(path))
    return cls(tokenizer, _named_specials(folder), _generation_stop_ids(folder))

  @classmethod
  def train_or_load(cls, path: str, texts: Texts, *, level: str = "word",
                    vocab_size: int | None = None,
                    min_frequency: int = 1) -> "HFTokenizer":
    """WordLevel vocabulary of words (whitespace-split) or single characters."""
    if not os.path.exists(path):
      tokenizer = tokenizers.Tokenizer(models.WordLevel(unk_token="<unk>"))
      if level == "word":
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # No decoder:
        # decoding joins the words with single spaces.
      elif level == "char":
        tokenizer.pre_tokenizer = pre_tokenizers.Split(
            tokenizers.Regex(r"[\s\S]"), "isolated")
        tokenizer.decoder = decoders.Fuse()
      else:
        raise InputError(f"level={level!r}: use 'word' or 'char'.")
      trainer = trainers.WordLevelTrainer(
          vocab_size=vocab_size or 2**31 - 1, min_frequency=min_frequency,
          special_tokens=["<pad>", "<s>", "</s>", "<unk>", "<mask>"])
      tokenizer.train_from_iterator(texts(), trainer)
      _write_atomically(path, tokenizer.to_str().encode("utf-8"))
    return cls.from_file(path)

  @property
  def vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size()

  @property
  def stop_ids(self) -> tuple[int, ...]:
    return super().stop_ids if self._stop_ids is None else self._stop_ids

  def encode(self, text: str) -> list[int]:
    return self.encoding(text).ids

  def encoding(self, text: str) -> tokenizers.Encoding:
    """The `tokenizers.Encoding` of `text` (ids and character offsets), without BOS/EOS."""
    return self._tokenizer.encode(text, add_special_tokens=False)

  def _decode_plain(self, ids: list[int]) -> str:
    return self._tokenizer.decode(ids, skip_special_tokens=True)


def tokenizer_for(folder: str) -> HFTokenizer:
  """The tokenizer of a Hugging Face model folder, as transformers' save_pretrained writes it.

  Its tokenizer.json (GPT-2, BERT, T5), else its WordPiece vocab.txt, cased as the folder's
  tokenizer_config.json says.
  """
  return HFTokenizer.from_file(folder)


def make_tokenizer(kind: str, *, path: str | None = None,
                   texts: Texts | None = None, vocab_size: int | None = None) -> Tokenizer:
  """The tokenizer a config names; `texts` is called only to train one."""
  if kind == "bytes":
    return ByteTokenizer()
  if kind == "pretrained":
    return HFTokenizer.from_file(_need(path, "path", kind))
  if kind not in ("sentencepiece", "word", "char"):
    raise InputError(f"tokenizer {kind!r}: use one of bytes, sentencepiece, "
                     "pretrained, word, char.")
  path, texts = _need(path, "path", kind), _need(texts, "texts", kind)
  if kind == "sentencepiece":
    return SentencePieceTokenizer.train_or_load(
        path, texts, _need(vocab_size, "vocab_size", kind))
  return HFTokenizer.train_or_load(path, texts, level=kind, vocab_size=vocab_size)


def _wordpiece(vocab_path: str, lowercase: bool) -> tokenizers.Tokenizer:
  tokenizer = tokenizers.Tokenizer(
      models.WordPiece.from_file(vocab_path, unk_token="[UNK]"))
  tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
  tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tokenizer.decoder = decoders.WordPiece()
  if tokenizer.token_to_id("[UNK]") is None:
    raise TokenizerError(f"{vocab_path} has no [UNK] token: is it a BERT vocab.txt?")
  return tokenizer


def _template_bos(tokenizer: tokenizers.Tokenizer) -> dict:
  """{"bos_id": token} when the tokenizer's template starts every text with a special token."""
  processor = json.loads(tokenizer.to_str()).get("post_processor") or {}
  for step in processor.get("processors", [processor]):
    first = (step.get("single") or [{}])[0]
    if step.get("type") == "TemplateProcessing" and "SpecialToken" in first:
      return {"bos_id": first["SpecialToken"]["id"]}
  return {}


def _named_specials(folder: str) -> dict:
  """{attribute: token or None} of the special tokens a tokenizer_config.json names."""
  config = _json_object(os.path.join(folder, "tokenizer_config.json"), "tokenizer config")
  named = {}
  for attribute, key in (("pad_id", "pad_token"), ("bos_id", "bos_token"),
                         ("eos_id", "eos_token"), ("unk_id", "unk_token"),
                         ("mask_id", "mask_token")):
    if key in config:
      token = config[key]
      named[attribute] = token.get("content") if isinstance(token, dict) else token
  return named


def _generation_stop_ids(folder: str) -> tuple[int, ...] | None:
  """The eos_token_id (one or a list) of a generation_config.json; None without one."""
  path = os.path.join(folder, "generation_config.json")
  ids = _json_object(path, "generation config").get("eos_token_id")
  if ids is None:
    return None
  ids = [ids] if isinstance(ids, int) else ids
  if not (isinstance(ids, list) and all(isinstance(i, int) and i >= 0 for i in ids)):
    raise TokenizerError(f"{path} has eos_token_id={ids!r}; it must be an id or a list of "
                         "ids: fix or delete it.")
  return tuple(ids)


def _json_object(path: str, what: str) -> dict:
  """The JSON object in `path`; {} when there is no such file."""
  if not os.path.isfile(path):
    return {}
  try:
    value = json.loads(_read_file(path, what))
  except ValueError as e:
    raise TokenizerError(f"{path} is not readable JSON ({e}); fix or delete it.") from e
  if not isinstance(value, dict):
    raise TokenizerError(f"{path} holds {type(value).__name__}, not a JSON object of {what} "
                         "settings; fix or delete it.")
  return value


def _lowercase(vocab_path: str) -> bool:
  """`do_lower_case` of the tokenizer_config.json beside a vocab.txt (BERT's True without one)."""
  config = os.path.join(os.path.dirname(os.path.abspath(vocab_path)), "tokenizer_config.json")
  if not os.path.isfile(config):
    return True
  try:
    return bool(json.loads(_read_file(config, "tokenizer config")).get("do_lower_case", True))
  except (ValueError, AttributeError) as e:  # Not JSON, or JSON but not an object.
    raise TokenizerError(
        f"{config} is not a JSON object of tokenizer settings ({e}); fix or delete it.") from e


def _need(value, name: str, kind: str):
  if value is None:
    raise InputError(f"tokenizer {kind!r} needs `{name}`.")
  return value


def _none_if_negative(i: int) -> int | None:
  return None if i < 0 else i


def _read_file(path: str, what: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise TokenizerError(
        f"cannot read {what} {path} ({e.strerror}); check the path, or delete "
        "the config's tokenizer path so that it is trained again.") from e


def _write_atomically(path: str, data: bytes) -> None:
  """Writes `data` to `path` so that concurrent readers never see half a file."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-tokenizer-")
  with os.fdopen(fd, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def _limit_chars(texts: Iterable[str], max_chars: int) -> Iterable[str]:
  """The first texts holding at most `max_chars` characters, skipping blanks."""
  seen = 0
  for text in texts:
    if not text.strip():
      continue
    seen += len(text)
    if seen > max_chars:
      return
    yield text
