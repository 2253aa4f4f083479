"""Train an experiment: python -m train --config=experiments/NAME.py --workdir=DIR [--config.KEY=VALUE ...]

Running the same command again resumes from the workdir's latest checkpoint.
"""

import re

from absl import app, flags, logging
from ml_collections import config_flags

from train.engine import loop
from train.run import cli, compilation_cache, experiment_file, xla_flags

USAGE = ("usage: python -m train --config=experiments/NAME.py[:VARIANT] --workdir=DIR "
         "[--config.KEY=VALUE ...]")


class ExperimentFileParser(flags.ArgumentParser):
  """The --config parser in place of ml_collections' own: the file loaded as launch.sweep
  loads it (train/run/experiment_file.py), so that one that fails is one ExperimentFileError."""

  def parse(self, argument):
    config = experiment_file.load(argument)
    config.lock()
    return config

  def flag_type(self):
    return "config object"


_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
flags.FLAGS["config"].parser = ExperimentFileParser()
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag, config file or override as one line, no traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    # absl wraps the parser's error as "flag --config=PATH: ..."; ours already names the flag.
    cause = e.__context__
    problem = str(cause if isinstance(cause, experiment_file.ExperimentFileError) else e)
  except (AttributeError, KeyError) as e:
    problem = unknown_key_problem(e, argv)
  cli.fail(problem, USAGE)


def unknown_key_problem(error: Exception, argv: list[str]) -> str:
  """ConfigDict's lookup error for an override, as the key and the flag that named it."""
  cause = error.args[0] if error.args else error
  detail = cause.args[0] if isinstance(cause, KeyError) and cause.args else str(cause)
  detail = " ".join(str(detail).split())
  match = re.match(r"'([^']+)'\s*(.*)", detail)
  if not match:
    return f"bad config override: {detail}"
  key, hint = match.groups()
  named = [a.split("=", 1)[0] for a in argv
           if a.lstrip("-").startswith("config.") and key in a.split("=", 1)[0].split(".")]
  keys = "the keys are those of train/run/config.py:base_config and the experiment file."
  return f"unknown config key {key!r} in {', '.join(named) or 'the overrides'}: {hint or keys}"


def train(config, workdir: str) -> None:
  """config.train.xla_flags into XLA_FLAGS before anything uses a device, and the persistent
  compilation cache before anything compiles; then the run."""
  xla_flags.apply(config.train.xla_flags)
  compilation_cache.use(config.train.compilation_cache)
  loop.train_and_evaluate(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # orbax and grain are chatty at INFO
  cli.guarded(train, (loop.NonFiniteLossError,))(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main, parse_flags)
