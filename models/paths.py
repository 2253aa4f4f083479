"""Parameter paths: a pytree's leaves named by their "/"-joined keys ("decoder/layers_0/mlp/wi/kernel").

One naming for every place that matches, restores, freezes or reports parameters by path.
"""

from typing import Any

import jax
from flax import traverse_util


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
