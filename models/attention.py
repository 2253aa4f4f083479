"""Attention: boolean masks, dot-product attention on every backend, multi-head attention.

Layout is [batch, length, heads, head_dim] (BTNH) as in `jax.nn.dot_product_attention`; keys
and values may have fewer heads K than the N query heads (grouped-query attention, N % K == 0).
Boolean masks broadcast to [B, N, T, S] and True means "may attend".

Masked logits are set to a large negative *finite* number, as `jax.nn.dot_product_attention`
does, so a query row where everything is masked averages all values uniformly (no NaN). Every
implementation here follows that rule, so switching implementation never changes results
beyond floating-point rounding. (One caveat: cuDNN takes masks as an additive bias, so the
gradient *through* a fully masked row, whose output means nothing, is not zero there as it is
elsewhere; give such rows zero loss weight, as padding always has.)

Fused kernels for packed causal self-attention (cuDNN's packed layout, Pallas on GPU, splash
on TPU) live in models/attention_kernels.py; `dot_product_attention` chooses among them.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import attention_kernels
from models.errors import InputError
from models.layers import apply_rope

IMPLEMENTATIONS = ("reference", "xla", "cudnn", "pallas", "splash")
# The value jax.nn.dot_product_attention gives masked logits (computed in float32 or wider).
_MASKED_LOGIT = -0.7 * float(np.finfo(np.float32).max)

# ----------------------------------------------------------------------------------------
# Masks: boolean, True = may attend, broadcastable to [B, N, T, S].


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


# ----------------------------------------------------------------------------------------
# Dot-product attention.


def _check_qkv(query, key, value):
  if query.ndim != 4 or key.ndim != 4 or key.shape != value.shape:
    raise ValueError("Attention expects query [B, T, N, H] and key, value [B, S, K, H] of one "
                     f"shape; got query {query.shape}, key {key.shape}, value {value.shape}.")
  if query.shape[0] != key.shape[0]:
    raise ValueError(f"Query batch {query.shape[0]} differs from key batch {key.shape[0]}.")
  if query.shape[-1] != key.shape[-1]:
    raise ValueError(f"Query head_dim {query.shape[-1]} differs from key/value head_dim "
                     f"{key.shape[-1]}; project them to the same size.")
  if query.shape[2] % key.shape[2]:
    raise ValueError(f"The {query.shape[2]} query heads must be a multiple of the "
                     f"{key.shape[2]} key/value heads (grouped-query attention).")


def _as_4d(name: str, x, shape_BNTS):
  """`x` as a 4-d array broadcastable to shape_BNTS, or a clear error."""
  x = jnp.asarray(x)
  if x.ndim > 4 or any(d not in (1, full) for d, full in zip(x.shape[::-1], shape_BNTS[::-1])):
    raise ValueError(f"{name} of shape {x.shape} does not broadcast to [B, N, T, S] = "
                     f"{tuple(shape_BNTS)}.")
  return x.reshape((1,) * (4 - x.ndim) + x.shape)


def _checked_segment_mask(query_segment_ids, kv_segment_ids, B, T, S):
  """segment_mask after shape checks; kv ids default to the query's (self-attention)."""
  if query_segment_ids is None:
    raise ValueError("kv_segment_ids was given without query_segment_ids; pass both.")
  if kv_segment_ids is None:
    if T != S:
      raise ValueError(f"kv_segment_ids is needed when query ({T}) and key ({S}) lengths differ.")
    kv_segment_ids = query_segment_ids
  q_ids, kv_ids = jnp.asarray(query_segment_ids), jnp.asarray(kv_segment_ids)
  if q_ids.shape != (B, T) or kv_ids.shape != (B, S):
    raise ValueError(f"Segment ids must be [B, T] = {(B, T)} and [B, S] = {(B, S)}, got "
                     f"{q_ids.shape} and {kv_ids.shape}.")
  return segment_mask(q_ids, kv_ids)


