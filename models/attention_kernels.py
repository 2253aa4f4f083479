"""Fused kernels for packed causal self-attention: cuDNN's packed layout, Pallas, splash.

Each `*_packed_causal` function computes what `models.attention.dot_product_attention` does for
query [B, T, N, H], key/value [B, T, K, H], is_causal=True and one [B, T] array of segment ids
for queries and keys (id 0 = padding), up to floating-point rounding. There a padding query
attends to nothing, so it averages all values uniformly; the kernels treat padding queries
differently (cuDNN leaves them out, Pallas and splash let them attend to padding keys), so each
wrapper puts that average back, and keeps the kernel's gradients at padding positions out.

Each `*_problem` function says why its kernel cannot run on this machine or take these shapes
(None when it can). They reach jax's kernels through guarded imports and interface checks, so
a jax without them (or with another interface) gets a problem, never a wrong call; the
choice in models.attention_choice then falls back to XLA or, if the kernel was asked for by name,
raises a ValueError with the problem.

jax 0.12 removed the Pallas GPU attention with segment ids (pallas.ops.gpu.attention). Its
Mosaic GPU successor (attention_mgpu: Hopper, causal, no segment ids) cannot take packed rows,
and openxla's tokamax (Python 3.12+, jax 0.11.1+) has no segment ids in its public API: on
current jax the packed path is cuDNN's packed layout (Hopper or newer), else XLA.

cuDNN's packed layout has a fixed number of segments a row. Within `segments_at_most(M)` (set
by `train.engine.parallel.on_mesh` from the batch's capacity, `segment_capacity` of its most
segments a row) the caller promises that every row holds at most M segments and
`cudnn_packed_causal` trusts it; outside, it checks on the device.

A `pallas_call` has no partitioning rule (under jit, XLA would gather its operands onto every
device), so `per_shard` runs the Pallas and splash kernels in `shard_map` over the mesh being
traced under (jax's abstract mesh), the batch and heads split over the mesh axes `split_over`
names; `train.engine.parallel.on_mesh` sets both.

These contexts (and models.kv_cache.rows_share_cache_slot) change the traced program, so
they are jax user contexts (`jax.make_user_context`), whose values are part of jit's cache key
as the abstract mesh is: a function jitted within `segments_at_most(2)` and called outside it
(or the reverse) is traced again for the call's own options, never run with another call's
promise. Binding the options to a function instead (as `on_mesh` does for its callers) would
leave the trap open one level down: a jitted function called inside two traced functions with
different options would keep the options of the first, as its cache entry would not see them.
"""

import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from models.errors import InputError

# Without segments_at_most, rows holding more segments than this run the packed cuDNN path's
# fallback (see cudnn_packed_causal): cuDNN keeps softmax statistics of [B * this, N, T] floats.
CUDNN_SEGMENTS_PER_ROW = 16
# The segment capacities a batch of packed rows is compiled for (segment_capacity): few, so that
# a run compiles few programs; past the last one, powers of two.
SEGMENT_CAPACITIES = (4, 8, 16, 32, 64)
# cuDNN added the packed (ragged offsets) layout to flash attention in 9.6.
_CUDNN_PACKED_MIN_VERSION = 90600
SIXTEEN_BIT = (jnp.bfloat16, jnp.float16)  # cuDNN's dtypes; None picks fused kernels for these.


