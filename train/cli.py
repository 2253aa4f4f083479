"""The CLIs' one error path: an expected error is one `error:` line on stderr and exit status 2.

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

from absl import app

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