def _cuda_capability():
  """(major, minor) of the first device if it is a CUDA GPU, else None."""
  try:
    return tuple(int(v) for v in jax.devices()[0].compute_capability.split("."))
  except (AttributeError, ValueError):
    return None


def _cudnn_problem(query, has_mask_or_bias: bool, q_len: int, kv_len: int) -> str | None:
  """Why cuDNN's fused attention (as called by jax.nn) cannot take this case; None if it can."""
  capability = _cuda_capability()
  if jax.default_backend() != "gpu" or capability is None:
    return f"it needs a CUDA GPU, and the backend is {jax.default_backend()!r}"
  if query.dtype not in (jnp.bfloat16, jnp.float16):
    return f"it needs bfloat16 or float16 inputs, got {query.dtype}"
  head_dim, max_head_dim = query.shape[-1], 256 if capability >= (9, 0) else 128
  if head_dim % 8 or head_dim > max_head_dim:
    return f"it needs head_dim a multiple of 8 and at most {max_head_dim}, got {head_dim}"
  if has_mask_or_bias and (q_len % 2 or kv_len % 2):
    return f"with a mask or bias it needs even lengths, got T={q_len}, S={kv_len}"
  return None


def _packed_problem(implementation: str, query, packed_causal: bool) -> str | None:
  """Why a packed-causal kernel ("cudnn_packed", "pallas", "splash") cannot take this case."""
  if not packed_causal:
    return ("it takes only causal self-attention (T == S) over segment ids shared by queries "
            "and keys, without a mask, bias or local window")
  platform, capability = jax.default_backend(), _cuda_capability()
  if implementation == "cudnn_packed":
    return attention_kernels.cudnn_packed_problem(query, platform, capability)
  if implementation == "pallas":
    return attention_kernels.pallas_problem(query, platform, capability)
  return attention_kernels.splash_problem(query, platform)


def _automatic_pallas_problem(query) -> str | None:
  """Why None leaves a Pallas kernel (pallas, splash) to be asked for by name; None if not."""
  if query.dtype not in (jnp.bfloat16, jnp.float16):
    return f"None picks fused kernels for bfloat16 or float16 inputs, got {query.dtype}"
  problem = attention_kernels.mesh_problem()
  if problem:
    return f"None picks a Pallas kernel on several devices only per shard of a mesh: {problem}"
  return None


# None's fused kernels for packed causal self-attention on a GPU, in order of preference, by
# the segments a row promised (attention_kernels.segments_at_most): a promise of at most M uses
# the row of the smallest key >= M; a larger promise, or none, the row of the largest key.
# benchmarks/accelerator.py times cuDNN's packed layout against Pallas at 4, 16 and 64 segments
# a row, and its table (README) is what fills this one; until a GPU has measured them, every row
# keeps cuDNN first, as None chose before it read the capacity.
PACKED_GPU_KERNELS = {
    4: ("cudnn_packed", "pallas"),
    16: ("cudnn_packed", "pallas"),
    64: ("cudnn_packed", "pallas"),
}


def packed_gpu_kernels(segments_per_row: int | None) -> tuple[str, ...]:
  """PACKED_GPU_KERNELS' row for rows promised at most `segments_per_row` (None: no promise)."""
  fitting = [key for key in PACKED_GPU_KERNELS
             if segments_per_row is not None and key >= segments_per_row]
  return PACKED_GPU_KERNELS[min(fitting) if fitting else max(PACKED_GPU_KERNELS)]


def _automatic_packed(query) -> str:
  """None's kernel for packed causal self-attention: the first fused one that can take it."""
  candidates = {"gpu": packed_gpu_kernels(attention_kernels.promised_segments()),
                "tpu": ("splash",)}
  for name in candidates.get(jax.default_backend(), ()):
    if _packed_problem(name, query, True) is None and (
        name == "cudnn_packed" or _automatic_pallas_problem(query) is None):
      return name
  return "xla"