def _average_values_on_padding(out_BTNH, value_BSKH, segment_ids_BT):
  """out with padding queries (id 0) replaced by the mean of all values, as the reference."""
  N, K = out_BTNH.shape[2], value_BSKH.shape[2]
  mean_B1KH = jnp.mean(value_BSKH.astype(jnp.float32), axis=1, keepdims=True)
  mean_B1NH = jnp.repeat(mean_B1KH, N // K, axis=2).astype(out_BTNH.dtype)
  return jnp.where((segment_ids_BT == 0)[:, :, None, None], mean_B1NH, out_BTNH)


def _zero_padding(x_BTNH, segment_ids_BT):
  """x with padding tokens zeroed: their gradient through the kernel is then exactly zero."""
  return jnp.where((segment_ids_BT != 0)[:, :, None, None], x_BTNH, jnp.zeros((), x_BTNH.dtype))


def _repeat_kv_heads(x_BSKH, num_heads):
  """[B, S, N, H] from [B, S, K, H]: query head n reads key/value head n // (N // K)."""
  return jnp.repeat(x_BSKH, num_heads // x_BSKH.shape[2], axis=2)


# ----------------------------------------------------------------------------------------
# cuDNN, packed ("THD") layout, through jax's private fused-attention API.


def packed_segments(segment_ids_BT, max_segments: int):
  """cuDNN's packed-layout arguments from segment ids: (seqlens [B, M], offsets [B, M + 1], fits).

  A segment is a run of equal non-zero ids; row b's m-th run starts at token offsets[b, m] and
  has seqlens[b, m] tokens. Entries past a row's last run are -1 (offsets has one -1 column
  more, as jax's API asks). `fits` is a scalar bool: every row has at most M runs and no
  non-zero id comes back after another one, so the runs are exactly the groups of tokens that
  the ids' mask lets attend to each other.
  """
  ids_BT = jnp.asarray(segment_ids_BT, jnp.int32)
  B, M = ids_BT.shape[0], max_segments
  valid_BT = ids_BT != 0
  previous_BT = jnp.pad(ids_BT[:, :-1], ((0, 0), (1, 0)))
  starts_BT = valid_BT & (ids_BT != previous_BT)
  run_BT = jnp.cumsum(starts_BT, axis=1) - 1
  in_run_BTM = (run_BT[:, :, None] == jnp.arange(M)) & valid_BT[:, :, None]
  runs_B = starts_BT.sum(axis=1)
  used_BM = jnp.arange(M) < runs_B[:, None]
  seqlens_BM = jnp.where(used_BM, in_run_BTM.sum(axis=1), -1).astype(jnp.int32)
  offsets_BM = jnp.where(used_BM, jnp.argmax(in_run_BTM, axis=1), -1).astype(jnp.int32)
  offsets_BM1 = jnp.concatenate([offsets_BM, jnp.full((B, 1), -1, jnp.int32)], axis=1)
  sorted_BT = jnp.sort(ids_BT, axis=1)
  distinct_B = ((sorted_BT != jnp.pad(sorted_BT[:, :-1], ((0, 0), (1, 0))))
                & (sorted_BT != 0)).sum(axis=1)
  fits = jnp.all(runs_B <= M) & jnp.all(runs_B == distinct_B)
  return seqlens_BM, offsets_BM1, fits


def _cudnn_private_api():
  """(jax's private cuDNN attention, its padding-causal mask type, cuDNN version) or None.

  None when this jax lacks the function, its packed-layout arguments or the mask type, or
  when no cuDNN is loaded.
  """
  try:
    from jax._src.cudnn import fused_attention_stablehlo as fused
    attention, mask_type = fused.dot_product_attention, fused.MaskType.PADDING_CAUSAL
    version = fused.check_cudnn_version()
  except (ImportError, AttributeError, RuntimeError):
    return None
  needed = {"q_seqlen", "kv_seqlen", "q_offsets", "kv_offsets", "scale", "mask_type",
            "qkv_layout"}
  if not needed <= inspect.signature(attention).parameters.keys():
    return None
  return attention, mask_type, int(version)


def cudnn_packed_problem(query, platform: str, capability) -> str | None:
  """Why cuDNN's packed layout cannot take this query on this machine; None if it can."""
  if platform != "gpu" or capability is None:
    return f"it needs a CUDA GPU, and the backend is {platform!r}"
  if capability < (9, 0):
    return f"its packed layout needs a Hopper or newer GPU, got compute capability {capability}"
  if query.dtype not in SIXTEEN_BIT:
    return f"it needs bfloat16 or float16 inputs, got {query.dtype}"
  if query.shape[-1] % 8 or query.shape[-1] > 256:
    return f"it needs head_dim a multiple of 8 and at most 256, got {query.shape[-1]}"
  api = _cudnn_private_api()
  if api is None:
    return "this jax has no cuDNN attention with packed-layout arguments (or no cuDNN)"
  if api[2] < _CUDNN_PACKED_MIN_VERSION:
    return f"its packed layout needs cuDNN 9.6 or newer, got version {api[2]}"
  return None


def cudnn_packed_causal(query, key, value, segment_ids, *, scale, fallback):
  """Packed causal self-attention on cuDNN's packed layout (see the module docstring).

  The segments become cuDNN's per-row seqlens and offsets (`packed_segments`), M of them a
  row. Within `segments_at_most(M)` the ids are taken to fit, unchecked, and nothing else
  runs. Outside it, M is CUDNN_SEGMENTS_PER_ROW, and a batch whose ids do not fit (a row with
  more segments, or an id that comes back after another) runs `fallback(query, key, value)`
  instead, chosen by a `lax.cond` in the compiled program, so no batch gets a different result.

  That cond is not free on XLA GPU: its ConditionalThunk copies the predicate to the host and
  waits for the stream, once per call (at least 2 x layers a step), unless command buffers record
  conditionals (`--xla_gpu_enable_command_buffer=+CONDITIONAL` in config.train.xla_flags;
  not in XLA's default list), which decide on the device.
  """
  attention, mask_type, _ = _cudnn_private_api()
  T, N = query.shape[1:3]
  capacity = _SEGMENT_CAPACITY.value
  ids_BT = jnp.asarray(segment_ids, jnp.int32)
  # At least 2: jax's API reads M = 1 as the unpacked layout and ignores the offsets.
  seqlens_BM, offsets_BM1, fits = packed_segments(
      ids_BT, max(2, min(T, capacity or CUDNN_SEGMENTS_PER_ROW)))

  def fused(query, key, value):
    # Keys and values get all N heads: jax's packed layout strides both by the query's heads.
    q, k, v = (_zero_padding(x, ids_BT) for x in (query, key, value))
    out_BTNH = attention(q, _repeat_kv_heads(k, N), _repeat_kv_heads(v, N),
                         q_seqlen=seqlens_BM, kv_seqlen=seqlens_BM, q_offsets=offsets_BM1,
                         kv_offsets=offsets_BM1, scale=scale, mask_type=mask_type,
                         qkv_layout="BTNH")
    return _average_values_on_padding(out_BTNH, value, ids_BT)

  if capacity is not None:
    return fused(query, key, value)
  return jax.lax.cond(fits, fused, fallback, query, key, value)


def segment_capacity(segments_per_row: int) -> int:
  """The capacity to promise (segments_at_most) for rows of at most `segments_per_row`
  segments: 1 for rows of one example, else the first of SEGMENT_CAPACITIES that holds them,
  else the next power of two."""
  if segments_per_row <= 1:
    return 1
  return next((c for c in SEGMENT_CAPACITIES if c >= segments_per_row),
              1 << (segments_per_row - 1).bit_length())


# The most segments a row of segment ids holds, promised by segments_at_most; None outside it.
# Part of jit's cache key (see the module docstring).
_SEGMENT_CAPACITY = jax.make_user_context(None)


def promised_segments() -> int | None:
  """The segments a row promised by the segments_at_most in context; None outside one."""
  return _SEGMENT_CAPACITY.value


def segments_at_most(max_segments_per_row: int):
  """Within it, the caller promises that every row of segment ids passed to the attention holds
  at most `max_segments_per_row` segments, each one run of its id (grain's packing writes ids
  1, ..., k with k at most its max_sequences_per_bin), so cudnn_packed_causal needs no check
  and models.attention_choice picks its packed kernel for that capacity (PACKED_GPU_KERNELS).
  A row that breaks the promise would get a wrong result, so promise only what the data does.

  It is read when the attention is traced, and is part of jit's cache key: a jitted function
  called within it and outside it is traced (and compiled) once for each."""
  if isinstance(max_segments_per_row, bool) or not isinstance(max_segments_per_row, int) or (
      max_segments_per_row < 1):
    raise ValueError(f"max_segments_per_row must be a positive integer, got "
                     f"{max_segments_per_row!r}.")
  return _SEGMENT_CAPACITY(max_segments_per_row)


# ----------------------------------------------------------------------------------------
# Pallas on GPU (Triton): jax.experimental.pallas.ops.gpu.attention.mha with segment ids.


_NO_PALLAS_MHA = (f"jax {jax.__version__} has no Pallas GPU attention with segment ids "
                  "(jax.experimental.pallas.ops.gpu.attention, removed in jax 0.12); on a Hopper "
                  "GPU implementation='cudnn' runs packed rows fused")


def _pallas_mha():
  """(mha, BlockSizes) of jax's Pallas GPU attention if its interface is the one used here."""
  try:
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention
    mha, block_sizes = pallas_attention.mha, pallas_attention.BlockSizes
  except (ImportError, AttributeError):
    return None
  needed = {"segment_ids", "sm_scale", "causal", "block_sizes", "interpret"}
  fields = {"block_q", "block_k", "block_q_dkv", "block_kv_dkv", "block_q_dq", "block_kv_dq"}
  if not (needed <= inspect.signature(mha).parameters.keys()
          and fields <= set(getattr(block_sizes, "__dataclass_fields__", ()))):
    return None
  return mha, block_sizes


def pallas_problem(query, platform: str, capability) -> str | None:
  """Why the Pallas GPU kernel cannot take this query on this machine; None if it can."""
  if platform != "gpu" or capability is None:
    return f"it needs a CUDA GPU, and the backend is {platform!r}"
  if capability < (8, 0):
    return f"it needs an Ampere or newer GPU, got compute capability {capability}"
  if _pallas_mha() is None:
    return _NO_PALLAS_MHA
  T, H = query.shape[1], query.shape[-1]
  if not (T % 128 == 0 or T in (16, 32, 64)):
    return f"it needs a length that is a multiple of 128, or 16, 32 or 64, got T={T}"
  if not 16 <= H <= 128:
    return f"it needs head_dim from 16 to 128, got {H}"
  return None


def pallas_packed_causal(query, key, value, segment_ids, *, scale, interpret=False):
  """Packed causal self-attention in jax's Pallas (Triton) flash attention."""
  api = _pallas_mha()
  if api is None:
    raise InputError(f"implementation='pallas' cannot run: {_NO_PALLAS_MHA}. Use "
                     "implementation='cudnn', 'xla' or None.")
  mha, block_sizes = api
  T, N = query.shape[1:3]
  forward, backward = min(128, T), min(32, T)
  blocks = block_sizes(block_q=forward, block_k=forward, block_q_dkv=backward,
                       block_kv_dkv=backward, block_q_dq=backward, block_kv_dq=backward)
  ids_BT = jnp.asarray(segment_ids, jnp.int32)
  out_BTNH = mha(query, _repeat_kv_heads(key, N), _repeat_kv_heads(value, N),
                 segment_ids=ids_BT, sm_scale=scale, causal=True, block_sizes=blocks,
                 interpret=interpret)
  return _average_values_on_padding(out_BTNH, value, ids_BT)


# ----------------------------------------------------------------------------------------
# Splash attention on TPU (Pallas Mosaic), with SegmentIds and a causal mask.


def _splash():
  """jax's splash-attention module if it has what is used here, else None."""
  try:
    from jax.experimental.pallas.ops.tpu import splash_attention
  except ImportError:
    return None
  needed = ("make_splash_mha", "SegmentIds", "CausalMask", "MultiHeadMask", "BlockSizes")
  return splash_attention if all(hasattr(splash_attention, n) for n in needed) else None


def splash_problem(query, platform: str) -> str | None:
  """Why splash attention cannot take this query on this machine; None if it can."""
  if platform != "tpu":
    return f"it needs a TPU, and the backend is {platform!r}"
  if query.shape[1] % 128:
    return f"it needs a length that is a multiple of 128, got T={query.shape[1]}"
  if _splash() is None:
    return "this jax has no splash attention with segment ids"
  return None


@functools.lru_cache(maxsize=None)
def _splash_kernel(num_heads: int, length: int, interpret: bool):
  """The splash kernel for causal attention over `length` tokens with `num_heads` query heads."""
  splash = _splash()
  block = next(b for b in (512, 256, 128, length) if length % b == 0)
  blocks = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                             block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                             block_q_dq=block, block_kv_dq=block)
  mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * num_heads)
  extra = {"interpret": True} if interpret else {}
  with jax.ensure_compile_time_eval():  # Its mask tables are constants, cached across traces.
    return splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=blocks,
                                  **extra)


