"""Boolean attention masks: True = may attend, broadcastable to [B, N, T, S]."""

import functools

import jax.numpy as jnp

from models.errors import InputError


def causal_mask(q_len: int, kv_len: int | None = None, offset=0):
  """[1, 1, T, S]: query t may attend key s when s <= t + offset (kv_len defaults to q_len)."""
  kv_len = q_len if kv_len is None else kv_len
  last_key_T1 = jnp.arange(q_len)[:, None] + offset
  return (jnp.arange(kv_len)[None, :] <= last_key_T1)[None, None]


def window_mask(q_len: int, kv_len: int, local_window_size):
  """[1, 1, T, S]: query t may attend key s when t - left <= s <= t + right (local attention).

  `local_window_size` is (left, right), or w for (w, w), as in `jax.nn.dot_product_attention`.
  """
  left, right = _window(local_window_size)
  query_T1, key_1S = jnp.arange(q_len)[:, None], jnp.arange(kv_len)[None, :]
  return ((key_1S >= query_T1 - left) & (key_1S <= query_T1 + right))[None, None]


def _window(local_window_size) -> tuple[int, int]:
  """(left, right) of a local window given as w or (left, right); a clear error otherwise."""
  window = local_window_size
  if isinstance(window, int):
    window = (window, window)
  if not (isinstance(window, (tuple, list)) and len(window) == 2
          and all(isinstance(w, int) and w >= 0 for w in window)):
    raise InputError(f"local_window_size must be an int >= 0 or a pair (left, right) of them, "
                     f"got {local_window_size!r}.")
  return tuple(window)


def padding_mask(query_valid_BT=None, kv_valid_BS=None):
  """[B, 1, T, S] from per-token validity; a side given as None is all valid (and broadcasts).

  Returns [B, 1, T, 1] or [B, 1, 1, S] when one side is None, and None when both are.
  """
  masks = []
  if query_valid_BT is not None:
    masks.append(jnp.asarray(query_valid_BT).astype(bool)[:, None, :, None])
  if kv_valid_BS is not None:
    masks.append(jnp.asarray(kv_valid_BS).astype(bool)[:, None, None, :])
  return combine_masks(*masks)


def segment_mask(query_segment_ids_BT, kv_segment_ids_BS):
  """[B, 1, T, S]: tokens attend within their own segment (packed sequences).

  Segment id 0 means padding: it attends to nothing and nothing attends to it. Its query rows
  are then fully masked and, as everywhere here, average the values uniformly.
  """
  q_B1T1 = jnp.asarray(query_segment_ids_BT)[:, None, :, None]
  kv_B11S = jnp.asarray(kv_segment_ids_BS)[:, None, None, :]
  return (q_B1T1 == kv_B11S) & (q_B1T1 != 0)


def combine_masks(*masks):
  """Logical AND of boolean masks; None entries are ignored, all None gives None."""
  masks = [jnp.asarray(m) for m in masks if m is not None]
  for m in masks:
    if m.dtype != jnp.bool_:
      raise ValueError(f"Masks must be boolean (True = may attend), got dtype {m.dtype}; "
                       "pass additive masks as `bias`.")
  return functools.reduce(jnp.logical_and, masks) if masks else None
