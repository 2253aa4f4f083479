"""What the CLIs share: one error path (an expected error is one `error:` line on stderr and exit
status 2), their flag parsing, and the flags and main of those over a trained workdir.

Expected errors are those of bad input (a config, flag, data file, tokenizer, checkpoint,
workdir or folder): models.errors.InputError and its kind (CheckpointError, PretrainedError,
MissingInputError, ...), raised where the input is checked or a path it names is opened.
Anything else, a ValueError or OSError from inside a library included, is a bug and keeps its
traceback.
"""

import atexit
import gc
import sys
from collections.abc import Callable

from absl import app, flags, logging

from models.errors import InputError

EXPECTED = (InputError,)
EXIT_BAD_INPUT = 2


def fail(message: str, usage: str = ""):
  """Ends the program with `error: MESSAGE` (one line), then `usage` if given, exit status 2."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  if usage:
    print(usage, file=sys.stderr, flush=True)
  sys.exit(EXIT_BAD_INPUT)


def guarded(main: Callable, expected: tuple[type[BaseException], ...] = ()) -> Callable:
  """`main` with expected errors (EXPECTED + `expected`) ended by `fail`."""
  def run(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except EXPECTED + expected as e:
      fail(str(e) or type(e).__name__)
  return run


def run(main: Callable, flags_parser: Callable) -> None:
  """absl's `app.run` for a CLI's `__main__`, without the interpreter's final garbage
  collection: with jax loaded it takes about 0.5 s at every exit (a quarter of answering one
  input), and the process is ending anyway. Registered first, gc.freeze runs after every other
  exit hook (orbax's last save, absl's log flush)."""
  atexit.register(gc.freeze)
  app.run(main, flags_parser=flags_parser)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing for app.run(flags_parser=...): a bad or missing flag is one `error:`
  line and exit status 2, not absl's FATAL message and exit status 1."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(e, "--helpshort lists the flags.")


def define_workdir_flags(input_required: bool = True):
  """--workdir (required) and --input (repeatable) of a CLI over a trained run (train.generate,
  train.attention_maps); it calls this when it runs."""
  flags.DEFINE_string("workdir", None, "Workdir of a training run.")
  flags.DEFINE_multi_string("input", None, "Input text (repeat for several).")
  flags.mark_flags_as_required(["workdir", "input"] if input_required else ["workdir"])


def answer_inputs(answer: Callable):
  """Calls answer(the --workdir run as train.run.workdir.load gives it, the --input texts); bad
  input ends as one `error:` line."""
  from train.run import workdir as workdir_lib  # jax: imported when such a CLI runs, not by launch/
  logging.set_verbosity(logging.WARNING)  # orbax and grain are chatty at INFO
  guarded(lambda: answer(workdir_lib.load(flags.FLAGS.workdir), flags.FLAGS.input))()