def splash_packed_causal(query, key, value, segment_ids, *, scale, interpret=False):
  """Packed causal self-attention in splash attention (grouped-query heads native)."""
  splash = _splash()
  T, N = query.shape[1:3]
  kernel = _splash_kernel(N, T, interpret)
  ids_BT = jnp.asarray(segment_ids, jnp.int32)
  # Splash does not scale the logits: the query carries the scale.
  q_BNTH = (query.astype(jnp.float32) * scale).astype(query.dtype).transpose(0, 2, 1, 3)
  k_BKTH, v_BKTH = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)
  out_BNTH = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, splash.SegmentIds(q=ids, kv=ids)))(
      q_BNTH, k_BKTH, v_BKTH, ids_BT)
  return _average_values_on_padding(out_BNTH.transpose(0, 2, 1, 3), value, ids_BT)


# ----------------------------------------------------------------------------------------
# Running a kernel on each device's shard of the mesh in context.


# (batch axes, head axes) of the mesh for per_shard: set by split_over, None outside it. Part of
# jit's cache key, as the abstract mesh is (see the module docstring).
_SPLIT_AXES = jax.make_user_context(None)


def split_over(batch_axes, head_axes):
  """Within it, per_shard splits the batch over mesh axes `batch_axes` and the heads over
  `head_axes` (each a mesh axis name, a tuple of them, or None). Part of jit's cache key."""
  as_tuple = lambda axes: () if axes is None else (axes,) if isinstance(axes, str) else tuple(
      axes)
  return _SPLIT_AXES((as_tuple(batch_axes), as_tuple(head_axes)))


