"""Attention against a float64 numpy attention, jax.nn.dot_product_attention and flax.linen."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from models import attention, attention_choice
from models.attention import dot_product_attention
from models.masks import causal_mask, combine_masks, padding_mask, segment_mask, window_mask
from models.multi_head_attention import MultiHeadAttention

ON_GPU = jax.default_backend() == "gpu"
IMPLEMENTATIONS = ["reference", "xla"] + (["cudnn"] if ON_GPU else [])
# jax.nn.dot_product_attention's value for masked logits (large, negative, finite).
MASKED_LOGIT = -0.7 * np.finfo(np.float32).max


def numpy_attention(q, k, v, mask=None, bias=None, scale=None):
  """Float64 softmax attention with grouped-query heads: (out [B,T,N,H], weights [B,N,T,S])."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
  logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64)
  if mask is not None:
    logits = np.where(mask, logits, MASKED_LOGIT)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", weights, v), weights


def normal(seed, *shape, dtype=jnp.float32):
  """Standard normal test input (numpy's generator: no compile per shape)."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def random_qkv(seed, B, T, S, N, K, H, dtype=jnp.float32):
  return (normal(seed, B, T, N, H, dtype=dtype), normal(seed + 1, B, S, K, H, dtype=dtype),
          normal(seed + 2, B, S, K, H, dtype=dtype))


def random_variables(module, *args, **kwargs):
  """Variables of module.init's shapes: random params (numpy: nothing to compile), zero rest."""
  shapes = nn.unbox(jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.key(0),
                                   *args))
  rng = np.random.default_rng(0)
  fill = lambda collection, s: (jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype)
                                if collection == "params" else jnp.zeros(s.shape, s.dtype))
  return {c: jax.tree.map(functools.partial(fill, c), tree) for c, tree in shapes.items()}


def apply(module, variables, *args, **kwargs):
  """module.apply, compiled once (eager mode would compile every op of it)."""
  return jax.jit(functools.partial(module.apply, **kwargs))(variables, *args)


def random_case(case, B, T, S, N, seed=0):
  """Keyword arguments for our function, and the same case as (numpy mask, bias, is_causal)."""
  rng = np.random.default_rng(seed)
  kwargs, mask, bias = {}, np.ones((B, 1, T, S), bool), None
  if case in ("causal", "everything"):
    kwargs["is_causal"] = True
    mask &= np.tril(np.ones((T, S), bool))
  if case in ("padding", "everything"):
    q_valid = np.arange(T)[None] < rng.integers(0, T + 1, B)[:, None]  # may pad whole rows
    kv_valid = np.arange(S)[None] < rng.integers(1, S + 1, B)[:, None]
    kwargs["mask"] = padding_mask(q_valid, kv_valid)
    mask &= q_valid[:, None, :, None] & kv_valid[:, None, None, :]
  if case == "segments":
    q_ids, kv_ids = rng.integers(0, 3, (B, T)), rng.integers(0, 3, (B, S))
    kwargs.update(query_segment_ids=q_ids, kv_segment_ids=kv_ids)
    mask &= (q_ids[:, None, :, None] == kv_ids[:, None, None, :]) & (q_ids[:, None, :, None] > 0)
  if case in ("window", "everything"):  # keys from 2 before to 1 after (top-left aligned)
    kwargs["local_window_size"] = (2, 1)
    offset = np.arange(S)[None, :] - np.arange(T)[:, None]
    mask &= (offset >= -2) & (offset <= 1)
  if case in ("bias", "everything"):
    bias = rng.normal(size=(1, N, T, S)).astype(np.float32)
    kwargs["bias"] = bias
  if case in ("scale", "everything"):
    kwargs["scale"] = 0.3
  return kwargs, mask, bias


SHAPES = [  # B, T, S, N, K, H
    (2, 5, 5, 4, 4, 8),  # multi-head
    (1, 3, 7, 4, 2, 16),  # grouped-query, T < S
    (2, 6, 4, 6, 1, 8),  # multi-query, T > S
    (3, 1, 9, 2, 2, 4),  # one query (a decoding step)
]
CASES = ["plain", "causal", "padding", "segments", "window", "bias", "scale", "everything"]


