"""The Pallas and splash kernels on a mesh of the 8 host devices: run per shard, as on one device.

A `pallas_call` has no partitioning rule, so under jit with sharded inputs XLA would gather its
operands onto every device; traced under `train.engine.parallel.on_mesh`, the kernels run in
shard_map on each device's shard instead. Kernels run in Pallas interpret mode.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from experiments import gpt2_small
from models import attention, attention_choice, attention_kernels
from test_attention import random_qkv
from test_attention_kernels import (NEEDS_PALLAS_MHA, check_kernel, choose,  # noqa: F401
                                    loss_weights, machine, packed_ids)
from train.engine import loop, parallel

MESH = parallel.make_mesh({"data": 4, "tensor": 2})
BTNH = NamedSharding(MESH, PartitionSpec(("data", "fsdp"), None, "tensor", None))
BT = NamedSharding(MESH, PartitionSpec(("data", "fsdp"), None))


def sharded_kernel(kernel):
  """kernel(q, k, v, ids, scale=) through per_shard, its inputs placed on MESH as in training."""
  def run(q, k, v, ids, scale):
    q, k, v = (jax.lax.with_sharding_constraint(x, BTNH) for x in (q, k, v))
    ids = jax.lax.with_sharding_constraint(jnp.asarray(ids), BT)
    return parallel.on_mesh(attention_kernels.per_shard, MESH)(kernel, q, k, v, ids, scale=scale)
  return run


def all_gathers(kernel, q, k, v, ids):
  """The compiled forward-and-backward program's all-gather instructions, as text lines."""
  run = sharded_kernel(kernel)
  loss = lambda q, k, v: jnp.sum(loss_weights(q.shape) * run(q, k, v, ids, scale=0.3))
  placed = [jax.device_put(x, BTNH) for x in (q, k, v)]
  hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*placed).compile().as_text()
  return [line for line in hlo.splitlines() if "all-gather" in line]


KERNELS = {
    "pallas": (functools.partial(attention_kernels.pallas_packed_causal, interpret=True),
               dict(B=4, T=16, N=4, K=2, H=16)),
    "splash": (functools.partial(attention_kernels.splash_packed_causal, interpret=True),
               dict(B=4, T=128, N=2, K=2, H=8)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param("pallas", marks=NEEDS_PALLAS_MHA), "splash"])
def test_kernels_on_a_mesh_match_reference_per_shard(name):
  kernel, s = KERNELS[name]
  ids = packed_ids(np.random.default_rng(20), s["B"], s["T"], max_segments=3)
  q, k, v = random_qkv(21, s["B"], s["T"], s["T"], s["N"], s["K"], s["H"])
  check_kernel(sharded_kernel(kernel), q, k, v, ids, scale=0.3)
  assert all_gathers(kernel, q, k, v, ids) == []


@pytest.mark.slow
@NEEDS_PALLAS_MHA
def test_train_step_on_a_mesh_runs_pallas_per_shard_as_xla(tmp_path, monkeypatch):
  """A tiny GPT-2 step on data=4 x tensor=2: Pallas (interpreted, per shard) equals XLA.

  Plain SGD, so the new parameters are the old ones minus lr x gradients (Adam's first step,
  lr x sign(gradient), would magnify rounding in near-zero gradients).
  """
  monkeypatch.setattr(attention_choice, "_packed_problem", lambda *args: None)
  monkeypatch.setattr(attention_kernels, "pallas_packed_causal", functools.partial(
      attention_kernels.pallas_packed_causal, interpret=True))
  rows, length = 8, 64
  rng = np.random.default_rng(22)
  ids = packed_ids(rng, rows, length, max_segments=3)
  positions = np.zeros_like(ids)  # counting from 0 at each segment's first token
  for t in range(1, length):
    positions[:, t] = np.where(ids[:, t] == ids[:, t - 1], positions[:, t - 1] + 1, 0)
  batch = {"inputs": rng.integers(3, 200, (rows, length), dtype=np.int32),
           "targets": rng.integers(3, 200, (rows, length), dtype=np.int32),
           "segment_ids": ids, "positions": positions,
           "weights": (ids > 0).astype(np.float32)}
  results = {}
  for implementation in ("xla", "pallas"):
    config = gpt2_small.get_config("tiny")
    config.mesh.data, config.mesh.tensor = 4, 2
    config.model.attention_implementation = implementation
    config.optim.optimizer, config.optim.weight_decay = "sgd", 0.0
    exp = loop.build(config, str(tmp_path))
    state, shardings = loop.init_state(exp, jax.random.key(0))
    step = loop.jit_train_step(exp, shardings)
    placed = parallel.host_to_global(batch, exp.mesh)
    if implementation == "pallas":
      assert [line for line in step.lower(state, placed).compile().as_text().splitlines()
              if "all-gather" in line and "mha" in line] == []
    new_state, sums = step(state, placed)
    results[implementation] = jax.device_get((new_state.params, sums))
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=2e-5, rtol=2e-5),
               results["pallas"], results["xla"])


