"""Folders built once under $TAPETE_CACHE (default ~/.cache/tapete), named by what they are
built from and written atomically: readers never see half a folder, and builders that race for
the same one are safe (the first rename wins; the others drop their copy)."""

import hashlib
import importlib.metadata
import inspect
import json
import os
import pathlib
import shutil
import sys
import tempfile

from models.errors import MissingInputError


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("TAPETE_CACHE", "~/.cache/tapete")).expanduser()


def build_once(name: str, write, *, inputs: dict, **params) -> str:
  """The folder NAME-KEY that `write(folder, **params)` fills, built only if the cache lacks it.

  KEY hashes NAME, the builder (its name and the source of the module that defines it),
  `params`, and `inputs`: what else the result depends on (input files' digests, package
  versions), so that a change to any of them builds a new folder, never reusing a stale one.
  """
  code = inspect.getsource(sys.modules[write.__module__])
  what = json.dumps({"name": name, "code": code, "builder": write.__qualname__,
                     "params": params, "inputs": inputs}, sort_keys=True)
  key = hashlib.sha256(what.encode()).hexdigest()[:16]
  return str(write_atomically(cache_dir() / f"{name}-{key}", lambda tmp: write(tmp, **params)))


def files_digest(paths) -> str:
  """One SHA-256 of the files' names and contents, in the given order."""
  digest = hashlib.sha256()
  for path in map(pathlib.Path, paths):
    digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
  return digest.hexdigest()


def package_versions(*packages: str, hint: str) -> dict[str, str]:
  """{package: its installed version}; a missing one is an error that ends with `hint`."""
  try:
    return {package: importlib.metadata.version(package) for package in packages}
  except importlib.metadata.PackageNotFoundError as e:
    raise MissingInputError(f"The package {e.name} is not installed: {hint}") from None


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