def split_axes():
  """(batch axes, head axes) set by the innermost split_over, as tuples; None outside it."""
  return _SPLIT_AXES.value


def _splitting_mesh():
  """The abstract mesh being traced under if it has several devices and none yet manual."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or mesh.manual_axes:
    return None
  return mesh


def mesh_problem() -> str | None:
  """Why a Pallas kernel would see whole operands on each of several devices; None if not."""
  mesh = jax.sharding.get_abstract_mesh()
  if jax.device_count() == 1 or mesh.manual_axes or mesh.size == 1:
    return None
  if mesh.empty:
    return (f"there are {jax.device_count()} devices and no mesh in context (trace under "
            "jax.sharding.use_abstract_mesh, as train.engine.parallel.on_mesh does), so XLA would "
            "gather its operands onto each device")
  if _SPLIT_AXES.value is None:
    return ("the mesh in context comes without the axes to split the batch and heads over "
            "(attention_kernels.split_over), so its operands would not be split")
  return None


def _dividing(axes: tuple, size: int, mesh):
  """The longest prefix of mesh `axes` whose sizes multiply to a divisor of `size`, or None."""
  while axes and size % math.prod(mesh.shape[axis] for axis in axes):
    axes = axes[:-1]
  return axes or None


def per_shard(kernel, query, key, value, segment_ids, **kwargs):
  """kernel(query, key, value, segment_ids, **kwargs), on each device's shard of the mesh.

  Under a mesh of several devices (see `mesh_problem`) it runs in `shard_map`: query, key and
  value [B, T, *, H] split P(batch axes, None, head axes, None), the ids [B, T] P(batch axes,
  None), with the axes of `split_over`, as many as divide B and the key/value heads K.
  Without such a mesh it calls kernel.
  """
  mesh, axes = _splitting_mesh(), _SPLIT_AXES.value
  if mesh is None or axes is None:
    return kernel(query, key, value, segment_ids, **kwargs)
  batch = _dividing(axes[0], query.shape[0], mesh)
  heads = _dividing(axes[1], key.shape[2], mesh)
  qkv_spec, ids_spec = PartitionSpec(batch, None, heads, None), PartitionSpec(batch, None)
  # check_vma=False: jax's Pallas attention fails shard_map's varying-axes check (its pads).
  return jax.shard_map(functools.partial(kernel, **kwargs), mesh=mesh,
                       in_specs=(qkv_spec, qkv_spec, qkv_spec, ids_spec), out_specs=qkv_spec,
                       check_vma=False)(query, key, value, jnp.asarray(segment_ids, jnp.int32))
