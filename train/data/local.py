"""Local files as real tfds datasets: prepared once into array_record, then read like any other.

Formats by task: UTF-8, one example a line, no header, no quoting; in JSONL other keys are
ignored and documents may hold newlines.
  lm              .txt   one document a line       .jsonl {"text"}
  seq2seq         .tsv   inputs TAB targets        .jsonl {"inputs", "targets"}
  classification  .tsv   label TAB text [TAB text_pair]
                                                   .jsonl {"label", "text"[, "text_pair"]}
  instruct                                         .jsonl {"prompt", "response"}
  chat                                             .jsonl {"messages": [{"role", "content"}]}
(instruct: prompt -> response pairs for an lm run, laid out by train/data/examples.py; chat:
conversations, checked as train/data/chat.py says and kept as their JSON.)
Labels that are all non-negative integers are the class ids; otherwise the labels are class
names, in sorted order.

PATH is one file, split into train/validation/test by seeded fractions, or a folder with
train.EXT and, optionally, validation.EXT and test.EXT.

Tables hold the same fields as columns: .csv and .parquet files, Hugging Face `datasets`
folders and folders of Parquet shards (train/data/tables.py); columns={"text": "sentence"}
maps our field names to a table's columns. A row is checked as a JSONL line is.

Bad data is an error or a counted decision, never a silent drop; the counts are returned by
`prepare` and kept in the dataset's metadata.json:
  blank lines          skipped, counted as `empty_lines`;
  invalid UTF-8        replaced by U+FFFD, counted as `invalid_utf8` (or on_invalid_utf8="error");
                       a file of which more than 1% does not decode is not text: an error;
  malformed lines      (bad JSON, a missing or empty field, a wrong number of columns) an error
                       naming file:line (or on_malformed="skip": skipped, counted as `malformed`);
  a missing file, a split left without examples, text_pair on only some lines: an error.

The dataset lives in DATA_DIR/local_STEM_HASH/TASK/1.0.0 (HASH: of the file's absolute path).
Preparing again reuses it while the files (size, mtime) and options are unchanged; otherwise
it is an error, unless overwrite=True.
"""

import collections
import hashlib
import pathlib
import re
import shutil
from typing import Any

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from models.errors import InputError, MissingInputError
from train.data import local_examples, tables

TASKS = ("lm", "seq2seq", "classification", "instruct", "chat")
SPLITS = ("train", "validation", "test")
VERSION = "1.0.0"
_EXTENSIONS = {
    "lm": (".txt", ".jsonl"),
    "seq2seq": (".tsv", ".jsonl"),
    "classification": (".tsv", ".jsonl"),
    "instruct": (".jsonl",),
    "chat": (".jsonl",),
}
_TABLE_TASKS = ("lm", "seq2seq", "classification", "instruct")  # a row's fields are columns


