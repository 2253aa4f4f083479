"""Sources by name: random access to examples with the canonical fields of their task.

A source has `len(source)` and `source[i] -> dict`, with text as str:
  lm              {"text"}
  seq2seq         {"inputs", "targets"}
  classification  {"text", "label"}, plus "text_pair" for sentence pairs (glue/mnli, ...)
  instruct        {"prompt", "response"} (local JSONL only; an lm run learns the response)

Names:
  "wmt14_translate/de-en", any "*_translate/xx-yy"   seq2seq; source_language="en" turns
                                   the pair around (default: tfds' order, de -> en here)
  "lm1b"                           lm
  "glue/CONFIG"                    classification (stsb: float label; test labels are -1)
  "imdb_reviews"                   classification
  "local:PATH"                     a local file or folder, see `train.data.local`; needs task=
  "numbers"                        generated in memory, see `train.data.numbers`

tfds datasets are read with `tfds.data_source` from array_record files and need no
TensorFlow; they are never downloaded here. Prepare one once with
`python -m train.data.sources NAME --data_dir=DIR`.

Bytes that are not valid UTF-8 are replaced by U+FFFD, logged and counted in
`source.num_invalid_utf8` (per process).
"""

import argparse
import inspect
import json
from typing import Any, Sequence

from absl import logging
import numpy as np

from models.errors import InputError, MissingInputError
from train.data import numbers

_MAX_LOGGED = 10


class Source:
  """The examples of a tfds data source under canonical field names, text decoded to str."""

  def __init__(self, base, fields: dict[str, str], name: str):
    self._base = base
    self._fields = fields
    self.name = name
    self.num_invalid_utf8 = 0

  def __len__(self) -> int:
    return len(self._base)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._base[index]
    return {
        field: self._value(example[raw], index) for field, raw in self._fields.items()}

  def __repr__(self) -> str:
    return f"Source({self.name!r}, {len(self)} examples, fields={self._fields})"

  def _value(self, value, index):
    if isinstance(value, str):
      return value
    if isinstance(value, bytes):
      try:
        return value.decode("utf-8")
      except UnicodeDecodeError:
        self.num_invalid_utf8 += 1
        if self.num_invalid_utf8 <= _MAX_LOGGED:
          logging.warning("%s[%d]: invalid UTF-8 replaced by U+FFFD.", self.name, index)
        return value.decode("utf-8", errors="replace")
    return np.asarray(value).item()


def get_source(name: str, split: str, *, data_dir: str | None = None, **options):
  """The `split` of dataset `name` (see the module docstring) with canonical fields."""
  if name == "numbers":
    return numbers.numbers_source(split, **options)
  if name.startswith("local:"):
    from train.data import local  # tfds, imported by the sources that need it (0.2 s)
    task = _pop_task(name, options)
    _no_options(name, options)
    base = local.data_source(name[len("local:"):], split, task=task, data_dir=data_dir)
    return Source(base, {key: key for key in sorted(base.dataset_info.features)}, name)
  _check_known(name)
  builder = _tfds().builder(name, data_dir=data_dir)
  fields = _tfds_fields(name, builder, options)
  try:
    base = builder.as_data_source(split)
  except NotImplementedError as e:
    raise _not_prepared(name, builder, data_dir) from e
  return Source(base, fields, name)


def prepare(name: str, *, data_dir: str | None = None, **options) -> dict[str, Any]:
  """Prepares dataset `name` once under `data_dir` (tfds names download); returns stats."""
  if name == "numbers":
    return {}
  if name.startswith("local:"):
    from train.data import local
    task = _pop_task(name, options)
    return local.prepare(name[len("local:"):], task=task, data_dir=data_dir, **options)
  _check_known(name)
  _no_options(name, options)
  builder = _tfds().builder(name, data_dir=data_dir, file_format="array_record")
  try:
    builder.download_and_prepare()
  except ModuleNotFoundError as e:
    if e.name != "tensorflow":
      raise
    raise RuntimeError(
        f"The tfds generator of {name} needs TensorFlow. Where TensorFlow is installed, run "
        f"`tfds build {name} --file_format=array_record --data_dir={builder.data_dir_root}`, "
        "then use that data_dir here.") from e
  return {"splits": {split: info.num_examples for split, info in builder.info.splits.items()}}


