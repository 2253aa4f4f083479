"""An experiment file (`--config=experiments/NAME.py[:VARIANT]`) loaded into its config.

`python -m train` and `launch.sweep` load it the same way: VARIANT (such as `tiny,billions`)
goes to `get_config` unchanged. A file that cannot give a config (missing, not valid Python,
without `get_config`, raising while it is imported or in `get_config`) is an
ExperimentFileError naming the file, and the line where it went wrong.
"""

import importlib.util
import os
import traceback
from collections.abc import Callable

import ml_collections

from models.errors import InputError


class ExperimentFileError(InputError):
  """An experiment file that cannot give its config (or its sweep)."""


def split_config_arg(config_arg: str) -> tuple[str, str]:
  """("experiments/NAME.py", "VARIANT") of --config=experiments/NAME.py[:VARIANT]."""
  path, _, variant = config_arg.partition(":")
  return path, variant


def load(config_arg: str) -> ml_collections.ConfigDict:
  """The config of --config=PATH[:VARIANT]."""
  path, variant = split_config_arg(config_arg)
  return get_config(load_module(path), variant)


def load_module(path: str):
  """The experiment file at `path`, imported (not added to sys.modules)."""
  if not os.path.isfile(path):
    raise ExperimentFileError(f"--config={path}: no such file; pass an experiment file such as "
                              "experiments/quickstart.py.")
  name = "tapete_experiment_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  call(module, "importing it", spec.loader.exec_module, module)
  return module


def get_config(module, variant: str) -> ml_collections.ConfigDict:
  """The experiment's config, called as ml_collections' config flags call it."""
  function = module_function(module, "get_config",
                             "define get_config() returning the run's ConfigDict, as "
                             "experiments/quickstart.py does")
  config = call(module, "get_config()", function, *([variant] if variant else []))
  if not isinstance(config, ml_collections.ConfigDict):
    raise ExperimentFileError(f"--config={module.__file__}: get_config() returned "
                              f"{type(config).__name__}, not an ml_collections.ConfigDict; "
                              "start it from train.run.config.base_config().")
  return config


def module_function(module, name: str, fix: str) -> Callable:
  """The function `name` of the experiment file; its absence is an error saying `fix`."""
  function = getattr(module, name, None)
  if not callable(function):
    raise ExperimentFileError(f"--config={module.__file__} has no {name}(): {fix}.")
  return function


def call(module, what: str, function: Callable, *args):
  """function(*args); what it raises becomes an ExperimentFileError naming the file, `what`
  and the line (a ValueError's message, from tapete's config helpers, is kept as it is)."""
  try:
    return function(*args)
  except SyntaxError as e:
    same_file = e.filename and os.path.abspath(e.filename) == module.__file__
    where = f"line {e.lineno}" if same_file else f"{e.filename}, line {e.lineno}"
    raise ExperimentFileError(f"--config={module.__file__}: {where} is not valid Python "
                              f"({e.msg}); fix that line.") from e
  except ValueError as e:  # tapete's config helpers say what is wrong (a variant, a value)
    raise ExperimentFileError(f"--config={module.__file__}: {e}") from e
  except Exception as e:  # noqa: BLE001  (a user's file may raise anything)
    frame, line = list(traceback.walk_tb(e.__traceback__))[-1]  # where it was raised
    message = " ".join(str(e).split()) or "(no message)"
    raise ExperimentFileError(
        f"--config={module.__file__}: {what} raised {type(e).__name__}: {message} "
        f"({frame.f_code.co_filename}, line {line}); fix the experiment file.") from e
