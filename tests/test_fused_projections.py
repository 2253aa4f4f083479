"""MultiHeadAttention's query, key and value projections as one matmul: the same init, outputs
and gradients as flax's MultiHeadDotProductAttention and as separate einsums, one dot_general
where there were three, and the query's apart where a mesh splits the heads unevenly."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from models.multi_head_attention import MultiHeadAttention
from test_attention import normal, random_variables
from train.engine import parallel

B, T, S, D, N, H = 2, 5, 7, 16, 4, 8


def dot_generals(fn, *args):
  """The dot_general equations of fn's jaxpr, nested ones included."""
  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        yield eqn
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else [param]:
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            yield from walk(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            yield from walk(sub)
  return list(walk(jax.make_jaxpr(fn)(*args).jaxpr))


def separate_projections(params, x_BTD, kv_BSD, num_kv_heads, is_causal):
  """The attention written with one einsum per projection and jax.nn's attention."""
  project = lambda x, p: jnp.einsum("bsd,dkh->bskh", x, p["kernel"]) + p["bias"]
  q = project(x_BTD, params["query"])
  k, v = project(kv_BSD, params["key"]), project(kv_BSD, params["value"])
  out = jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation="xla")
  return jnp.einsum("btnh,nhd->btd", out, params["out"]["kernel"]) + params["out"]["bias"]


def assert_same_values_and_gradients(ours, reference, params, *inputs):
  loss = lambda fn: lambda params, *inputs: jnp.sum(jnp.sin(fn(params, *inputs)))
  grad = lambda fn: jax.jit(jax.value_and_grad(loss(fn), argnums=tuple(range(len(inputs) + 1))))
  (ours_value, ours_grads), (want_value, want_grads) = (
      grad(ours)(params, *inputs), grad(reference)(params, *inputs))
  np.testing.assert_allclose(ours_value, want_value, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               ours_grads, want_grads)


def test_init_equals_flax_multi_head_attention():
  """Same parameter paths, shapes and values: the kernels are initialised as DenseGeneral's."""
  x = normal(1, B, T, D)
  theirs = nn.MultiHeadDotProductAttention(num_heads=N, qkv_features=N * H)
  ours = MultiHeadAttention(num_heads=N, head_dim=H)
  want = theirs.init(jax.random.key(3), x)["params"]
  got = nn.unbox(ours.init(jax.random.key(3), x)["params"])
  jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize("cross", [False, True])
def test_outputs_and_gradients_equal_flax(cross):
  x, kv = normal(1, B, T, D), normal(2, B, S, D) if cross else None
  theirs = nn.MultiHeadDotProductAttention(num_heads=N, qkv_features=N * H)
  ours = MultiHeadAttention(num_heads=N, head_dim=H)
  params = random_variables(ours, x, kv)["params"]
  inputs = (x,) if kv is None else (x, kv)
  assert_same_values_and_gradients(
      lambda p, *inputs: ours.apply({"params": p}, *inputs),
      lambda p, *inputs: theirs.apply({"params": p}, *inputs), params, *inputs)


@pytest.mark.parametrize("num_kv_heads, cross", [(2, False), (1, False), (2, True)])
def test_grouped_query_outputs_and_gradients_equal_separate_einsums(num_kv_heads, cross):
  x, kv = normal(1, B, T, D), normal(2, B, S, D) if cross else None
  ours = MultiHeadAttention(num_heads=N, head_dim=H, num_kv_heads=num_kv_heads)
  params = random_variables(ours, x, kv)["params"]
  inputs = (x,) if kv is None else (x, kv)
  assert_same_values_and_gradients(
      lambda p, *inputs: ours.apply({"params": p}, *inputs, is_causal=not cross),
      lambda p, x, kv=None: separate_projections(p, x, x if kv is None else kv, num_kv_heads,
                                                 not cross),
      params, *inputs)


@pytest.mark.parametrize("cross", [False, True])
def test_projections_run_as_one_matmul(cross):
  """Self-attention: one matmul for Q, K and V; cross-attention: one for K and V."""
  x, kv = normal(1, B, T, D), normal(2, B, S, D) if cross else None
  ours = MultiHeadAttention(num_heads=N, head_dim=H, num_kv_heads=2, implementation="xla")
  params = random_variables(ours, x, kv)["params"]
  eqns = dot_generals(lambda p, x: ours.apply({"params": p}, x, kv), params, x)
  kernel_shapes = [eqn.invars[1].aval.shape for eqn in eqns
                   if eqn.invars[1].aval.ndim == 4 and eqn.invars[1].aval.shape[0] == D]
  # [D, K, G + 2, H] joins the query's G = N / K heads per key head to the key's and value's.
  assert kernel_shapes == ([(D, 2, 2, H), (D, 2, 2, H)] if cross else [(D, 2, 4, H)])


MESH = parallel.make_mesh({"data": 4, "tensor": 2})


@pytest.mark.parametrize("num_kv_heads", [2, 1])
def test_heads_split_unevenly_over_the_mesh_keep_the_query_projection_apart(num_kv_heads):
  """With the heads split over tensor=2, joining kernels of K=2 key heads keeps every device's
  heads on it (no all-gather in the compiled gradient); K=1 (replicated key and value kernels,
  split query kernel) runs the query projection apart from the keys' and values'."""
  x = normal(1, 4, T, D)
  ours = MultiHeadAttention(num_heads=N, head_dim=H, num_kv_heads=num_kv_heads)
  boxed = jax.eval_shape(ours.init, jax.random.key(0), x)["params"]
  params = jax.device_put(random_variables(ours, x)["params"],
                          parallel.shardings_for(boxed, MESH))
  x = jax.device_put(x, NamedSharding(MESH, PartitionSpec(("data", "fsdp"))))
  loss = parallel.on_mesh(lambda p, x: jnp.sum(ours.apply({"params": p}, x, is_causal=True)),
                          MESH)
  projections = [eqn for eqn in dot_generals(loss, params, x) if eqn.invars[1].aval.ndim >= 3
                 and eqn.invars[1].aval.shape[0] == D]
  assert len(projections) == (1 if num_kv_heads == 2 else 2)
  if num_kv_heads == 2:
    hlo = jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()
    assert "all-gather" not in hlo