def _tfds():
  """tensorflow_datasets with this module's datasets registered, imported on first use: the
  numbers and in-memory sources start 0.2 s sooner without it."""
  import tensorflow_datasets as tfds
  import tensorflow_datasets.text  # noqa: F401  (registers glue without TensorFlow)
  import tensorflow_datasets.translate  # noqa: F401  (registers the *_translate datasets)
  return tfds


def _tfds_fields(name: str, builder, options) -> dict[str, str]:
  """Canonical field -> tfds feature name for the tfds dataset `name`."""
  family = builder.name
  if family.endswith("_translate"):
    source, target = builder.info.supervised_keys
    source_language = options.pop("source_language", source)
    _no_options(name, options)
    if source_language not in (source, target):
      raise InputError(
          f"{name} translates between {source} and {target}; source_language="
          f"{source_language!r} is neither.")
    if source_language == target:
      source, target = target, source
    return {"inputs": source, "targets": target}
  _no_options(name, options)
  if family == "lm1b":
    return {"text": "text"}
  if family == "imdb_reviews":
    return {"text": "text", "label": "label"}
  text_fields = list(builder.builder_config.text_features)  # glue
  return dict(zip(("text", "text_pair"), text_fields), label="label")


def _check_known(name: str) -> None:
  family = name.split("/")[0].split(":")[0]
  if family not in ("lm1b", "imdb_reviews", "glue") and not family.endswith("_translate"):
    raise InputError(
        f"Dataset {name!r} has no canonical fields here. Known: '*_translate/xx-yy', 'lm1b', "
        "'glue/CONFIG', 'imdb_reviews', 'local:PATH', 'numbers'.")


def _not_prepared(name: str, builder, data_dir) -> Exception:
  root = builder.data_dir_root
  command = f"python -m train.data.sources {name} --data_dir={root}"
  if builder.is_prepared():
    return InputError(
        f"{name} in {builder.data_dir} is stored as {builder.info.file_format}, not as "
        "array_record, which is what is read here. Prepare it again into another "
        f"data_dir: {command}")
  return MissingInputError(
      f"{name} is not prepared in {data_dir or root}. Prepare it once (this downloads it) "
      f"with: {command}")


def option_names(name: str) -> tuple[str, ...]:
  """The keyword options the source `name` takes: local datasets' those of preparing them."""
  if name == "numbers":
    return _keywords(numbers.numbers_source)
  if name.startswith("local:"):
    from train.data import local
    return _keywords(local.prepare, "data_dir") + ("chat_template",)  # task="chat": a Jinja file
  family = name.split("/")[0].split(":")[0]
  return ("source_language",) if family.endswith("_translate") else ()


def _keywords(function, *given: str) -> tuple[str, ...]:
  return tuple(p.name for p in inspect.signature(function).parameters.values()
               if p.kind == p.KEYWORD_ONLY and p.name not in given)


def _pop_task(name: str, options: dict) -> str:
  if "task" not in options:
    from train.data import local
    raise InputError(f"{name} needs task=, one of {local.TASKS}.")
  return options.pop("task")


def _no_options(name: str, options: dict) -> None:
  if options:
    raise InputError(f"Unknown options for {name}: {sorted(options)}.")


def main(argv: Sequence[str] | None = None) -> None:
  """Prepares a dataset: python -m train.data.sources NAME [--data_dir=DIR] [--task=...]."""
  from train.data import local
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument("name", help="a tfds name (lm1b, glue/sst2, ...) or local:PATH")
  parser.add_argument("--data_dir", default=None, help="where prepared data lives")
  parser.add_argument("--task", choices=local.TASKS, help="local datasets: the task")
  parser.add_argument("--validation_fraction", type=float, help="local, one file: held out")
  parser.add_argument("--test_fraction", type=float, help="local, one file: held out")
  parser.add_argument("--seed", type=int, help="local, one file: seed of the split")
  parser.add_argument("--on_invalid_utf8", choices=("replace", "error"))
  parser.add_argument("--on_malformed", choices=("error", "skip"))
  parser.add_argument("--columns", type=json.loads,
                      help='local tables: our field -> their column, as JSON {"text": "sentence"}')
  parser.add_argument("--overwrite", action="store_true", default=None)
  args = vars(parser.parse_args(argv))
  name, data_dir = args.pop("name"), args.pop("data_dir")
  options = {key: value for key, value in args.items() if value is not None}
  print(prepare(name, data_dir=data_dir, **options))


if __name__ == "__main__":
  main()
