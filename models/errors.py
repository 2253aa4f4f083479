"""The errors of input a user can fix: a config value, an argument, a file, a folder, a checkpoint.

Every CLI prints these as one `error:` line (train/run/cli.py); any other exception is a bug and
keeps its traceback. Both are ValueErrors (a missing file is also a FileNotFoundError), so code
that catches those keeps working.
"""

import contextlib


class InputError(ValueError):
  """Bad input the user can fix; the message names the thing and the fix."""


class MissingInputError(InputError, FileNotFoundError):
  """A file or folder the input names does not exist."""


@contextlib.contextmanager
def named_path(what: str):
  """Code that reads or writes a path the input names (`what`, e.g. "--out=DIR"): an OSError
  or undecodable text inside becomes an InputError naming `what` and the cause (a missing path:
  a MissingInputError). OSErrors elsewhere, deep in a library, keep their traceback."""
  try:
    yield
  except InputError:
    raise
  except FileNotFoundError as e:
    raise MissingInputError(f"{what}: {e}; give a path that exists.") from e
  except (OSError, UnicodeError) as e:
    raise InputError(f"{what} cannot be used: {e}.") from e