def _select_implementation(implementation, query, *, has_mask_or_bias, q_len, kv_len,
                           return_weights, packed_causal=False, batch_shared_bias=False) -> str:
  """The implementation to run: the one asked for, or the fastest correct one for None.

  packed_causal: causal self-attention over shared segment ids and nothing else (the case of
  the fused packed kernels). batch_shared_bias: the only mask or bias is a bias [1, N, T, S].
  Besides IMPLEMENTATIONS, it returns "cudnn_packed": cuDNN's packed layout.
  """
  if implementation not in (None, *IMPLEMENTATIONS):
    raise InputError(f"Unknown attention implementation {implementation!r}; use one of "
                     f"{IMPLEMENTATIONS} or None (automatic).")
  if return_weights:
    if implementation not in (None, "reference"):
      raise ValueError(f"return_weights=True needs implementation='reference' or None, "
                       f"got {implementation!r}: only the reference path forms the weights.")
    return "reference"
  if implementation in ("pallas", "splash"):
    problem = _packed_problem(implementation, query, packed_causal)
    if problem:
      raise InputError(f"implementation={implementation!r} cannot take this case: {problem}. "
                       "Use implementation='xla' or None.")
    return implementation
  if implementation is None and packed_causal:
    return _automatic_packed(query)
  if implementation == "cudnn" and _packed_problem("cudnn_packed", query, packed_causal) is None:
    return "cudnn_packed"
  problem = _cudnn_problem(query, has_mask_or_bias, q_len, kv_len)
  if implementation == "cudnn" and problem:
    raise InputError(f"implementation='cudnn' cannot take this case: {problem}. "
                     "Use implementation='xla' or None.")
  if implementation is None:
    # A dense mask or bias reaches cuDNN as a [B, N, T, S] bias with a gradient of that size,
    # which gives up what flash attention saves; XLA is the safer default then. A bias shared
    # by the batch (T5's relative bias) stays [1, N, T, S], which cuDNN broadcasts and whose
    # gradient it computes (openxla/xla#11967), so it goes to cuDNN.
    fits_cudnn = not has_mask_or_bias or batch_shared_bias
    return "cudnn" if problem is None and fits_cudnn else "xla"
  return implementation


def _reference_weights(query_BTNH, key_BSKH, mask, bias, scale):
  """softmax(Q Kᵀ·scale + bias, masked) in float32: [B, N, T, S]."""
  B, T, N, H = query_BTNH.shape
  S, K = key_BSKH.shape[1:3]
  q_BTKGH = query_BTNH.reshape(B, T, K, N // K, H)
  logits_dtype = jnp.promote_types(query_BTNH.dtype, jnp.float32)
  logits_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, key_BSKH,
                            preferred_element_type=logits_dtype)
  logits_BNTS = logits_BKGTS.reshape(B, N, T, S) * scale
  if bias is not None:
    logits_BNTS = (logits_BNTS + bias).astype(logits_dtype)
  if mask is not None:
    logits_BNTS = jnp.where(mask, logits_BNTS, jnp.asarray(_MASKED_LOGIT, logits_dtype))
  return jax.nn.softmax(logits_BNTS.astype(jnp.float32), axis=-1)