def test_pallas_without_its_kernel_is_a_clear_error_per_shard(monkeypatch):
  """On a jax without the Pallas GPU kernel (0.12), "pallas" run per shard of a mesh (its
  selection bypassed, as on a GPU where it passed) names what is missing."""
  monkeypatch.setattr(attention_choice, "_packed_problem", lambda *args: None)
  monkeypatch.setattr(attention_kernels, "_pallas_mha", lambda: None)
  q = jnp.zeros((8, 16, 4, 16), jnp.bfloat16)
  run = parallel.on_mesh(lambda q: attention.dot_product_attention(
      q, q, q, is_causal=True, implementation="pallas"), MESH)
  with pytest.raises(ValueError, match=r"'pallas' cannot run: jax \S+ has no Pallas GPU"):
    jax.eval_shape(run, q)


@pytest.mark.parametrize("B, N, K, local", [(8, 4, 2, ((2, 5, 2, 3), (2, 5, 1, 3), (2, 5))),
                                            (8, 6, 3, ((2, 5, 6, 3), (2, 5, 3, 3), (2, 5))),
                                            (2, 4, 2, ((2, 5, 2, 3), (2, 5, 1, 3), (2, 5)))])
def test_per_shard_splits_what_the_mesh_axes_divide(B, N, K, local):
  """data=4 x tensor=2: the batch over data (if 4 | B), heads over tensor (if 2 | K)."""
  seen = []
  def kernel(q, k, v, ids):
    seen.append((q.shape, k.shape, ids.shape))
    return q
  q, kv, ids = jnp.zeros((B, 5, N, 3)), jnp.zeros((B, 5, K, 3)), jnp.ones((B, 5), jnp.int32)
  run = parallel.on_mesh(functools.partial(attention_kernels.per_shard, kernel), MESH)
  assert jax.eval_shape(run, q, kv, kv, ids).shape == q.shape
  assert seen == [local]
  seen.clear()
  jax.eval_shape(functools.partial(attention_kernels.per_shard, kernel), q, kv, kv, ids)
  assert seen == [(q.shape, kv.shape, ids.shape)]  # no mesh in context: the whole arrays


def test_none_picks_pallas_and_splash_on_several_devices_only_under_a_mesh(machine):
  q = jnp.zeros((8, 128, 12, 64), jnp.bfloat16)  # GPT-2's heads
  on_mesh = lambda mesh: parallel.on_mesh(lambda: choose(None, q), mesh)()
  for platform, capability, fused in (("gpu", (8, 0), "pallas"), ("tpu", None, "splash")):
    machine(platform, capability, devices=8)
    assert choose(None, q) == "xla"
    assert "no mesh in context" in attention_choice._automatic_pallas_problem(q)
    assert on_mesh(MESH) == fused
    assert on_mesh(parallel.make_mesh({"fsdp": 8})) == fused
    with jax.sharding.use_abstract_mesh(MESH.abstract_mesh):
      assert choose(None, q) == "xla"  # a mesh, but no axes to split the batch and heads over
    assert on_mesh(parallel.make_mesh(devices=jax.devices()[:1])) == fused
