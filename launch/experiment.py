"""An experiment file's sweep expanded into runs, every override checked against its config.

`expand("experiments/quickstart.py[:VARIANT]", root)` loads the file as `python -m train`
does (VARIANT, such as `tiny,billions`, goes to get_config unchanged), calls its `get_sweep()`
(or `get_sweep(variant)` when it takes an argument), applies each run's overrides to
`get_config(variant)` and validates the result with train/'s own checks (its `asset:NAME`
folders built first, as the run would), so that a bad key or value stops the launch before
anything starts.
"""

import copy
import dataclasses
import difflib
import inspect
import os

import ml_collections
import numpy as np

from launch import workdirs
from models.errors import InputError
from train.run import config as config_lib, experiment_file, validation
from train.run.experiment_file import get_config, load_module, split_config_arg


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a sweep: its overrides, its workdir and the config they give."""
  name: str
  overrides: dict
  workdir: str
  config: ml_collections.ConfigDict

  @property
  def num_steps(self) -> int:
    return self.config.train.num_steps


def get_sweep(module, path: str, variant: str) -> list[dict]:
  function = experiment_file.module_function(
      module, "get_sweep", "add one returning the runs' overrides, e.g. "
      "`def get_sweep(): return sweeps.axis('optim.learning_rate', [1e-3, 3e-3])` "
      "(from launch import sweeps)")
  takes_variant = bool(inspect.signature(function).parameters)
  sweep = experiment_file.call(module, "get_sweep()", function,
                               *([variant] if takes_variant else []))
  if not isinstance(sweep, (list, tuple)) or not sweep or not all(
      isinstance(run, dict) and all(isinstance(key, str) for key in run) for run in sweep):
    raise InputError(f"{path}: get_sweep() must return a non-empty list of dicts "
                     f"{{'config.key': value}}, got {sweep!r:.200}.")
  return [{key: _plain(value) for key, value in run.items()} for run in sweep]


def _plain(value):
  """numpy scalars as Python ones, so that flags and names read `0.001`, not `np.float64(...)`."""
  return value.item() if isinstance(value, np.generic) else value


def _leaf_keys(config, prefix: str = "") -> list[str]:
  keys = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      keys += _leaf_keys(value, f"{prefix}{key}.")
    else:
      keys.append(prefix + key)
  return keys


def _unknown_key(config, key: str, path: str) -> InputError:
  close = difflib.get_close_matches(key, _leaf_keys(config), n=1)
  hint = f"did you mean {close[0]!r}?" if close else (
      "the keys are those of train/run/config.py:base_config and the experiment file")
  return InputError(f"the sweep sets {key!r}, which is not a key of {path}'s config: {hint}.")


def apply_overrides(config, overrides: dict, path: str) -> ml_collections.ConfigDict:
  """A copy of `config` with `overrides` set; an unknown key or a wrong type is an error."""
  config = copy.deepcopy(config)
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise _unknown_key(config, key, path)
      node = node[part]
    if leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
      raise _unknown_key(config, key, path)
    try:
      node[leaf] = value
    except TypeError as e:
      raise InputError(f"the sweep sets {key}={value!r}, but {path}'s {key} is a "
                       f"{type(node[leaf]).__name__}: {str(e).splitlines()[0]}") from None
  return config


def expand(config_arg: str, workdir_root: str) -> list[Run]:
  """The runs of the experiment's sweep, in the sweep's order, each validated."""
  path, variant = split_config_arg(config_arg)
  module = load_module(path)
  base = get_config(module, variant)
  root = workdir_root if "://" in workdir_root else os.path.abspath(workdir_root)
  runs, seen = [], {}
  for index, overrides in enumerate(get_sweep(module, path, variant)):
    name = workdirs.run_name(overrides)
    if name in seen:
      raise InputError(f"{path}: get_sweep() lists the overrides {overrides} twice (runs "
                       f"{seen[name]} and {index}); every run needs its own.")
    seen[name] = index
    config = apply_overrides(base, overrides, path)
    try:
      validation.validate(config_lib.resolve_assets(config))
    except (ValueError, FileNotFoundError) as e:
      raise InputError(f"run {name}: {e}") from None
    runs.append(Run(name, overrides, f"{root.rstrip('/')}/{name}", config))
  return runs
