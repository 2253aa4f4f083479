"""Which implementation runs a `dot_product_attention` call: each path's limits, and None's pick.

`select_implementation` takes the one asked for, or for None the fastest that gives the same
result; the fused kernels' own limits are checked in models/attention_kernels.py.
"""

import jax

from models import attention_kernels
from models.errors import InputError

IMPLEMENTATIONS = ("reference", "xla", "cudnn", "pallas", "splash")


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
  if query.dtype not in attention_kernels.SIXTEEN_BIT:
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
  if query.dtype not in attention_kernels.SIXTEEN_BIT:
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


def select_implementation(implementation, query, *, has_mask_or_bias, q_len, kv_len,
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