def _weighted_values(weights_BNTS, value_BSKH):
  """Σ_s weights · values, grouped-query aware: [B, T, N, H] in the value dtype."""
  B, N, T, S = weights_BNTS.shape
  K, H = value_BSKH.shape[2:]
  weights_BKGTS = weights_BNTS.astype(value_BSKH.dtype).reshape(B, K, N // K, T, S)
  out_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", weights_BKGTS, value_BSKH)
  return out_BTKGH.reshape(B, T, N, H)


def dot_product_attention(query, key, value, *, mask=None, bias=None, is_causal=False,
                          query_segment_ids=None, kv_segment_ids=None, scale=None,
                          local_window_size=None, implementation=None, return_weights=False):
  """softmax(Q Kᵀ·scale + bias, masked) V for query [B, T, N, H], key/value [B, S, K, H].

  Args:
    mask: boolean, broadcastable to [B, N, T, S], True = may attend.
    bias: float, broadcastable to [B, N, T, S], added to the scaled logits (e.g. T5).
    is_causal: query t attends keys s <= t (top-left aligned, as `causal_mask(T, S)`).
    query_segment_ids, kv_segment_ids: [B, T], [B, S] int ids of packed sequences (see
      `segment_mask`; id 0 is padding). kv_segment_ids defaults to query_segment_ids.
    scale: multiplies Q Kᵀ; None is 1/sqrt(H).
    local_window_size: (left, right), or w for (w, w): query t attends only keys s with
      t - left <= s <= t + right (top-left aligned, as jax.nn's). It reaches every
      implementation as a mask (see `window_mask`); with is_causal, (W - 1, 0) is a sliding
      window of the last W keys (Mistral).
    implementation: "reference" (plain einsum, can return weights); "xla" or "cudnn" (through
      `jax.nn.dot_product_attention`; "cudnn" takes packed causal self-attention in its packed
      layout where it can: 16 segments a row, checked at every call, or as many as promised
      by `attention_kernels.segments_at_most`, unchecked); "pallas" (GPU) or "splash" (TPU),
      fused kernels for packed causal self-attention only (is_causal, T == S, segment ids
      shared by queries and keys, no mask, bias or window; see models/attention_kernels.py);
      or None: for bf16/fp16 packed causal self-attention, on a GPU the first kernel of
      `packed_gpu_kernels(promised segments a row)` that can run (cuDNN's packed layout on a
      Hopper GPU, Pallas), on a TPU splash (Pallas kernels on one device, or per shard of the
      mesh being traced under: see attention_kernels.per_shard), else "xla"; otherwise (causal
      self-attention without segment ids included: cuDNN's own causal mask) "cudnn" on a GPU
      for bf16/fp16 inputs without a dense mask (a bias [1, N, T, S] is fine), "xla"
      elsewhere; "reference" when return_weights=True.
    return_weights: also return the float32 weights [B, N, T, S] (reference path only).

  Key and value are cast to the query's dtype; the output has the query's dtype and shape.
  """
  query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
  _check_qkv(query, key, value)
  key, value = key.astype(query.dtype), value.astype(query.dtype)
  (B, T, N, H), S = query.shape, key.shape[1]
  shape_BNTS = (B, N, T, S)
  causal_self = (is_causal and T == S and mask is None and bias is None
                 and local_window_size is None
                 and (kv_segment_ids is None or kv_segment_ids is query_segment_ids))
  packed_causal = causal_self and query_segment_ids is not None
  if causal_self and query_segment_ids is None and implementation in ("pallas", "splash"):
    # Unpacked causal self-attention is the packed case with one segment a row.
    query_segment_ids, packed_causal = jnp.ones((B, T), jnp.int32), True
  if query_segment_ids is not None or kv_segment_ids is not None:
    mask = combine_masks(mask, _checked_segment_mask(query_segment_ids, kv_segment_ids, B, T, S))
  if local_window_size is not None:
    mask = combine_masks(mask, window_mask(T, S, local_window_size))
  mask = None if mask is None else _as_4d("mask", combine_masks(mask), shape_BNTS)
  bias = None if bias is None else _as_4d("bias", bias, shape_BNTS)
  scale = 1.0 / np.sqrt(H) if scale is None else scale

  has_mask_or_bias = mask is not None or bias is not None or (is_causal and T != S)
  batch_shared_bias = (bias is not None and bias.shape[0] == 1 and mask is None
                       and not (is_causal and T != S))
  implementation = _select_implementation(
      implementation, query, has_mask_or_bias=has_mask_or_bias, q_len=T, kv_len=S,
      return_weights=return_weights, packed_causal=packed_causal,
      batch_shared_bias=batch_shared_bias)

  if implementation == "reference":
    mask = combine_masks(mask, causal_mask(T, S) if is_causal else None)
    weights_BNTS = _reference_weights(query, key, mask, bias, scale)
    out_BTNH = _weighted_values(weights_BNTS, value).astype(query.dtype)
    return (out_BTNH, weights_BNTS) if return_weights else out_BTNH

  if implementation in ("pallas", "splash"):
    kernel = {"pallas": attention_kernels.pallas_packed_causal,
              "splash": attention_kernels.splash_packed_causal}[implementation]
    return attention_kernels.per_shard(kernel, query, key, value, query_segment_ids,
                                       scale=scale)
  if implementation == "cudnn_packed":
    xla = functools.partial(jax.nn.dot_product_attention, mask=mask, scale=scale,
                            is_causal=True, implementation="xla")
    return attention_kernels.cudnn_packed_causal(query, key, value, query_segment_ids,
                                                 scale=scale, fallback=xla)

  if implementation == "cudnn":
    # cuDNN wants mask and bias over the full [T, S]. Its causal mask is used only for T == S
    # and without a mask: under it a fully masked row averages the causal keys alone.
    if is_causal and (T != S or mask is not None):
      mask, is_causal = combine_masks(mask, causal_mask(T, S)), False
    if mask is None and bias is not None:
      # A bias alone keeps its batch dimension: cuDNN broadcasts a [1, N, T, S] bias over the
      # batch and computes its gradient at that size. It reaches cuDNN in the inputs' dtype.
      bias = jnp.broadcast_to(bias, (bias.shape[0], N, T, S)).astype(query.dtype)
    else:
      mask = None if mask is None else jnp.broadcast_to(mask, shape_BNTS)
      bias = None if bias is None else jnp.broadcast_to(bias, shape_BNTS).astype(query.dtype)
  return jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask, scale=scale,
                                      is_causal=is_causal, implementation=implementation)


