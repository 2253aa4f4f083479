"""A run's tokenizers and its decoder's start token, from the config alone.

Tokenizers trained on the training split (sentencepiece, word, char) are cached as
`data.tokenizer_path` / `data.target_tokenizer_path`, by default
`data.tokenizer_dir/{inputs,targets}.EXT` (tokenizer_dir: WORKDIR/tokenizers), so that a
resumed run and inference over it (train/run/workdir.py) read the same vocabulary. A
"pretrained" tokenizer without a path is the one of the init_from=hf:FOLDER checkpoint (read from
the workdir's copy of its files once the run has made one: train/run/hf_copy.py).
"""

import os
from collections.abc import Callable, Iterable

from models import pretrained
from train.data import chat, examples, tokenizers
from train.run import hf_copy

EXTENSIONS = {"sentencepiece": "model", "word": "json", "char": "json"}
# texts(fields) -> a callable reading those fields of the training split.
TrainingTexts = Callable[[tuple[str, ...]], Callable[[], Iterable[str]]]


def make_tokenizers(data, task: str, init_from: str, workdir: str,
                    texts: TrainingTexts | None = None
                    ) -> tuple[tokenizers.Tokenizer, tokenizers.Tokenizer]:
  """(input, target) tokenizers of the config's `data` section for `task`: one, shared, unless a
  seq2seq run sets data.target_tokenizer.

  `texts` trains a tokenizer whose cached file is missing; without it (inference) a missing
  file is a TokenizerError naming the file.
  """
  tokenizer_dir = data.tokenizer_dir or os.path.join(workdir, "tokenizers")
  two_tokenizers = task == "seq2seq" and bool(data.target_tokenizer)
  input_fields = (("inputs",) if two_tokenizers else ("inputs", "targets")
                  ) if task == "seq2seq" else (
                      ("prompt", "response") if examples.instruct(data) else ("text",))

  def build(kind, path, fields, name):
    if kind in EXTENSIONS and not path:
      path = os.path.join(tokenizer_dir, f"{name}.{EXTENSIONS[kind]}")
    if kind == "pretrained" and not path and init_from.startswith("hf:"):
      path = hf_copy.folder(init_from, workdir)  # The checkpoint folder's own tokenizer.
    return tokenizers.make_tokenizer(
        kind, path=path or None, texts=texts(fields) if texts else _missing(kind, path),
        vocab_size=data.vocab_size or None)

  input_tokenizer = build(data.tokenizer, data.tokenizer_path, input_fields, "inputs")
  if not two_tokenizers:
    return input_tokenizer, input_tokenizer
  return input_tokenizer, build(data.target_tokenizer, data.target_tokenizer_path,
                                ("targets",), "targets")


def _missing(kind: str, path: str) -> Callable[[], Iterable[str]]:
  """In place of training texts: a tokenizer file that is missing is an error naming it."""
  def fail():
    raise tokenizers.TokenizerError(
        f"{path}, the run's {kind} tokenizer trained on its training split, is missing: copy "
        "it back from where the run trained (its tokenizers/ folder).")
  return fail


def chat_template(data, init_from: str, workdir: str | None = None) -> chat.Template | None:
  """A chat run's template (data.source_options.chat_template, else init_from=hf:FOLDER's) with
  the folder's special tokens; None for a run of another task."""
  if not examples.chat(data):
    return None
  folder = hf_copy.folder(init_from, workdir) if init_from.startswith("hf:") else None
  path = data.source_options.get("chat_template")
  return chat.Template(chat.read_template(folder, path), chat.special_tokens(folder))


def decoder_start_id(init_from: str, target_tokenizer: tokenizers.Tokenizer,
                     workdir: str | None = None) -> int:
  """The decoder's first input in training and decoding: the init_from=hf:FOLDER checkpoint's
  `decoder_start_token_id` (T5: its pad id, 0), else the target tokenizer's BOS (EOS where it
  has none)."""
  if init_from.startswith("hf:"):
    start = pretrained.config_json(hf_copy.folder(init_from, workdir)).get(
        "decoder_start_token_id")
    if start is not None:
      return int(start)
  return examples.bos_eos(target_tokenizer)[0]
