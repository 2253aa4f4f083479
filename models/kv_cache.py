"""The KV cache of `MultiHeadAttention`: its variables, writing a chunk, attending over it.

A module's "cache" collection holds `cached_key` and `cached_value` [B, K, L, H] (heads before
slots: the layout the attention products read in place, so a decoded token copies no cache)
and, for self-attention, a per-example write position `cache_index` [B]. Cross-attention keeps
the keys and values [B, K, S, H] of its encoded input and no index. The functions taking a
module read and create those variables within that module's call.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.attention import as_4d, masked_softmax
from models.masks import causal_mask, combine_masks

# Part of jit's cache key, as attention_kernels' options are (see its module docstring).
_ROWS_SHARE_CACHE_SLOT = jax.make_user_context(False)


def rows_share_cache_slot(shared: bool = True):
  """Within it, decode=True calls promise that every row of the batch writes its chunk at the
  same cache slot, cache_index[0], and inside the cache: the write is then one
  `dynamic_update_slice`, not a per-row scatter. models/decoding.py uses it where that holds.
  It is read while tracing, and is part of jit's cache key."""
  return _ROWS_SHARE_CACHE_SLOT(bool(shared))


def _heads_first(x_BSKH):
  """[B, S, K, H] -> [B, K, S, H], the cache layout."""
  return jnp.swapaxes(x_BSKH, 1, 2)


def write_index(module: nn.Module, batch_size: int, chunk_length: int):
  """Per-example write position [B] of the module's self-attention cache; None before the
  cache exists."""
  if not module.has_variable("cache", "cached_key"):
    return None
  cached_key = module.get_variable("cache", "cached_key")
  cache_B, cache_len = cached_key.shape[0], cached_key.shape[2]
  if batch_size != cache_B or chunk_length > cache_len:
    raise ValueError(f"Input batch {batch_size} and chunk length {chunk_length} do not fit the "
                     f"cache [B={cache_B}, L={cache_len}]; re-initialise the cache.")
  return module.get_variable("cache", "cache_index")


def cross_keys_values(module: nn.Module, batch_size: int, encoded_length: int):
  """The cross-attention keys and values [B, K, S, H] kept by the module's first decode call;
  None before it."""
  if not module.has_variable("cache", "cached_key"):
    return None
  cached_key = module.get_variable("cache", "cached_key")
  cache_B, cache_S = cached_key.shape[0], cached_key.shape[2]
  if batch_size != cache_B or encoded_length != cache_S:
    raise ValueError(f"Input batch {batch_size} and encoded length {encoded_length} do not fit "
                     f"the cross-attention cache [B={cache_B}, S={cache_S}]; re-initialise the "
                     "cache.")
  return cached_key, module.get_variable("cache", "cached_value")


def keep_cross_keys_values(module: nn.Module, k_BSKH, v_BSKH):
  """Keeps the cross-attention keys and values in the module's cache, in the cache layout."""
  module.variable("cache", "cached_key", lambda: _heads_first(k_BSKH))
  module.variable("cache", "cached_value", lambda: _heads_first(v_BSKH))


def write(module: nn.Module, k_BTKH, v_BTKH, index_B, sliding_window: int | None):
  """Writes the chunk into the module's cache: (keys, values [B, K, L, H], mask [B, 1, T, L]);
  at init (index_B None), creates the cache and returns None.

  Query t of row b may attend slots s <= index_B[b] + t (and s > index_B[b] + t - W with a
  sliding window W); cache_index advances by T.
  """
  shape_BKTH = _heads_first(k_BTKH).shape
  cached_key = module.variable("cache", "cached_key", jnp.zeros, shape_BKTH, k_BTKH.dtype)
  cached_value = module.variable("cache", "cached_value", jnp.zeros, shape_BKTH, v_BTKH.dtype)
  cache_index = module.variable("cache", "cache_index", jnp.zeros, k_BTKH.shape[:1], jnp.int32)
  if index_B is None:
    return None
  T, L = k_BTKH.shape[1], cached_key.value.shape[2]
  cached_key.value = write_chunk(cached_key.value, _heads_first(k_BTKH), index_B)
  cached_value.value = write_chunk(cached_value.value, _heads_first(v_BTKH), index_B)
  cache_index.value = index_B + T
  slots_L, slots_B1T1 = jnp.arange(L)[None, None, None, :], (index_B[:, None] + jnp.arange(T))[
      :, None, :, None]
  mask_B1TL = slots_L <= slots_B1T1
  if sliding_window is not None:
    mask_B1TL &= slots_L > slots_B1T1 - sliding_window
  return cached_key.value, cached_value.value, mask_B1TL