# --------------------------------------------------------------------------------------
# Masks.


def test_mask_helpers_match_numpy():
  np.testing.assert_array_equal(causal_mask(3), np.tril(np.ones((3, 3), bool))[None, None])
  np.testing.assert_array_equal(causal_mask(2, 5, offset=3),
                                np.tril(np.ones((2, 5), bool), k=3)[None, None])
  q_valid, kv_valid = np.array([[1, 1, 0]]), np.array([[1, 0]])
  np.testing.assert_array_equal(padding_mask(q_valid, kv_valid),
                                [[[[True, False], [True, False], [False, False]]]])
  assert padding_mask(q_valid, None).shape == (1, 1, 3, 1)
  assert padding_mask(None, None) is None
  np.testing.assert_array_equal(window_mask(3, 4, (1, 0)), [[[[1, 0, 0, 0], [1, 1, 0, 0],
                                                                [0, 1, 1, 0]]]])
  np.testing.assert_array_equal(window_mask(2, 3, 1), [[[[1, 1, 0], [1, 1, 1]]]])
  ids = np.array([[1, 1, 2, 0]])
  expected = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(segment_mask(ids, ids)[0, 0], expected)
  assert combine_masks(None, None) is None
  np.testing.assert_array_equal(combine_masks(causal_mask(3), None, segment_mask(ids[:, :3],
                                                                                 ids[:, :3])),
                                np.tril(expected[:3, :3])[None, None])


# --------------------------------------------------------------------------------------
# dot_product_attention against numpy float64 and jax.nn.


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_numpy_and_jax_nn(case, shape):
  B, T, S, N, K, H = shape
  q, k, v = random_qkv(1, *shape)
  kwargs, mask, bias = random_case(case, B, T, S, N)
  expected, _ = numpy_attention(q, k, v, mask=mask, bias=bias, scale=kwargs.get("scale"))

  @jax.jit
  def all_implementations(q, k, v):
    theirs = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask,
                                          scale=kwargs.get("scale"))
    ours = {impl: dot_product_attention(q, k, v, implementation=impl, **kwargs)
            for impl in ["reference", "xla"]}
    return theirs, ours

  theirs, ours = all_implementations(q, k, v)
  for implementation, out in ours.items():
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5, err_msg=implementation)
    np.testing.assert_allclose(out, theirs, atol=2e-6, rtol=2e-6, err_msg=implementation)


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_gradients_match_jax_nn_and_finite_differences(implementation):
  B, T, S, N, K, H = 2, 4, 6, 4, 2, 8
  q, k, v = random_qkv(2, B, T, S, N, K, H)
  kwargs, mask, bias = random_case("everything", B, T, S, N, seed=3)
  cotangent = normal(4, *q.shape)

  def loss(fn, q, k, v, bias):
    return jnp.sum(fn(q, k, v, bias) * cotangent)

  ours = jax.jit(lambda q, k, v, bias: dot_product_attention(
      q, k, v, bias=bias, mask=kwargs["mask"], is_causal=True, scale=0.3,
      local_window_size=kwargs["local_window_size"], implementation=implementation))
  theirs = lambda q, k, v, bias: jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask,
                                                              scale=0.3)
  grads = jax.jit(jax.grad(functools.partial(loss, ours), argnums=(0, 1, 2, 3)))(q, k, v, bias)
  expected = jax.jit(jax.grad(functools.partial(loss, theirs), argnums=(0, 1, 2, 3)))(q, k, v,
                                                                                      bias)
  for g, e in zip(grads, expected):
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5)
  check_grads(ours, (q, k, v, jnp.asarray(bias)), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)


