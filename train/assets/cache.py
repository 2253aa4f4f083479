"""Folders built once under $TAPETE_CACHE (default ~/.cache/tapete), written atomically."""

import os
import pathlib
import shutil
import tempfile


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("TAPETE_CACHE", "~/.cache/tapete")).expanduser()


def write_atomically(folder: pathlib.Path, write) -> pathlib.Path:
  """Runs write(tmp_folder) and renames it to `folder`, so readers never see half of it."""
  if folder.is_dir():
    return folder
  folder.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
  try:
    write(tmp)
  except BaseException:
    shutil.rmtree(tmp)
    raise
  try:
    tmp.rename(folder)
  except OSError:  # Another process finished first: theirs is the same.
    shutil.rmtree(tmp)
    if not folder.is_dir():
      raise
  return folder