# ----------------------------------------------------------------------------------------
# Multi-head attention.


class MultiHeadAttention(nn.Module):
  """Multi-head attention with grouped-query heads, RoPE, a KV cache and weight inspection.

  Parameters are laid out as flax's `MultiHeadDotProductAttention` (`query`, `key`, `value`,
  `out`), so weights copy across when num_kv_heads == num_heads. The query, key and value
  projections of self-attention run as one matmul (and the keys and values of
  cross-attention as one): their kernels are joined at apply time (see `_project`), so
  parameters, checkpoints and adapters keep the three names.

  Attention weights: when the collection "attention_weights" is mutable (and the module is
  not initializing), the reference path runs and sows the float32 weights [B, N, T, S] as
  "weights": `model.apply(variables, ..., mutable=["attention_weights"])`. Attention dropout
  (dropout_rate > 0, deterministic=False, rng "dropout") also runs the reference path.

  Sliding window (`sliding_window` W, self-attention only): a query attends only keys fewer
  than W positions away, so with is_causal (or the cache) the last W keys, itself included
  (Mistral); positions are indices in the sequence (cache slots when decoding).

  Decoding (decode=True, self-attention): the "cache" collection holds `cached_key` and
  `cached_value` [B, K, L, H] (the layout the attention products read in place, so a decoded
  token copies no cache) and a per-example `cache_index` [B]. The first call (init) creates
  them with L = the input length and computes normally. Later calls write the chunk's keys and
  values at cache_index[b] + arange(T) (in place: one `dynamic_update_slice` under
  `rows_share_cache_slot`, else a per-row scatter), let query t attend cache slots
  s <= cache_index[b] + t (and s > cache_index[b] + t - W with a sliding window; this replaces
  `is_causal`; a caller mask or bias must have S = L), take RoPE positions
  cache_index[b] + arange(T) by default, and advance cache_index by T. Writes past L are
  dropped, so queries past L see a stale cache: size L for the longest prompt + generation.
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
    cross_kv_BKSH = self._cached_cross_kv(inputs_q_BTD, inputs_kv_BSD) if cached_cross else None
    q_BTNH, k_BSKH, v_BSKH = self._queries_keys_values(inputs_q_BTD, inputs_kv_BSD,
                                                       project_kv=cross_kv_BKSH is None)

    use_cache = decode and self_attention
    if use_cache and (query_segment_ids is not None or kv_segment_ids is not None):
      raise ValueError("Segment ids are not supported with decode=True; pass a mask over the "
                       "cache (S = cache length) instead.")
    index_B = self._cache_index(q_BTNH) if use_cache else None
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
      self.variable("cache", "cached_key", lambda: _heads_first(k_BSKH))
      self.variable("cache", "cached_value", lambda: _heads_first(v_BSKH))
    window = None if self.sliding_window is None else self.sliding_window - 1
    kv_BKSH = cross_kv_BKSH  # Keys and values [B, K, S, H] as a cache holds them, or None.
    if use_cache:
      written = self._update_cache(k_BSKH, v_BSKH, index_B)
      if written is not None:
        *kv_BKSH, cache_mask_B1TL = written
        mask, is_causal, window = combine_masks(mask, cache_mask_B1TL), False, None

    use_dropout = self.dropout_rate > 0.0 and not deterministic
    sow_weights = self.is_mutable_collection("attention_weights") and not self.is_initializing()
    if (kv_BKSH is not None and not (use_dropout or sow_weights)
        and self.implementation in (None, "xla")
        and query_segment_ids is None and kv_segment_ids is None):
      x_BTNH = _attend_cache(q_BTNH, *kv_BKSH, mask=mask, bias=bias,
                             scale=self.scale, is_causal=is_causal)
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
          self.sow("attention_weights", "weights", weights_BNTS)
        if use_dropout:
          dropped_BNTS = nn.Dropout(self.dropout_rate)(weights_BNTS, deterministic=False)
          x_BTNH = _weighted_values(dropped_BNTS, v_BSKH).astype(q_BTNH.dtype)
      else:
        x_BTNH = attend(implementation=self.implementation)
    out_features = self.out_features or inputs_q_BTD.shape[-1]
    return self._dense(out_features, (-2, -1), ("heads", "head_dim", "embed"), "out")(x_BTNH)

  def _cache_index(self, q_BTNH):
    """Per-example write position [B] of an existing cache; None before the cache exists."""
    if not self.has_variable("cache", "cached_key"):
      return None
    B, T = q_BTNH.shape[:2]
    cached_key = self.get_variable("cache", "cached_key")
    cache_B, cache_len = cached_key.shape[0], cached_key.shape[2]
    if B != cache_B or T > cache_len:
      raise ValueError(f"Input batch {B} and chunk length {T} do not fit the cache "
                       f"[B={cache_B}, L={cache_len}]; re-initialise the cache.")
    return self.get_variable("cache", "cache_index")

  def _cached_cross_kv(self, inputs_q_BTD, inputs_kv_BSD):
    """The cross-attention keys and values [B, K, S, H] kept by the first decode call; None
    before it."""
    if not self.has_variable("cache", "cached_key"):
      return None
    cached_key = self.get_variable("cache", "cached_key")
    (B, S), (cache_B, cache_S) = (inputs_q_BTD.shape[0], inputs_kv_BSD.shape[1]), (
        cached_key.shape[0], cached_key.shape[2])
    if B != cache_B or S != cache_S:
      raise ValueError(f"Input batch {B} and encoded length {S} do not fit the cross-attention "
                       f"cache [B={cache_B}, S={cache_S}]; re-initialise the cache.")
    return cached_key, self.get_variable("cache", "cached_value")

  def _update_cache(self, k_BTKH, v_BTKH, index_B):
    """Writes the chunk into the cache: (keys, values [B, K, L, H], mask [B, 1, T, L]); at init
    (index_B None), creates the cache and returns None."""
    shape_BKTH = _heads_first(k_BTKH).shape
    cached_key = self.variable("cache", "cached_key", jnp.zeros, shape_BKTH, k_BTKH.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, shape_BKTH, v_BTKH.dtype)
    cache_index = self.variable("cache", "cache_index", jnp.zeros, k_BTKH.shape[:1], jnp.int32)
    if index_B is None:
      return None
    T, L = k_BTKH.shape[1], cached_key.value.shape[2]
    cached_key.value = _write_chunk(cached_key.value, _heads_first(k_BTKH), index_B)
    cached_value.value = _write_chunk(cached_value.value, _heads_first(v_BTKH), index_B)
    cache_index.value = index_B + T
    slots_L, slots_B1T1 = jnp.arange(L)[None, None, None, :], (index_B[:, None] + jnp.arange(T))[
        :, None, :, None]
    mask_B1TL = slots_L <= slots_B1T1
    if self.sliding_window is not None:
      mask_B1TL &= slots_L > slots_B1T1 - self.sliding_window
    return cached_key.value, cached_value.value, mask_B1TL


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

  False only under a mesh that `train.parallel.on_mesh` traces with heads split over more
  devices than divide the K key/value heads: the key and value kernels then stay whole while
  the query kernel is split, and joining them would gather it; the query projection runs
  apart then.
  """
  mesh, split_axes = jax.sharding.get_abstract_mesh(), attention_kernels.split_axes()
  if mesh.empty or split_axes is None:
    return True
  head_devices = int(np.prod([mesh.shape[axis] for axis in split_axes[1]]))
  return num_kv_heads % head_devices == 0


