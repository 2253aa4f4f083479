"""`MultiHeadAttention`: grouped-query heads, RoPE, a KV cache, and its fused projections."""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import attention_kernels, kv_cache
from models.attention import dot_product_attention, weighted_values
from models.errors import InputError
from models.layers import apply_rope
from models.masks import combine_masks

# The collection the attention weights are sown into when it is mutable.
WEIGHTS_COLLECTION = "attention_weights"


class MultiHeadAttention(nn.Module):
  """Multi-head attention with grouped-query heads, RoPE, a KV cache and weight inspection.

  Parameters are laid out as flax's `MultiHeadDotProductAttention` (`query`, `key`, `value`,
  `out`), so weights copy across when num_kv_heads == num_heads. The query, key and value
  projections of self-attention run as one matmul (and the keys and values of
  cross-attention as one): their kernels are joined at apply time (see `_project`), so
  parameters, checkpoints and adapters keep the three names.

  Attention weights: when the collection "attention_weights" is mutable (and the module is
  not initializing), the reference path runs and sows the float32 weights [B, N, T, S] as
  "weights": `model.apply(variables, ..., mutable=["attention_weights"])`
  (models/attention_weights.py gathers every layer's). Attention dropout (dropout_rate > 0,
  deterministic=False, rng "dropout") also runs the reference path.

  Implementation (`implementation`, see `dot_product_attention`): the fused kernels also read
  two context managers, which `train.engine.parallel.on_mesh` sets and one's own code may set:
  `attention_kernels.segments_at_most(M)` (every row of segment ids holds at most M segments)
  and `attention_kernels.split_over(batch_axes, head_axes)` (the mesh axes that the Pallas and
  splash kernels split the batch and heads over).

  Sliding window (`sliding_window` W, self-attention only): a query attends only keys fewer
  than W positions away, so with is_causal (or the cache) the last W keys, itself included
  (Mistral); positions are indices in the sequence (cache slots when decoding).

  Decoding (decode=True, self-attention; models/kv_cache.py): the "cache" collection holds
  `cached_key` and `cached_value` [B, K, L, H] (the layout the attention products read in
  place, so a decoded token copies no cache) and a per-example `cache_index` [B]. The first
  call (init) creates them with L = the input length and computes normally. Later calls write
  the chunk's keys and values at cache_index[b] + arange(T) (in place: one
  `dynamic_update_slice` under `kv_cache.rows_share_cache_slot`, else a per-row scatter), let
  query t attend cache slots s <= cache_index[b] + t (and s > cache_index[b] + t - W with a
  sliding window; this replaces `is_causal`; a caller mask or bias must have S = L), take RoPE
  positions cache_index[b] + arange(T) by default, and advance cache_index by T. Writes past L
  are dropped, so queries past L see a stale cache: size L for the longest prompt + generation.
  Cross-attention (inputs_kv given) with decode=True projects inputs_kv to keys and values
  on the first call only and keeps them in the cache (`cached_key`, `cached_value`
  [B, K, S, H]); later calls use those and read only inputs_kv's length, so they must pass
  the same encoded input (re-initialise the cache for another).
  """
  num_heads: int
  head_dim: int
  num_kv_heads: int | None = None  # None: num_heads (multi-head); 1: multi-query.
  out_features: int | None = None  # None: the input width.
  use_bias: bool = True
  qkv_bias: bool | None = None  # Biases of query, key and value; None: use_bias (Qwen2: True).
  dropout_rate: float = 0.0  # On the attention weights.
  scale: float | None = None  # None: 1/sqrt(head_dim); T5 uses 1.0.
  rope_max_wavelength: float | None = None  # None: no rotary embedding.
  rope_llama3_scaling: tuple | None = None  # See layers.rope_frequencies; None: unscaled.
  sliding_window: int | None = None  # W: attend only keys fewer than W positions away.
  implementation: str | None = None  # See dot_product_attention.
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

  def _dense(self, features, axis, names, name, use_bias=None):
    """DenseGeneral whose kernel carries the logical axis `names` (its bias, the output ones)."""
    num_out_axes = len(features) if isinstance(features, tuple) else 1
    return nn.DenseGeneral(
        features, axis=axis, use_bias=self.use_bias if use_bias is None else use_bias,
        dtype=self.dtype,
        param_dtype=self.param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(self.kernel_init, names),
        bias_init=nn.with_logical_partitioning(self.bias_init, names[-num_out_axes:]))

  def _grouped_projection(self, name, in_features, heads, heads_name):
    """(kernel [in, K, heads / K, H], bias [K, heads / K, H] or None) of the projection `name`:
    the query's N heads as K groups of G = N / K, each group next to the key head it shares."""
    K, H = self.num_kv_heads or self.num_heads, self.head_dim
    use_bias = self.use_bias if self.qkv_bias is None else self.qkv_bias
    kernel_bias = _Projection((heads, H), ("embed", heads_name, "head_dim"), use_bias,
                              self.param_dtype, self.kernel_init, self.bias_init,
                              name=name)(in_features)
    return tuple(None if x is None else x.reshape(*x.shape[:-2], K, heads // K, H)
                 for x in kernel_bias)

  def _queries_keys_values(self, inputs_q_BTD, inputs_kv_BSD, project_kv):
    """q [B, T, N, H] and, if project_kv, k and v [B, S, K, H] (else None, None)."""
    N, H = self.num_heads, self.head_dim
    K = self.num_kv_heads or N
    query = self._grouped_projection("query", inputs_q_BTD.shape[-1], N, "heads")
    as_BTNH = lambda q_BTKGH: q_BTKGH.reshape(*q_BTKGH.shape[:-3], N, H)
    if not project_kv:
      q_BTKGH, = _project(inputs_q_BTD, [query], self.dtype)
      return as_BTNH(q_BTKGH), None, None
    key, value = (self._grouped_projection(name, inputs_kv_BSD.shape[-1], K, "kv_heads")
                  for name in ("key", "value"))
    if inputs_kv_BSD is inputs_q_BTD and _one_matmul_keeps_heads_local(K):
      q_BTKGH, k_BSK1H, v_BSK1H = _project(inputs_q_BTD, [query, key, value], self.dtype)
    else:
      q_BTKGH, = _project(inputs_q_BTD, [query], self.dtype)
      k_BSK1H, v_BSK1H = _project(inputs_kv_BSD, [key, value], self.dtype)
    return as_BTNH(q_BTKGH), k_BSK1H[..., 0, :], v_BSK1H[..., 0, :]

  @nn.compact
  def __call__(self, inputs_q_BTD, inputs_kv_BSD=None, *, mask=None, bias=None, is_causal=False,
               query_segment_ids=None, kv_segment_ids=None, positions=None, kv_positions=None,
               decode=False, deterministic=True):
    """Attends inputs_q to inputs_kv (None: to itself); returns [B, T, out_features]."""
    N = self.num_heads
    K = self.num_kv_heads or N
    if N % K:
      raise InputError(f"num_heads={N} must be a multiple of num_kv_heads={K}.")
    self_attention = inputs_kv_BSD is None
    if self.sliding_window is not None and not self_attention:
      raise InputError("sliding_window applies to self-attention only; leave it None for "
                       "cross-attention.")
    inputs_kv_BSD = inputs_q_BTD if self_attention else inputs_kv_BSD
    cached_cross = decode and not self_attention
    cross_kv_BKSH = kv_cache.cross_keys_values(
        self, inputs_q_BTD.shape[0], inputs_kv_BSD.shape[1]) if cached_cross else None
    q_BTNH, k_BSKH, v_BSKH = self._queries_keys_values(inputs_q_BTD, inputs_kv_BSD,
                                                       project_kv=cross_kv_BKSH is None)

    use_cache = decode and self_attention
    if use_cache and (query_segment_ids is not None or kv_segment_ids is not None):
      raise ValueError("Segment ids are not supported with decode=True; pass a mask over the "
                       "cache (S = cache length) instead.")
    index_B = kv_cache.write_index(self, *q_BTNH.shape[:2]) if use_cache else None
    if self.rope_max_wavelength is not None:
      T = q_BTNH.shape[1]
      if positions is None:
        positions = jnp.arange(T)[None] if index_B is None else index_B[:, None] + jnp.arange(T)
      if kv_positions is None:
        kv_positions = positions if self_attention else jnp.arange(inputs_kv_BSD.shape[1])[None]
      rope = functools.partial(apply_rope, max_wavelength=self.rope_max_wavelength,
                               llama3_scaling=self.rope_llama3_scaling)
      q_BTNH = rope(q_BTNH, positions)
      if k_BSKH is not None:
        k_BSKH = rope(k_BSKH, kv_positions)
    if cached_cross and cross_kv_BKSH is None:
      kv_cache.keep_cross_keys_values(self, k_BSKH, v_BSKH)
    window = None if self.sliding_window is None else self.sliding_window - 1
    kv_BKSH = cross_kv_BKSH  # Keys and values [B, K, S, H] as a cache holds them, or None.
    if use_cache:
      written = kv_cache.write(self, k_BSKH, v_BSKH, index_B, self.sliding_window)
      if written is not None:
        *kv_BKSH, cache_mask_B1TL = written
        mask, is_causal, window = combine_masks(mask, cache_mask_B1TL), False, None

    use_dropout = self.dropout_rate > 0.0 and not deterministic
    sow_weights = self.is_mutable_collection(WEIGHTS_COLLECTION) and not self.is_initializing()
    if (kv_BKSH is not None and not (use_dropout or sow_weights)
        and self.implementation in (None, "xla")
        and query_segment_ids is None and kv_segment_ids is None):
      x_BTNH = kv_cache.attend(q_BTNH, *kv_BKSH, mask=mask, bias=bias, scale=self.scale,
                               is_causal=is_causal)
    else:
      if kv_BKSH is not None:
        k_BSKH, v_BSKH = (jnp.swapaxes(x, 1, 2) for x in kv_BKSH)
      attend = functools.partial(
          dot_product_attention, q_BTNH, k_BSKH, v_BSKH, mask=mask, bias=bias,
          is_causal=is_causal, query_segment_ids=query_segment_ids,
          kv_segment_ids=kv_segment_ids, scale=self.scale, local_window_size=window)
      if use_dropout or sow_weights:
        x_BTNH, weights_BNTS = attend(implementation="reference", return_weights=True)
        if sow_weights:
          self.sow(WEIGHTS_COLLECTION, "weights", weights_BNTS)
        if use_dropout:
          dropped_BNTS = nn.Dropout(self.dropout_rate)(weights_BNTS, deterministic=False)
          x_BTNH = weighted_values(dropped_BNTS, v_BSKH).astype(q_BTNH.dtype)
      else:
        x_BTNH = attend(implementation=self.implementation)
    out_features = self.out_features or inputs_q_BTD.shape[-1]
    return self._dense(out_features, (-2, -1), ("heads", "head_dim", "embed"), "out")(x_BTNH)


class _Projection(nn.Module):
  """The kernel [D, *features] and bias [*features] that `nn.DenseGeneral(features)` makes
  (same names, shapes, init and logical axes `names`), returned unapplied so that several
  projections can run as one matmul (`_project`)."""
  features: tuple[int, ...]
  names: tuple[str, ...]
  use_bias: bool
  param_dtype: Any
  kernel_init: nn.initializers.Initializer
  bias_init: nn.initializers.Initializer

  @nn.compact
  def __call__(self, in_features: int):
    out_size = int(np.prod(self.features))

    def flat(init, flat_shape):  # As DenseGeneral: initialised as a matrix, then reshaped.
      return lambda rng, shape, dtype: jnp.reshape(init(rng, flat_shape, dtype), shape)

    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(flat(self.kernel_init, (in_features, out_size)), self.names),
        (in_features, *self.features), self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param(
          "bias", nn.with_logical_partitioning(flat(self.bias_init, (out_size,)), self.names[1:]),
          self.features, self.param_dtype)
    return kernel, bias


def _project(x_BSD, projections, dtype):
  """x through each (kernel [D, K, g, H], bias [K, g, H] or None) as one matmul: the kernels
  are joined on their g axis, so a mesh that splits K splits every one of them alike.
  Returns [B, S, K, g, H] per projection, computed as `nn.DenseGeneral` does in `dtype`."""
  kernel_DKGH = jnp.concatenate([jnp.asarray(k, dtype) for k, _ in projections], axis=2)
  x_BSD = jnp.asarray(x_BSD, dtype)
  out_BSKGH = jax.lax.dot_general(x_BSD, kernel_DKGH, (((x_BSD.ndim - 1,), (0,)), ((), ())))
  if projections[0][1] is not None:
    out_BSKGH += jnp.concatenate([jnp.asarray(b, dtype) for _, b in projections], axis=1)
  splits = np.cumsum([k.shape[2] for k, _ in projections])[:-1]
  return jnp.split(out_BSKGH, splits, axis=-2)


def _one_matmul_keeps_heads_local(num_kv_heads: int) -> bool:
  """Whether joining the query, key and value kernels keeps each device's heads on it.

  False only under a mesh that `train.engine.parallel.on_mesh` traces with heads split over more
  devices than divide the K key/value heads: the key and value kernels then stay whole while
  the query kernel is split, and joining them would gather it; the query projection runs
  apart then.
  """
  mesh, split_axes = jax.sharding.get_abstract_mesh(), attention_kernels.split_axes()
  if mesh.empty or split_axes is None:
    return True
  head_devices = int(np.prod([mesh.shape[axis] for axis in split_axes[1]]))
  return num_kv_heads % head_devices == 0
