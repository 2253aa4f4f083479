"""Parameter paths: a pytree's leaves named by their "/"-joined keys ("decoder/layers_0/mlp/wi/kernel").

One naming for every place that matches, restores, freezes or reports parameters by path.
"""

import re
from typing import Any

import jax
from flax import traverse_util

from models.errors import InputError


def key_name(key) -> str:
  """A path entry's name: a dict key, an attribute name or a sequence index."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_name(path: tuple) -> str:
  """The "/"-joined name of a `jax.tree_util` key path."""
  return "/".join(key_name(k) for k in path)


def param_paths(tree) -> Any:
  """`tree` with each leaf replaced by its path name (partitioning boxes are not leaves)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path_name(path), tree)


def flatten(tree) -> dict[str, Any]:
  """{"a/b/kernel": leaf} of a nested dict (a partitioning box counts as one leaf)."""
  return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: dict[str, Any]) -> dict:
  """The nested dict of a `flatten` result."""
  return traverse_util.unflatten_dict(flat, sep="/")


def listing(names, limit: int = 12) -> str:
  """The sorted names, the first `limit` of them, "and N more" for the rest."""
  names = sorted(names)
  more = f" and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def patterns(given) -> tuple[str, ...]:
  """Regexes over path names given as one string, a sequence of them, or None (none)."""
  return (given,) if isinstance(given, str) else tuple(given or ())


def pattern_problems(what: str, given) -> list[str]:
  """"WHAT 'PATTERN' is not a valid regular expression (why)" for each of `given` (a string, a
  sequence, or None) that `re` cannot compile."""
  problems = []
  for pattern in patterns(given):
    try:
      re.compile(pattern)
    except (re.error, TypeError) as error:
      problems.append(f"{what} {pattern!r} is not a valid regular expression ({error})")
  return problems


def check_matched(what: str, patterns, names: list[str], like: list[str] | None = None) -> None:
  """An InputError for the first of `patterns` that matches (re.search) none of `names`, likely a
  typo; the message shows `like` (default: the first three names) as what paths look like."""
  for pattern in patterns:
    if not any(re.search(pattern, name) for name in names):
      raise InputError(f"{what} {pattern!r} matches no parameter path (a typo?); paths look like "
                       f"{like or names[:3]}.")
