"""Train an experiment: python -m train --config=experiments/NAME.py --workdir=DIR [--config.KEY=VALUE ...]

Running the same command again resumes from the workdir's latest checkpoint.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # orbax and grain are chatty at INFO
  try:
    loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, loop.NonFiniteLossError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
