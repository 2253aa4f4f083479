"""A run's tokenizer as the tokenizer files of a Hugging Face folder (for train/export.py).

What each kind of data.tokenizer becomes, read back by transformers' AutoTokenizer with the
ids the run's tokenizer gives:
  pretrained     the files the run read, copied: its tokenizer.json (or BERT vocab.txt), with
                 the tokenizer_config.json, special_tokens_map.json, added_tokens.json, chat
                 template and generation_config.json (the ids that end a generation) beside it
  word, char     the run's vocabulary (a `tokenizers` file) as tokenizer.json
  bytes          a tokenizer.json mapping byte b to id b + 4, as ByteTokenizer does (a text
                 holding a special token's name, such as "</s>", is the exception: transformers
                 reads it as that token)
  sentencepiece  a unigram model (as the runs train it) as a `tokenizers` Unigram with its
                 normalizer, as transformers converts one (texts holding a special token's
                 name are the exception; unknown pieces decode as nothing, not " ⁇ "); BPE or
                 byte-fallback models are not written (NotWritten says so)
Where no tokenizer_config.json comes with the files, one is written naming the run's pad, BOS,
EOS, unknown and mask tokens.
"""

import json
import os

import tokenizers
from sentencepiece import sentencepiece_model_pb2
from tokenizers import decoders, models, normalizers, pre_tokenizers

from train.data.tokenizers import ByteTokenizer, Tokenizer
from train.run import hf_copy, run_tokenizers

# Files a Hugging Face tokenizer keeps beside its tokenizer.json or vocab.txt.
COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "chat_template.jinja", "chat_template.json", "generation_config.json")
BYTE_SPECIALS = ("<pad>", "<s>", "</s>", "<mask>")  # ByteTokenizer's ids 0-3


class NotWritten(ValueError):
  """The run's tokenizer has no Hugging Face form here."""


def tokenizer_files(data, init_from: str, workdir: str,
                    tokenizer: Tokenizer) -> dict[str, bytes]:
  """{file name: contents} of the run's input tokenizer (`tokenizer`, as the run loads it from
  the config's `data` section)."""
  kind = data.tokenizer
  if kind == "bytes":
    files = {"tokenizer.json": _byte_tokenizer().to_str().encode("utf-8")}
  elif kind == "sentencepiece":
    unigram = _unigram_tokenizer(source_file(data, init_from, workdir))
    files = {"tokenizer.json": unigram.to_str().encode("utf-8")}
  else:
    files = _copied(source_file(data, init_from, workdir))
  if "tokenizer_config.json" not in files:
    files["tokenizer_config.json"] = json.dumps(_named_specials(files, tokenizer),
                                                indent=2).encode("utf-8")
  return files


def source_file(data, init_from: str, workdir: str) -> str:
  """The tokenizer file or folder that run_tokenizers.make_tokenizers reads for the inputs."""
  if data.tokenizer_path:
    return data.tokenizer_path
  if data.tokenizer == "pretrained":
    return hf_copy.folder(init_from, workdir)
  return os.path.join(data.tokenizer_dir or os.path.join(workdir, "tokenizers"),
                      f"inputs.{run_tokenizers.EXTENSIONS[data.tokenizer]}")


def _copied(path: str) -> dict[str, bytes]:
  """A tokenizer file (or a folder's tokenizer.json, else vocab.txt) and its companions."""
  if os.path.isdir(path):
    names = [n for n in ("tokenizer.json", "vocab.txt") if os.path.isfile(os.path.join(path, n))]
    folder, file = path, os.path.join(path, (names or ["tokenizer.json"])[0])
  else:
    folder, file = os.path.dirname(os.path.abspath(path)), path
  name = "vocab.txt" if file.endswith(".txt") else "tokenizer.json"
  files = {name: _read(file)}
  for companion in COMPANIONS:
    if os.path.isfile(os.path.join(folder, companion)):
      files[companion] = _read(os.path.join(folder, companion))
  return files


def _read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _named_specials(files: dict[str, bytes], tokenizer: Tokenizer) -> dict:
  """A tokenizer_config.json naming the special tokens the run's tokenizer found."""
  if "tokenizer.json" not in files:  # A vocab.txt alone: BERT's, lowercased as the run read it.
    return {"tokenizer_class": "BertTokenizer", "do_lower_case": True}
  table = tokenizers.Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast"}
  for key, i in (("pad_token", tokenizer.pad_id), ("bos_token", tokenizer.bos_id),
                 ("eos_token", tokenizer.eos_id), ("unk_token", tokenizer.unk_id),
                 ("mask_token", tokenizer.mask_id)):
    if i is not None and table.id_to_token(i) is not None:
      config[key] = table.id_to_token(i)
  return config


def _byte_chars() -> list[str]:
  """The character that byte-level BPE (GPT-2, tokenizers' ByteLevel) writes for each byte."""
  printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)}
  chars, moved = [], 0
  for b in range(256):
    chars.append(chr(b) if b in printable else chr(256 + moved))
    moved += b not in printable
  return chars


def _byte_tokenizer() -> tokenizers.Tokenizer:
  """ByteTokenizer as a `tokenizers` BPE without merges: the specials, then byte b at b + 4."""
  vocab = {token: i for i, token in enumerate(BYTE_SPECIALS)}
  vocab.update({char: b + ByteTokenizer.num_specials for b, char in enumerate(_byte_chars())})
  tokenizer = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.add_special_tokens(list(BYTE_SPECIALS))
  return tokenizer


def _unigram_tokenizer(path: str) -> tokenizers.Tokenizer:
  """A unigram SentencePiece model as a `tokenizers` Unigram: its pieces and scores, its
  normalizer (the precompiled character map, then extra whitespace removed) and its "▁"."""
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(_read(path))
  trainer, spec = proto.trainer_spec, proto.normalizer_spec
  if trainer.model_type != trainer.UNIGRAM or trainer.byte_fallback:
    raise NotWritten(f"the run's SentencePiece model {path} is not written: only unigram models "
                     "without byte fallback (as the runs train them) have a tokenizer.json form "
                     "here. Ship the .model file with the folder and encode with sentencepiece.")
  tokenizer = tokenizers.Tokenizer(models.Unigram(
      [(piece.piece, piece.score) for piece in proto.pieces], trainer.unk_id, False))
  steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
  if spec.remove_extra_whitespaces:
    steps += [normalizers.Strip(), normalizers.Replace(tokenizers.Regex(" {2,}"), " ")]
  tokenizer.normalizer = normalizers.Sequence(steps)
  prefix = "always" if spec.add_dummy_prefix else "never"
  tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=prefix,
                                                     split=trainer.split_by_whitespace)
  tokenizer.decoder = decoders.Metaspace(prepend_scheme=prefix, split=trainer.split_by_whitespace)
  tokenizer.add_special_tokens([piece.piece for piece in proto.pieces if piece.type in (
      piece.UNKNOWN, piece.CONTROL, piece.USER_DEFINED)])
  return tokenizer
