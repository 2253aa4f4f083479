"""Kernel options set by context are part of jit's cache key: no call runs another's promise.

attention_kernels.segments_at_most and split_over, and kv_cache.rows_share_cache_slot, are
read while a function is traced. Each test builds one jitted function and calls it within an
option and without it (or within another): each call must run the program traced for its own.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention, attention_kernels, kv_cache
from test_segment_capacity import cudnn_calls, on_a_hopper_gpu  # noqa: F401
from train.engine import parallel

B, T, N, H = 2, 64, 4, 64
QKV_BTNH = jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16)
IDS_BT = jax.ShapeDtypeStruct((B, T), jnp.int32)


def packed_attention_loss(q, k, v, ids):
  out = attention.dot_product_attention(q, k, v, is_causal=True, query_segment_ids=ids,
                                        kv_segment_ids=ids)
  return out.astype(jnp.float32).sum()


@pytest.mark.parametrize("promised_first", [True, False], ids=["promised-first", "plain-first"])
def test_one_jitted_attention_lowers_for_each_calls_own_promise(on_a_hopper_gpu,
                                                                promised_first):
  """The issue's trap, lowered for CUDA: a gradient step jitted once, traced within
  segments_at_most(4) and outside it. Within, cuDNN's packed layout holds 4 segments a row
  (softmax statistics [B * 4, N, T]) and nothing checks them; outside, 16 a row behind a cond
  that checks the ids."""
  step = jax.jit(jax.grad(packed_attention_loss, argnums=(0, 1, 2)))

  def cuda_text(promised: bool) -> str:
    with attention_kernels.segments_at_most(4) if promised else contextlib.nullcontext():
      traced = on_a_hopper_gpu(step, QKV_BTNH, QKV_BTNH, QKV_BTNH, IDS_BT)
    return traced.lower(lowering_platforms=("cuda",)).as_text()

  order = (True, False) if promised_first else (False, True)
  text = {promised: cuda_text(promised) for promised in order}
  assert cudnn_calls(text[True]) == [("PADDING_CAUSAL", f"tensor<{B * 4}x{N}x{T}xf32>")]
  assert cudnn_calls(text[False]) == [
      ("PADDING_CAUSAL",
       f"tensor<{B * attention_kernels.CUDNN_SEGMENTS_PER_ROW}x{N}x{T}xf32>")]
  assert "stablehlo.case" not in text[True] and "stablehlo.case" in text[False]


def test_a_jitted_function_runs_the_promise_of_each_call():
  """Called within segments_at_most(2), outside it, within 3, then 2 again: each call runs the
  program traced for its own promise (it returns the promise it was traced with)."""
  promise = jax.jit(lambda x: x + (attention_kernels.promised_segments() or 0))
  zero = jnp.int32(0)
  for capacity in (2, None, 3, 2, None):
    with attention_kernels.segments_at_most(capacity) if capacity else contextlib.nullcontext():
      assert promise(zero) == (capacity or 0)


def test_a_jitted_function_inside_two_splits_of_one_mesh_lowers_each_ones():
  """The nested form of the trap: one jitted function called inside functions traced on the
  same mesh (so the same abstract mesh in jit's key), the batch split over "data" by one and
  whole in the other. Each lowers its own split: shards of 1 row, or of all 8."""
  identity = lambda q, k, v, ids: q
  per_shard = jax.jit(functools.partial(attention_kernels.per_shard, identity))
  mesh = parallel.make_mesh({"data": 8})
  q = jax.ShapeDtypeStruct((8, 4, 2, 2), jnp.float32)
  ids = jax.ShapeDtypeStruct((8, 4), jnp.int32)
  whole_batch = parallel.logical_rules({"batch": None})
  for rules, split in ((parallel.DEFAULT_RULES, True), (whole_batch, False),
                       (parallel.DEFAULT_RULES, True)):
    run = jax.jit(parallel.on_mesh(lambda q, ids: per_shard(q, q, q, ids), mesh, rules))
    text = run.trace(q, ids).lower().as_text()
    assert ("tensor<1x4x2x2xf32>" in text) == split


def test_a_jitted_cache_write_runs_the_promise_of_each_call():
  """write_chunk jitted once: within rows_share_cache_slot() every row writes at row 0's slot
  (one dynamic_update_slice; the promise is broken here on purpose, to see which program ran);
  outside it, each row at its own slot, as numpy writes them."""
  cache_BKLH = np.zeros((2, 1, 4, 1), np.float32)
  chunk_BKTH = np.array([1.0, 2.0], np.float32).reshape(2, 1, 1, 1)
  index_B = np.array([0, 2], np.int32)
  write = jax.jit(kv_cache.write_chunk)
  own_slots, shared_slot = cache_BKLH.copy(), cache_BKLH.copy()
  own_slots[0, 0, 0], own_slots[1, 0, 2] = 1.0, 2.0
  shared_slot[0, 0, 0], shared_slot[1, 0, 0] = 1.0, 2.0
  for shared, expected in ((True, shared_slot), (False, own_slots), (True, shared_slot)):
    with kv_cache.rows_share_cache_slot() if shared else contextlib.nullcontext():
      np.testing.assert_array_equal(write(cache_BKLH, chunk_BKTH, index_B), expected)
