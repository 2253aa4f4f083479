"""What the CLIs over a trained workdir (train.generate, train.attention_maps) share: the
--workdir and --input flags, and a main that loads the run and ends a ValueError as one line.
"""

import sys
from collections.abc import Callable

from absl import flags, logging

from train import workdir as workdir_lib


def define_flags():
  """--workdir and --input (repeatable), both required; a CLI calls this when it runs."""
  flags.DEFINE_string("workdir", None, "Workdir of a training run.")
  flags.DEFINE_multi_string("input", None, "Input text (repeat for several).")
  flags.mark_flags_as_required(["workdir", "input"])


def main(answer: Callable[[workdir_lib.Run, list[str]], None]):
  """Calls answer(the --workdir run, the --input texts); a ValueError is printed as one
  `error: ...` line on stderr, with exit status 1."""
  logging.set_verbosity(logging.WARNING)  # orbax and grain are chatty at INFO
  try:
    answer(workdir_lib.load(flags.FLAGS.workdir), flags.FLAGS.input)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