def _heads_first(x_BSKH):
  """[B, S, K, H] -> [B, K, S, H], the cache layout."""
  return jnp.swapaxes(x_BSKH, 1, 2)


# Part of jit's cache key, as attention_kernels' options are (see its module docstring).
_ROWS_SHARE_CACHE_SLOT = jax.make_user_context(False)


def rows_share_cache_slot(shared: bool = True):
  """Within it, decode=True calls promise that every row of the batch writes its chunk at the
  same cache slot, cache_index[0], and inside the cache: the write is then one
  `dynamic_update_slice`, not a per-row scatter. models/decoding.py uses it where that holds.
  It is read while tracing, and is part of jit's cache key."""
  return _ROWS_SHARE_CACHE_SLOT(bool(shared))


def _write_chunk(cache_BKLH, chunk_BKTH, index_B):
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


def _attend_cache(q_BTNH, k_BKSH, v_BKSH, *, mask, bias, scale, is_causal):
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
  if bias is not None:
    bias_BKGTS = _split_heads(_as_4d("bias", bias, (B, N, T, S)), K)
    logits_BKGTS = (logits_BKGTS + bias_BKGTS).astype(logits_dtype)
  mask = combine_masks(mask, causal_mask(T, S) if is_causal else None)
  if mask is not None:
    mask_BKGTS = _split_heads(_as_4d("mask", mask, (B, N, T, S)), K)
    logits_BKGTS = jnp.where(mask_BKGTS, logits_BKGTS, jnp.asarray(_MASKED_LOGIT, logits_dtype))
  weights_BKGTS = jax.nn.softmax(logits_BKGTS.astype(jnp.float32), axis=-1).astype(v_BKSH.dtype)
  out_BKGTH = jnp.einsum("BKGTS,BKSH->BKGTH", weights_BKGTS, v_BKSH)
  return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q_BTNH.dtype)


def _split_heads(x_bnTS, num_kv_heads):
  """A mask or bias [b, n, T, S] (n = N heads, or 1) as [b, K, N / K, T, S] (or [b, 1, 1, ...])."""
  b, n = x_bnTS.shape[:2]
  K, G = (num_kv_heads, n // num_kv_heads) if n > 1 else (1, 1)
  return x_bnTS.reshape(b, K, G, *x_bnTS.shape[2:])
