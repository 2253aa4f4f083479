"""Train an experiment: python -m train --config=experiments/NAME.py --workdir=DIR [--config.KEY=VALUE ...]

Running the same command again resumes from the workdir's latest checkpoint.
"""

import re

from absl import app, flags, logging
from ml_collections import config_flags

from train import cli, loop

USAGE = ("usage: python -m train --config=experiments/NAME.py[:VARIANT] --workdir=DIR "
         "[--config.KEY=VALUE ...]")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag, config file or override as one line, no traceback."""
  try:
    argv = flags.FLAGS(argv)
    _CONFIG.value.keys()  # A config file that failed to load raises here.
    return argv
  except flags.Error as e:
    problem = flag_problem(str(e).strip())
  except (AttributeError, KeyError) as e:
    problem = unknown_key_problem(e, argv)
  except OSError as e:
    problem = f"cannot load --config: {str(e).strip().splitlines()[-1].strip()}"
  cli.fail(problem, USAGE)


def flag_problem(message: str) -> str:
  """One line: a failing get_config() comes with its traceback, of which the last line says it."""
  if "Traceback" not in message:
    return " ".join(message.split())
  flag = message.split(": ", 1)[0]
  return f"{flag}: {message.splitlines()[-1].split(': ', 1)[-1]}"


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
  return (f"unknown config key {key!r} in {', '.join(named) or 'the overrides'}: "
          f"{hint or 'the keys are those of train/config.py:base_config and the experiment file.'}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # orbax and grain are chatty at INFO
  cli.guarded(loop.train_and_evaluate, (loop.NonFiniteLossError,))(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
