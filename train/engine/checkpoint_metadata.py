"""What a checkpoint's state holds, as orbax's metadata tells it, and how it compares with a model.

`saved_tree` is orbax's metadata of every saved array; `saved_params_keys` parses orbax's tree
metadata file for the params' keys alone (loading a run for inference reads no more);
`abstract_tree` and `tree_mismatches` lay out and check a state against what was saved, before
orbax restores it.
"""

import json
from typing import Any

from etils import epath
import jax
import orbax.checkpoint as ocp

from models import paths

_DICT_KEY = 2  # orbax's key_type of a dict key in a tree's metadata file (1: a sequence index)


def saved_tree(state_dir: epath.Path) -> Any:
  """The tree of array metadata (shape, dtype) orbax saved in STATE_DIR (a step's state item)."""
  handler = ocp.StandardCheckpointHandler()
  try:
    metadata = handler.metadata(state_dir)
  finally:
    handler.close()
  return getattr(metadata, "tree", metadata)


def saved_params_keys(state_dir: epath.Path) -> dict | None:
  """The saved params' nested dicts of keys (leaves 0), from the tree metadata file orbax wrote
  in STATE_DIR (a step's state item) alone.

  The full metadata (`saved_tree`) also reads every array's own metadata, the optimizer's
  included: 0.35 of the 0.6 s train.generate took to load the quickstart. None where the file
  is not as orbax 0.12 writes it (another orbax): the caller then reads the full metadata.
  """
  params: dict = {}
  try:
    entries = json.loads((state_dir / "_METADATA").read_text())["tree_metadata"]
    for entry in entries.values():
      keys = entry["key_metadata"]
      if keys[0]["key"] != "params":
        continue
      if len(keys) < 2 or any(k["key_type"] != _DICT_KEY for k in keys):
        return None
      node = params
      for key in keys[1:-1]:
        node = node.setdefault(key["key"], {})
      node[keys[-1]["key"]] = 0
  except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
    return None
  return params or None


def abstract_tree(tree: Any, *, require_sharding: bool) -> Any:
  """ShapeDtypeStructs (with the leaves' shardings) for a tree of arrays or structs."""
  unsharded = []

  def to_struct(path, leaf):
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
      unsharded.append(paths.path_name(path))
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

  tree = jax.tree_util.tree_map_with_path(to_struct, tree)
  if require_sharding and unsharded:
    raise ValueError(
        f"abstract_state needs a sharding on every leaf; missing on {paths.listing(unsharded)}. "
        "Build it as jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) from jax.eval_shape "
        "and the run's shardings.")
  return tree


def tree_mismatches(abstract: Any, saved: Any) -> list[str]:
  """The leaves of `abstract` (a model's) missing from `saved` (a checkpoint's metadata tree),
  those in `saved` only, and those of another shape: one phrase each kind, none if they match."""
  want = _shapes(abstract, stored=True)
  have = _shapes(saved, stored=False)
  problems = []
  missing = sorted(want.keys() - have.keys())
  if missing:
    problems.append(f"not in the checkpoint: {paths.listing(missing)}")
  unexpected = sorted(have.keys() - want.keys())
  if unexpected:
    problems.append(f"in the checkpoint but not in the model: {paths.listing(unexpected)}")
  reshaped = [f"{k} {have[k]} saved, {want[k]} expected"
              for k in sorted(want.keys() & have.keys()) if want[k] != have[k]]
  if reshaped:
    problems.append(f"shapes differ: {paths.listing(reshaped)}")
  return problems


def _shapes(tree: Any, *, stored: bool) -> dict[str, tuple[int, ...]]:
  """{"a/b/0": shape}; stored=True gives typed PRNG keys the shape of their saved data."""
  shapes = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = tuple(getattr(leaf, "shape", ()))
    if stored and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      shape = jax.eval_shape(jax.random.key_data, leaf).shape
    shapes[paths.path_name(path)] = shape
  return shapes
