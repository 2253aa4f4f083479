"""The fused kernels' private jax APIs, on the jax installed, lowered for CUDA on this CPU.

The guards (attention_kernels._cudnn_private_api, _pallas_mha) turn a jax without an API into a
fallback, not an error, so a jax release that moves one loses the kernel silently (jax 0.12 did
so to the Pallas GPU kernel). CI runs these on jax 0.10 and on the newest jax (Python 3.12):
each kernel the guard accepts must lower to its GPU call, forward and backward.
"""

import re

import jax
import jax.numpy as jnp
import pytest

from models import attention_kernels

B, T, N, H = 2, 128, 4, 64
QKV_BTNH = jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16)
IDS_BT = jax.ShapeDtypeStruct((B, T), jnp.int32)


def custom_calls(kernel):
  """[forward's, gradient's]: the custom-call targets of kernel(q, k, v, ids), lowered for CUDA."""
  loss = lambda q, k, v, ids: kernel(q, k, v, ids).astype(jnp.float32).sum()
  found = []
  for f in (kernel, jax.grad(loss, argnums=(0, 1, 2))):
    lowered = jax.jit(f).trace(QKV_BTNH, QKV_BTNH, QKV_BTNH, IDS_BT).lower(
        lowering_platforms=("cuda",))
    found.append(re.findall(r"custom_call @(\S+?)\(", lowered.as_text()))
  return found


def test_the_cudnn_packed_layout_lowers_to_cudnns_fused_attention(monkeypatch):
  from jax._src.cudnn import fused_attention_stablehlo as fused
  # What jax probes on the device: cuDNN 9.8 on a Hopper GPU.
  monkeypatch.setattr(fused, "check_cudnn_version", lambda: 90800)
  monkeypatch.setattr(fused, "check_compute_capability", lambda capability: True)
  monkeypatch.setattr(fused, "is_cuda_compute_capability_equal", lambda capability: False)
  assert attention_kernels._cudnn_private_api() is not None, "the guard refuses this jax's API"

  def kernel(q, k, v, ids):
    with attention_kernels.segments_at_most(4):
      return attention_kernels.cudnn_packed_causal(q, k, v, ids, scale=0.125, fallback=None)
  assert custom_calls(kernel) == [["__cudnn$fmhaSoftmax"],
                                  ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"]]


def test_pallas_lowers_to_triton_where_this_jax_has_it():
  if attention_kernels._pallas_mha() is None:
    pytest.skip(attention_kernels._NO_PALLAS_MHA)
  kernel = lambda q, k, v, ids: attention_kernels.pallas_packed_causal(q, k, v, ids, scale=0.125)
  forward, backward = custom_calls(kernel)
  assert forward == ["__gpu$xla.gpu.triton"]
  assert len(backward) == 3 and set(backward) == {"__gpu$xla.gpu.triton"}  # + backward kernels