def test_fully_masked_rows_average_uniformly_everywhere():
  B, T, S, N, K, H = 2, 3, 5, 2, 1, 8
  q, k, v = random_qkv(5, B, T, S, N, K, H)
  mask = np.ones((B, 1, T, S), bool)
  mask[0, :, 1] = False  # query 1 of example 0 may attend nothing
  expected = np.repeat(np.asarray(v).mean(axis=1, keepdims=True), N // K, axis=2)[0, 0]
  for implementation in IMPLEMENTATIONS:
    dtype = jnp.bfloat16 if implementation == "cudnn" else jnp.float32
    attend = lambda q: dot_product_attention(q, k.astype(dtype), v.astype(dtype), mask=mask,
                                             implementation=implementation)
    out, vjp = jax.vjp(jax.jit(attend), q.astype(dtype))
    (grads,) = vjp(jnp.ones_like(out))
    np.testing.assert_allclose(np.asarray(out[0, 1], np.float32), expected,
                               atol=2e-2 if dtype == jnp.bfloat16 else 1e-6)
    assert np.all(np.isfinite(np.asarray(grads, np.float32)))
    if implementation != "cudnn":  # cuDNN masks by bias: see the module docstring
      np.testing.assert_array_equal(np.asarray(grads[0, 1], np.float32), 0)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_return_weights_are_the_numpy_softmax(shape):
  B, T, S, N, K, H = shape
  q, k, v = random_qkv(6, *shape)
  kwargs, mask, bias = random_case("everything", B, T, S, N, seed=7)
  attend = lambda q, k, v, **extra: dot_product_attention(q, k, v, **kwargs, **extra)
  (out, weights), plain = jax.jit(lambda q, k, v: (
      attend(q, k, v, return_weights=True), attend(q, k, v, implementation="reference")))(q, k, v)
  expected_out, expected_weights = numpy_attention(q, k, v, mask, bias, kwargs["scale"])
  assert weights.shape == (B, N, T, S) and weights.dtype == jnp.float32
  np.testing.assert_allclose(weights.sum(-1), 1, atol=1e-6)
  np.testing.assert_allclose(weights, expected_weights, atol=1e-6)
  np.testing.assert_allclose(out, expected_out, atol=2e-5, rtol=2e-5)
  np.testing.assert_array_equal(out, plain)


def test_automatic_choice_and_cudnn_conditions(monkeypatch):
  q = jnp.zeros((1, 4, 2, 64), jnp.bfloat16)
  choose = functools.partial(attention_choice.select_implementation, q_len=4, kv_len=4,
                             return_weights=False)
  assert choose(None, q, has_mask_or_bias=False, return_weights=True) == "reference"
  if not ON_GPU:
    assert choose(None, q, has_mask_or_bias=False) == "xla"
    with pytest.raises(ValueError, match="CUDA GPU"):
      choose("cudnn", q, has_mask_or_bias=False)
  # The decision table as on an H100, checked without one.
  monkeypatch.setattr(attention_choice.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(attention_choice, "_cuda_capability", lambda: (9, 0))
  assert choose(None, q, has_mask_or_bias=False) == "cudnn"
  assert choose(None, q, has_mask_or_bias=True) == "xla"
  assert choose(None, q.astype(jnp.float32), has_mask_or_bias=False) == "xla"
  assert choose(None, q[..., :12], has_mask_or_bias=False) == "xla"
  assert choose("cudnn", q, has_mask_or_bias=True) == "cudnn"
  with pytest.raises(ValueError, match="multiple of 8"):
    choose("cudnn", q[..., :12], has_mask_or_bias=False)
  with pytest.raises(ValueError, match="even lengths"):
    choose("cudnn", q, has_mask_or_bias=True, q_len=3)
  with pytest.raises(ValueError, match="bfloat16 or float16"):
    choose("cudnn", q.astype(jnp.float32), has_mask_or_bias=False)


def emulated_cudnn(query, key, value, *, bias=None, mask=None, scale=None, is_causal=False,
                   implementation=None):
  """jax.nn's cuDNN path as an H200 ran it: a boolean mask joins the bias as -2**41 in the
  inputs' dtype (jax's combine_bias_and_mask), while cuDNN's causal mask removes future keys
  outright, so a row the mask empties averages the causal keys only."""
  assert implementation == "cudnn", implementation
  T, S = query.shape[1], key.shape[1]
  if mask is not None:
    as_bias = jnp.where(mask, jnp.asarray(0, query.dtype), jnp.asarray(-2 << 40, query.dtype))
    bias = as_bias if bias is None else bias + as_bias
  logits_BNTS = jnp.einsum("btnh,bsnh->bnts", query.astype(jnp.float32),
                           jnp.repeat(key, query.shape[2] // key.shape[2], 2).astype(jnp.float32))
  logits_BNTS = logits_BNTS * scale + (0 if bias is None else bias.astype(jnp.float32))
  if is_causal:
    logits_BNTS = jnp.where(np.tril(np.ones((T, S), bool)), logits_BNTS, -jnp.inf)
  weights_BNTS = jax.nn.softmax(logits_BNTS, axis=-1)
  value = jnp.repeat(value, query.shape[2] // value.shape[2], 2).astype(jnp.float32)
  return jnp.einsum("bnts,bsnh->btnh", weights_BNTS, value).astype(query.dtype)


def check_cudnn_output(case):
  """implementation="cudnn" against numpy on random_case(case); (q, k, v, kwargs, mask)."""
  B, T, S, N, K, H = 2, 8, 8, 4, 2, 64
  q, k, v = random_qkv(8, B, T, S, N, K, H, jnp.bfloat16)
  kwargs, mask, bias = random_case(case, B, T, S, N)
  ours = dot_product_attention(q, k, v, implementation="cudnn", **kwargs)
  expected, _ = numpy_attention(q, k, v, mask=mask, bias=bias, scale=kwargs.get("scale"))
  np.testing.assert_allclose(np.asarray(ours, np.float32), expected, atol=3e-2, rtol=3e-2)
  return q, k, v, kwargs, mask


@pytest.mark.parametrize("case", CASES)
def test_emulated_cudnn_matches_reference(monkeypatch, case):
  """What dot_product_attention hands cuDNN gives the reference's results, fully masked rows
  included (checked on this CPU against the emulation; on a GPU for real, below)."""
  monkeypatch.setattr(attention.jax.nn, "dot_product_attention", emulated_cudnn)
  monkeypatch.setattr(attention_choice, "_cudnn_problem", lambda *args: None)
  check_cudnn_output(case)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("case", ["plain", "causal", "padding", "segments", "window", "bias",
                                  "everything"])
def test_cudnn_matches_reference(case):
  q, k, v, kwargs, mask = check_cudnn_output(case)
  row_has_keys_BT11 = mask.any(-1)[:, 0, :, None, None]  # fully masked rows carry no loss
  loss = lambda impl, q: jnp.sum(row_has_keys_BT11 * dot_product_attention(
      q, k, v, implementation=impl, **kwargs).astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(jax.grad(functools.partial(loss, "cudnn"))(q), np.float32),
                             np.asarray(jax.grad(functools.partial(loss, "xla"))(q), np.float32),
                             atol=5e-2, rtol=5e-2)
  if case == "plain":
    assert attention_choice.select_implementation(None, q, has_mask_or_bias=False, q_len=8,
                                                  kv_len=8, return_weights=False) == "cudnn"


@pytest.mark.parametrize("call, message", [
    (lambda q, k: dot_product_attention(q, k[..., :4], k[..., :4]), "head_dim"),
    (lambda q, k: dot_product_attention(q[:, :, :3], k, k), "multiple of the 2 key/value heads"),
    (lambda q, k: dot_product_attention(q[0], k, k), r"query \[B, T, N, H\]"),
    (lambda q, k: dot_product_attention(q, k, k[:, :2]), r"query \[B, T, N, H\]"),
    (lambda q, k: dot_product_attention(q, k, k, mask=jnp.ones((1, 1, 3, 4), bool)),
     "does not broadcast"),
    (lambda q, k: dot_product_attention(q, k, k, bias=jnp.ones((2, 3, 5, 5))), "does not broadcast"),
    (lambda q, k: dot_product_attention(q, k, k, mask=jnp.ones((5, 5))), "must be boolean"),
    (lambda q, k: dot_product_attention(q, k, k, implementation="flash"), "Unknown attention"),
    (lambda q, k: dot_product_attention(q, k, k, implementation="xla", return_weights=True),
     "return_weights=True needs"),
    (lambda q, k: dot_product_attention(q, k, k, query_segment_ids=jnp.ones((2, 4), int)),
     "Segment ids must be"),
    (lambda q, k: dot_product_attention(q, k, k, kv_segment_ids=jnp.ones((2, 5), int)),
     "without query_segment_ids"),
    (lambda q, k: dot_product_attention(q, k, k, local_window_size=(2, -1)),
     "local_window_size must be"),
    (lambda q, k: dot_product_attention(q, k, k, local_window_size=1.5),
     "local_window_size must be"),
])
def test_bad_inputs_are_clear_errors(call, message):
  q, k, _ = random_qkv(0, 2, 5, 5, 4, 2, 8)
  with pytest.raises(ValueError, match=message):
    call(q, k)


# --------------------------------------------------------------------------------------
# MultiHeadAttention.

B, T, S, D, N, H = 2, 5, 7, 16, 4, 8


def _flax_params(flax_module, *args):
  return random_variables(flax_module, *args)["params"]  # biases non-zero: misplaced ones show


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("cross", [False, True])
def test_mha_matches_flax(use_bias, cross):
  x = normal(1, B, T, D)
  kv = normal(2, B, S, D) if cross else None
  mask = padding_mask(np.arange(T)[None] < np.array([[T], [3]]),
                      np.arange(S if cross else T)[None] < np.array([[4], [2]]))
  theirs = nn.MultiHeadDotProductAttention(num_heads=N, qkv_features=N * H, out_features=12,
                                           use_bias=use_bias)
  params = _flax_params(theirs, x, kv)
  ours = MultiHeadAttention(num_heads=N, head_dim=H, out_features=12, use_bias=use_bias)
  assert jax.tree.structure(params) == jax.tree.structure(
      nn.unbox(jax.eval_shape(functools.partial(ours.init, jax.random.key(0)), x, kv)["params"]))
  expected = apply(theirs, {"params": params}, x, kv, mask=mask)
  np.testing.assert_allclose(apply(ours, {"params": params}, x, kv, mask=mask), expected,
                             atol=1e-5, rtol=1e-5)


def test_mha_attention_bias_and_scale_match_flax():
  x, bias = normal(1, B, T, D), normal(2, 1, N, T, T)
  theirs = nn.MultiHeadDotProductAttention(
      num_heads=N, qkv_features=N * H,
      attention_fn=functools.partial(nn.dot_product_attention, bias=bias))
  params = _flax_params(theirs, x)
  expected = apply(theirs, {"params": params}, x)
  ours = MultiHeadAttention(num_heads=N, head_dim=H)
  np.testing.assert_allclose(apply(ours, {"params": params}, x, bias=bias), expected,
                             atol=1e-5, rtol=1e-5)
  # T5 style: logits unscaled, the 1/sqrt(H) folded into the query projection instead.
  folded = dict(params, query=jax.tree.map(lambda p: p / np.sqrt(H), params["query"]))
  t5 = MultiHeadAttention(num_heads=N, head_dim=H, scale=1.0)
  np.testing.assert_allclose(apply(t5, {"params": folded}, x, bias=bias), expected,
                             atol=1e-5, rtol=1e-5)


def test_mha_params_carry_logical_axis_names():
  m = MultiHeadAttention(num_heads=4, head_dim=8, num_kv_heads=2)
  params = jax.eval_shape(m.init, jax.random.key(0), jnp.ones((1, 3, D)))["params"]
  assert params["query"]["kernel"].names == ("embed", "heads", "head_dim")
  assert params["key"]["kernel"].names == ("embed", "kv_heads", "head_dim")
  assert params["value"]["bias"].names == ("kv_heads", "head_dim")
  assert params["out"]["kernel"].names == ("heads", "head_dim", "embed")
  assert params["out"]["bias"].names == ("embed",)
  assert params["key"]["kernel"].unbox().shape == (D, 2, 8)


def test_sown_weights_equal_flax_and_reference():
  x = normal(1, B, T, D)
  theirs = nn.MultiHeadDotProductAttention(num_heads=N, qkv_features=N * H)
  params = _flax_params(theirs, x)
  _, flax_state = apply(theirs, {"params": params}, x, mask=causal_mask(T), sow_weights=True,
                        mutable=["intermediates"])
  ours = MultiHeadAttention(num_heads=N, head_dim=H)
  assert "attention_weights" not in jax.eval_shape(ours.init, jax.random.key(0), x)
  out, state = apply(ours, {"params": params}, x, is_causal=True, mutable=["attention_weights"])
  (weights,) = state["attention_weights"]["weights"]
  assert weights.shape == (B, N, T, T)
  np.testing.assert_allclose(weights, flax_state["intermediates"]["attention_weights"][0],
                             atol=1e-6)
  np.testing.assert_allclose(out, apply(ours, {"params": params}, x, is_causal=True), atol=1e-6)


def test_attention_dropout():
  x = normal(1, B, T, D)
  m = MultiHeadAttention(num_heads=N, head_dim=H, dropout_rate=0.5)
  params = random_variables(m, x)["params"]
  clean = apply(MultiHeadAttention(num_heads=N, head_dim=H), {"params": params}, x)
  np.testing.assert_array_equal(apply(m, {"params": params}, x), clean)
  drop = jax.jit(lambda rng: m.apply({"params": params}, x, deterministic=False,
                                     rngs={"dropout": rng}))
  dropped = drop(jax.random.key(3))
  np.testing.assert_array_equal(dropped, drop(jax.random.key(3)))
  assert np.abs(dropped - clean).max() > 1e-2
  assert np.abs(dropped - drop(jax.random.key(4))).max() > 1e-2


def test_rope_depends_only_on_relative_positions():
  x = normal(1, B, T, D)
  m = MultiHeadAttention(num_heads=N, head_dim=H, num_kv_heads=2, rope_max_wavelength=10_000.0)
  variables = random_variables(m, x)
  run = jax.jit(lambda positions, kv_positions: m.apply(
      variables, x, is_causal=True, positions=positions, kv_positions=kv_positions))
  plain, shifted = jnp.arange(T)[None], jnp.arange(T)[None] + 37
  np.testing.assert_allclose(run(plain, plain), run(shifted, shifted), atol=1e-5, rtol=1e-5)
  # Shifting queries alone changes relative positions, so the output must change.
  assert np.abs(run(plain, plain) - run(shifted, plain)).max() > 1e-3
  # Self-attention: kv_positions default to positions.
  np.testing.assert_allclose(apply(m, variables, x, is_causal=True, positions=shifted),
                             run(shifted, shifted), atol=1e-6)


# --------------------------------------------------------------------------------------
# KV cache.

L = 8


def _decoder(rope, num_kv_heads, sliding_window=None):
  """(module, params, empty cache of length L, inputs [B, L, D])."""
  m = MultiHeadAttention(num_heads=N, head_dim=H, num_kv_heads=num_kv_heads,
                         rope_max_wavelength=rope, sliding_window=sliding_window)
  x = normal(1, B, L, D)
  variables = random_variables(m, jnp.zeros((B, L, D)), decode=True)
  return m, variables["params"], variables["cache"], x


def _step(m, params, **kwargs):
  """Compiled decode call: (cache, x) -> (out, cache)."""
  @jax.jit
  def step(cache, x):
    out, state = m.apply({"params": params, "cache": cache}, x, decode=True, mutable=["cache"],
                         **kwargs)
    return out, state["cache"]
  return step


@pytest.mark.parametrize("rope, num_kv_heads, window", [(None, 4, None), (10_000.0, 2, None),
                                                        (10_000.0, 1, None), (10_000.0, 2, 3)])
def test_prefill_then_steps_equal_full_forward(rope, num_kv_heads, window):
  m, params, cache, x = _decoder(rope, num_kv_heads, window)
  assert cache["cached_key"].shape == cache["cached_value"].shape == (B, num_kv_heads, L, H)
  assert cache["cache_index"].shape == (B,) and cache["cache_index"].dtype == jnp.int32
  full = apply(m, {"params": params}, x, is_causal=True)
  if window:  # The last `window` keys: as a numpy band mask on the module without a window.
    plain = MultiHeadAttention(num_heads=N, head_dim=H, num_kv_heads=num_kv_heads,
                               rope_max_wavelength=rope)
    band = np.tril(np.ones((L, L), bool)) & np.triu(np.ones((L, L), bool), 1 - window)
    np.testing.assert_allclose(full, apply(plain, {"params": params}, x, mask=band), atol=1e-6)
  step = _step(m, params)
  out, cache = step(cache, x[:, :3])
  np.testing.assert_allclose(out, full[:, :3], atol=1e-5, rtol=1e-5)
  for t in range(3, L):
    out, cache = step(cache, x[:, t:t + 1])
    np.testing.assert_allclose(out[:, 0], full[:, t], atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(cache["cache_index"], [L, L])


@pytest.mark.parametrize("window", [None, 2])
def test_right_padded_prompts_of_different_lengths(window):
  m, params, cache, x = _decoder(10_000.0, 2, window)
  full = apply(m, {"params": params}, x, is_causal=True)
  lengths = np.array([2, 5])
  prompts = jnp.where((np.arange(L)[None] < lengths[:, None])[..., None], x, normal(9, *x.shape))
  step = _step(m, params)
  out, cache = step(cache, prompts[:, :5])
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(out[b, :n], full[b, :n], atol=1e-5, rtol=1e-5)
  cache = dict(cache, cache_index=jnp.asarray(lengths, jnp.int32))
  for _ in range(3):
    index = np.asarray(cache["cache_index"])
    out, cache = step(cache, x[np.arange(B), index][:, None])
    np.testing.assert_allclose(out[:, 0], full[np.arange(B), index], atol=1e-5, rtol=1e-5)


def test_cache_combines_with_a_caller_mask_over_the_cache():
  m, params, cache, x = _decoder(10_000.0, 2)
  kv_valid = np.ones((B, L), bool)
  kv_valid[0, 1] = kv_valid[1, 2] = False  # no row fully masked
  mask = padding_mask(None, kv_valid)
  full = apply(m, {"params": params}, x, mask=mask, is_causal=True)
  step = _step(m, params, mask=mask)
  out, cache = step(cache, x[:, :4])
  np.testing.assert_allclose(out, full[:, :4], atol=1e-5, rtol=1e-5)
  out, _ = step(cache, x[:, 4:5])
  np.testing.assert_allclose(out[:, 0], full[:, 4], atol=1e-5, rtol=1e-5)


def test_cache_writes_past_its_length_are_dropped():
  m, params, cache, x = _decoder(None, 2)
  cache = dict(cache, cache_index=jnp.array([L, 3], jnp.int32))
  _, cache = _step(m, params)(cache, x[:, :2])
  np.testing.assert_array_equal(cache["cached_key"][0], 0)
  assert np.all(cache["cached_key"][1, :, 3:5] != 0)
  np.testing.assert_array_equal(cache["cache_index"], [L + 2, 5])


def test_mha_bad_inputs_are_clear_errors():
  m, params, cache, x = _decoder(None, 4)
  with pytest.raises(ValueError, match="do not fit the cache"):
    _step(m, params)(cache, jnp.zeros((B, L + 1, D)))
  with pytest.raises(ValueError, match="Segment ids are not supported"):
    _step(m, params, query_segment_ids=jnp.ones((B, 1), int))(cache, x[:, :1])
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    jax.eval_shape(MultiHeadAttention(num_heads=4, head_dim=8, num_kv_heads=3).init,
                   jax.random.key(0), x)
  with pytest.raises(ValueError, match="sliding_window applies to self-attention only"):
    jax.eval_shape(MultiHeadAttention(num_heads=4, head_dim=8, sliding_window=2).init,
                   jax.random.key(0), x, x)