def write_chunk(cache_BKLH, chunk_BKTH, index_B):
  """The cache with row b's chunk at slots index_B[b] + arange(T), written in place: one
  `dynamic_update_slice` under `rows_share_cache_slot`, else a per-row scatter, which drops
  the writes past the cache's length L."""
  B, K, T, _ = chunk_BKTH.shape
  chunk_BKTH = chunk_BKTH.astype(cache_BKLH.dtype)
  if _ROWS_SHARE_CACHE_SLOT.value:
    return jax.lax.dynamic_update_slice(cache_BKLH, chunk_BKTH, (0, 0, index_B[0], 0))
  slots_B1T = (index_B[:, None] + jnp.arange(T))[:, None, :]
  rows_B11, heads_1K1 = jnp.arange(B)[:, None, None], jnp.arange(K)[None, :, None]
  return cache_BKLH.at[rows_B11, heads_1K1, slots_B1T].set(chunk_BKTH, mode="drop")


def attend(q_BTNH, k_BKSH, v_BKSH, *, mask, bias, scale, is_causal):
  """Attention over keys and values in the cache layout [B, K, S, H], read in place.

  Computes as dot_product_attention's "xla" path does (float32 logits and softmax, masked
  logits set to the same finite number), with einsums whose operands need no transpose of
  the cache: a decoded token copies none of it.
  """
  (B, T, N, H), (K, S) = q_BTNH.shape, k_BKSH.shape[1:3]
  G = N // K
  k_BKSH, v_BKSH = k_BKSH.astype(q_BTNH.dtype), v_BKSH.astype(q_BTNH.dtype)
  q_BKGTH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4)
  logits_dtype = jnp.promote_types(q_BTNH.dtype, jnp.float32)
  logits_BKGTS = jnp.einsum("BKGTH,BKSH->BKGTS", q_BKGTH, k_BKSH,
                            preferred_element_type=logits_dtype)
  logits_BKGTS *= jnp.asarray(1.0 / np.sqrt(H) if scale is None else scale, logits_dtype)
  bias_BKGTS = None if bias is None else _split_heads(as_4d("bias", bias, (B, N, T, S)), K)
  mask = combine_masks(mask, causal_mask(T, S) if is_causal else None)
  mask_BKGTS = None if mask is None else _split_heads(as_4d("mask", mask, (B, N, T, S)), K)
  weights_BKGTS = masked_softmax(logits_BKGTS, mask=mask_BKGTS, bias=bias_BKGTS)
  weights_BKGTS = weights_BKGTS.astype(v_BKSH.dtype)
  out_BKGTH = jnp.einsum("BKGTS,BKSH->BKGTH", weights_BKGTS, v_BKSH)
  return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q_BTNH.dtype)


def _split_heads(x_bnTS, num_kv_heads):
  """A mask or bias [b, n, T, S] (n = N heads, or 1) as [b, K, N / K, T, S] (or [b, 1, 1, ...])."""
  b, n = x_bnTS.shape[:2]
  K, G = (num_kv_heads, n // num_kv_heads) if n > 1 else (1, 1)
  return x_bnTS.reshape(b, K, G, *x_bnTS.shape[2:])
