"""Dot-product attention on every backend: `dot_product_attention` and its reference path.

Layout is [batch, length, heads, head_dim] (BTNH) as in `jax.nn.dot_product_attention`; keys
and values may have fewer heads K than the N query heads (grouped-query attention, N % K == 0).
Boolean masks (models/masks.py) broadcast to [B, N, T, S] and True means "may attend".

Masked logits are set to a large negative *finite* number, as `jax.nn.dot_product_attention`
does, so a query row where everything is masked averages all values uniformly (no NaN). Every
implementation here follows that rule, so switching implementation never changes results
beyond floating-point rounding. (One caveat: cuDNN takes masks as an additive bias, so the
gradient *through* a fully masked row, whose output means nothing, is not zero there as it is
elsewhere; give such rows zero loss weight, as padding always has.)

models/attention_choice.py picks the implementation; the fused kernels for packed causal
self-attention (cuDNN's packed layout, Pallas on GPU, splash on TPU) live in
models/attention_kernels.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from models import attention_choice, attention_kernels
from models.masks import causal_mask, combine_masks, segment_mask, window_mask

# The value jax.nn.dot_product_attention gives masked logits (computed in float32 or wider).
_MASKED_LOGIT = -0.7 * float(np.finfo(np.float32).max)


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


def as_4d(name: str, x, shape_BNTS):
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


def _reference_weights(query_BTNH, key_BSKH, mask, bias, scale):
  """softmax(Q Kᵀ·scale + bias, masked) in float32: [B, N, T, S]."""
  B, T, N, H = query_BTNH.shape
  S, K = key_BSKH.shape[1:3]
  q_BTKGH = query_BTNH.reshape(B, T, K, N // K, H)
  logits_dtype = jnp.promote_types(query_BTNH.dtype, jnp.float32)
  logits_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, key_BSKH,
                            preferred_element_type=logits_dtype)
  return masked_softmax(logits_BKGTS.reshape(B, N, T, S) * scale, mask=mask, bias=bias)


def masked_softmax(logits, *, mask, bias):
  """softmax(logits + bias) over the last axis in float32, masked logits set to the finite
  number jax.nn gives them; mask and bias broadcast to logits, or are None."""
  if bias is not None:
    logits = (logits + bias).astype(logits.dtype)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.asarray(_MASKED_LOGIT, logits.dtype))
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def weighted_values(weights_BNTS, value_BSKH):
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
      `attention_choice.packed_gpu_kernels(promised segments a row)` that can run (cuDNN's
      packed layout on a Hopper GPU, Pallas), on a TPU splash (Pallas kernels on one device,
      or per shard of the mesh being traced under: see attention_kernels.per_shard), else
      "xla"; otherwise (causal self-attention without segment ids included: cuDNN's own
      causal mask) "cudnn" on a GPU for bf16/fp16 inputs without a dense mask (a bias
      [1, N, T, S] is fine), "xla" elsewhere; "reference" when return_weights=True.
    return_weights: also return the float32 weights [B, N, T, S] (reference path only).

  Two options of the fused kernels come from context managers, not arguments (read while
  tracing, and part of jit's cache key; `train.engine.parallel.on_mesh` sets both for its callers):
    `attention_kernels.segments_at_most(M)`: every row of segment ids holds at most M
      segments, a promise that cuDNN's packed layout trusts unchecked and that picks None's
      row of `attention_choice.PACKED_GPU_KERNELS`.
    `attention_kernels.split_over(batch_axes, head_axes)`: the mesh axes that the Pallas and
      splash kernels split the batch and heads over (without it, under a mesh of several
      devices, None does not pick them).

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
  mask = None if mask is None else as_4d("mask", combine_masks(mask), shape_BNTS)
  bias = None if bias is None else as_4d("bias", bias, shape_BNTS)
  scale = 1.0 / np.sqrt(H) if scale is None else scale

  has_mask_or_bias = mask is not None or bias is not None or (is_causal and T != S)
  batch_shared_bias = (bias is not None and bias.shape[0] == 1 and mask is None
                       and not (is_causal and T != S))
  implementation = attention_choice.select_implementation(
      implementation, query, has_mask_or_bias=has_mask_or_bias, q_len=T, kv_len=S,
      return_weights=return_weights, packed_causal=packed_causal,
      batch_shared_bias=batch_shared_bias)

  if implementation == "reference":
    mask = combine_masks(mask, causal_mask(T, S) if is_causal else None)
    weights_BNTS = _reference_weights(query, key, mask, bias, scale)
    out_BTNH = weighted_values(weights_BNTS, value).astype(query.dtype)
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