def prepare(
    path: str,
    *,
    task: str,
    data_dir: str | None = None,
    validation_fraction: float = 0.05,
    test_fraction: float = 0.05,
    seed: int = 0,
    on_invalid_utf8: str = "replace",
    on_malformed: str = "error",
    columns: dict[str, str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
  """Prepares the local dataset at `path` once; returns its stats (counts per decision)."""
  options = dict(
      validation_fraction=validation_fraction, test_fraction=test_fraction, seed=seed,
      on_invalid_utf8=on_invalid_utf8, on_malformed=on_malformed)
  _check_options(**options)
  files = _input_files(path, task)
  if columns is not None:
    options["columns"] = _table_columns(columns, task, files)
  version_dir = _version_dir(path, task, data_dir)
  fingerprint = {"files": _file_fingerprint(files), "options": options}
  if (version_dir / "dataset_info.json").exists():
    metadata = tfds.builder_from_directory(version_dir).info.metadata
    if metadata["fingerprint"] == fingerprint:
      logging.info("Reusing local dataset %s prepared in %s.", path, version_dir)
      return metadata["stats"]
    if not overwrite:
      raise InputError(
          f"Local dataset {path} ({task}) in {version_dir} was prepared from other files or "
          f"options ({metadata['fingerprint']}, now {fingerprint}). Prepare it again with "
          "overwrite=True (--overwrite).")
    shutil.rmtree(version_dir)
  features, plan, stats = _plan(files, task, options)
  builder = _LocalBuilder(
      name=version_dir.parent.parent.name, task=task, features=features, plan=plan,
      options=options, metadata={"fingerprint": fingerprint, "stats": stats},
      data_dir=version_dir.parent.parent.parent)
  builder.download_and_prepare(file_format="array_record")
  logging.info("Prepared local dataset %s in %s: %s", path, version_dir, stats)
  return stats


def data_source(path: str, split: str, *, task: str, data_dir: str | None = None):
  """The prepared `split` of the local dataset at `path`, as a tfds data source."""
  files = _input_files(path, task)
  version_dir = _version_dir(path, task, data_dir)
  command = prepare_command(path, task, data_dir)
  if not (version_dir / "dataset_info.json").exists():
    raise MissingInputError(
        f"Local dataset {path} ({task}) is not prepared in {version_dir}. Prepare it once "
        f"with: {command}")
  builder = tfds.builder_from_directory(version_dir)
  if builder.info.metadata["fingerprint"]["files"] != _file_fingerprint(files):
    raise InputError(
        f"Local dataset {path} changed since it was prepared in {version_dir}. Prepare it "
        f"again with: {command} --overwrite")
  if split.split("[")[0] not in builder.info.splits:
    raise InputError(
        f"Local dataset {path} has no split {split!r}; it has {list(builder.info.splits)}.")
  return builder.as_data_source(split)


def prepare_command(path: str, task: str, data_dir: str | None) -> str:
  """The shell command that prepares the local dataset at `path`."""
  return (f"python -m train.data.sources local:{path} --task={task} "
          f"--data_dir={_data_dir(data_dir)}")


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A tfds builder for local files, set up per instance (tfds' AdhocBuilder needs TensorFlow)."""

  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, name, task, features, plan, options, metadata, data_dir):
    self.name = name
    config = tfds.core.BuilderConfig(name=task, version=VERSION)
    self.BUILDER_CONFIGS = [config]  # pylint: disable=invalid-name
    self._task = task
    self._features = features
    self._plan = plan
    self._options = options
    self._metadata = metadata
    super().__init__(data_dir=data_dir, config=config)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"Local {self._task} dataset prepared from {self._metadata['fingerprint']}.",
        features=self._features,
        metadata=tfds.core.MetadataDict(self._metadata),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in self._plan}

  def _generate_examples(self, split):
    file, keep = self._plan[split]
    examples = local_examples.examples(file, self._task, self._options, collections.Counter())
    for index, (line_number, example) in enumerate(examples):
      if keep is None or keep[index]:
        yield line_number, example


def _plan(files, task, options):
  """Reads the files once: features, which examples go to which split, and the stats."""
  counts = collections.Counter()
  sizes, labels, pair_lines = {}, set(), {}
  for key, file in files.items():
    if isinstance(file, pathlib.Path) and file.suffix != ".parquet":
      local_examples.check_utf8(file)
    sizes[key] = 0
    for line_number, example in local_examples.examples(file, task, options, counts):
      sizes[key] += 1
      if task == "classification":
        labels.add(example["label"])
        pair_lines.setdefault("text_pair" in example, f"{file}:{line_number}")
    if sizes[key] == 0:
      raise InputError(
          f"{file} has no examples ({dict(counts)}). Add data or fix the file.")
  if len(pair_lines) == 2:
    raise InputError(
        f"Some lines have a text_pair ({pair_lines[True]}) and some do not "
        f"({pair_lines[False]}); give every line of a dataset the same fields.")
  features = {key: tfds.features.Text() for key in local_examples.text_fields(task, True in pair_lines)}
  stats = {key: counts[key] for key in ("lines", "examples", "empty_lines", "invalid_utf8",
                                        "malformed")}
  if task == "classification":
    features["label"] = _label_feature(labels)
    stats["label_names"] = features["label"].names
  if "all" in files:
    plan = _split_by_fractions(files["all"], sizes["all"], options)
  else:
    plan = {split: (file, None) for split, file in files.items()}
  stats["splits"] = {
      split: sizes.get(split) if keep is None else int(keep.sum())
      for split, (_, keep) in plan.items()}
  if counts["invalid_utf8"] or counts["malformed"] or counts["empty_lines"]:
    logging.warning("Local dataset %s: %s", list(files.values()), stats)
  return tfds.features.FeaturesDict(features), plan, stats


def _split_by_fractions(file, size, options):
  """Seeded assignment of a single file's examples to train/validation/test."""
  counts = {
      "validation": round(size * options["validation_fraction"]),
      "test": round(size * options["test_fraction"]),
  }
  for split, count in counts.items():
    if options[f"{split}_fraction"] > 0 and count == 0:
      raise InputError(
          f"{split}_fraction={options[f'{split}_fraction']} of the {size} examples in {file} "
          f"leaves {split} empty. Add data, raise the fraction, or set it to 0 for no {split} "
          "split.")
  if size - counts["validation"] - counts["test"] <= 0:
    raise InputError(f"The {size} examples in {file} leave train empty; lower the fractions.")
  order = np.random.default_rng(options["seed"]).permutation(size)
  split_ids = np.zeros(size, np.int8)
  split_ids[order[:counts["validation"]]] = 1
  split_ids[order[counts["validation"]:counts["validation"] + counts["test"]]] = 2
  return {split: (file, split_ids == i) for i, split in enumerate(SPLITS)
          if i == 0 or counts[split]}


def _table_columns(columns, task: str, files) -> dict[str, str]:
  """`columns` checked: a table's (every file is one) columns for the task's fields."""
  columns = tables.check_columns(columns, local_examples.record_fields(task), task)
  text_files = [str(file) for file in files.values() if not tables.is_table(file)]
  if text_files:
    raise InputError(
        f"columns={columns!r} names the columns of a table (.csv, .parquet, a datasets "
        f"folder), but {text_files[0]} is not one: drop columns or give a table.")
  return columns


def _label_feature(labels: set[str]) -> tfds.features.ClassLabel:
  """Class ids if every label is a non-negative integer, else the sorted names."""
  if all(re.fullmatch(r"[0-9]+", label) for label in labels):
    return tfds.features.ClassLabel(num_classes=max(int(label) for label in labels) + 1)
  return tfds.features.ClassLabel(names=sorted(labels))


def _input_files(path: str, task: str) -> dict[str, pathlib.Path]:
  """{"all": file} for one file, or {split: file} for a folder of split files."""
  if task not in TASKS:
    raise InputError(f"Local datasets have tasks {TASKS}, not {task!r}.")
  root = pathlib.Path(path).expanduser()
  extensions = _EXTENSIONS[task] + (tables.EXTENSIONS if task in _TABLE_TASKS else ())
  if root.is_file():
    if root.suffix not in extensions:
      raise InputError(f"{path}: a {task} dataset is a {' or '.join(extensions)} file.")
    return {"all": root}
  if not root.is_dir():
    raise MissingInputError(f"Local dataset {path} does not exist: give a file or a folder.")
  files = {}
  for split in SPLITS:
    found = [root / f"{split}{ext}" for ext in extensions if (root / f"{split}{ext}").is_file()]
    if len(found) > 1:
      raise InputError(f"{path} holds {found}: keep one file per split.")
    if found:
      files[split] = found[0]
  if not files and task in _TABLE_TASKS:
    files = tables.split_files(root)
  if "train" not in files and "all" not in files:
    raise MissingInputError(
        f"{path} holds no train{' or train'.join(extensions)}: a {task} dataset folder holds "
        "train.EXT and, optionally, validation.EXT and test.EXT, or is a folder of Parquet "
        "shards or one save_to_disk wrote (see train/data/tables.py).")
  return files


def _file_fingerprint(files) -> dict[str, Any]:
  return {key: tables.fingerprint(file) for key, file in files.items()}


def _data_dir(data_dir: str | None) -> pathlib.Path:
  return pathlib.Path(data_dir or tfds.core.constants.get_default_data_dir()).expanduser()


def _version_dir(path: str, task: str, data_dir: str | None) -> pathlib.Path:
  root = pathlib.Path(path).expanduser().resolve()
  stem = re.sub(r"[^a-z0-9]+", "_", root.stem.lower()).strip("_")
  digest = hashlib.sha1(str(root).encode()).hexdigest()[:8]
  return _data_dir(data_dir) / f"local_{stem}_{digest}" / task / VERSION


def _check_options(*, validation_fraction, test_fraction, seed, on_invalid_utf8, on_malformed):
  if not (0 <= validation_fraction < 1 and 0 <= test_fraction < 1
          and validation_fraction + test_fraction < 1):
    raise InputError(
        f"validation_fraction={validation_fraction} and test_fraction={test_fraction} must "
        "be in [0, 1) and sum to less than 1.")
  if not isinstance(seed, int) or seed < 0:
    raise InputError(f"seed={seed!r} must be a non-negative integer.")
  if on_invalid_utf8 not in ("replace", "error"):
    raise InputError(f"on_invalid_utf8={on_invalid_utf8!r} must be 'replace' or 'error'.")
  if on_malformed not in ("error", "skip"):
    raise InputError(f"on_malformed={on_malformed!r} must be 'error' or 'skip'.")
