"""Layers against flax's own modules and against the formulas' defining properties."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import layers


def _init_apply(module, *args):
  variables = module.init(jax.random.key(0), *args)
  return nn.unbox(variables), module.apply(variables, *args)


@pytest.mark.parametrize("use_bias", [True, False])
def test_layernorm_matches_flax(use_bias):
  x = jax.random.normal(jax.random.key(1), (2, 5, 16)) * 3 + 1
  variables, ours = _init_apply(layers.Norm("layernorm", epsilon=1e-5, use_bias=use_bias), x)
  params = jax.tree.map(lambda p: p + jax.random.uniform(jax.random.key(2), p.shape),
                        variables["params"])
  ours = layers.Norm("layernorm", epsilon=1e-5, use_bias=use_bias).apply({"params": params}, x)
  theirs = nn.LayerNorm(epsilon=1e-5, use_bias=use_bias).apply({"params": params}, x)
  np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)


def test_rmsnorm_matches_flax():
  x = jax.random.normal(jax.random.key(1), (2, 5, 16)) * 3 + 1
  params = {"scale": jax.random.uniform(jax.random.key(2), (16,))}
  ours = layers.Norm("rmsnorm", epsilon=1e-6, use_bias=False).apply({"params": params}, x)
  theirs = nn.RMSNorm(epsilon=1e-6).apply({"params": params}, x)
  np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)


def test_unknown_norm_is_a_clear_error():
  with pytest.raises(ValueError, match="Unknown norm"):
    layers.Norm("batchnorm").init(jax.random.key(0), jnp.ones((1, 2, 4)))


def test_embed_attend_is_the_tied_projection():
  embed = layers.Embed(11, 8)
  ids = jnp.array([[1, 5, 10]])
  variables = nn.unbox(embed.init(jax.random.key(0), ids))
  table = variables["params"]["embedding"]
  np.testing.assert_array_equal(embed.apply(variables, ids), table[ids])
  x = jax.random.normal(jax.random.key(1), (1, 3, 8))
  np.testing.assert_allclose(embed.apply(variables, x, method="attend"), x @ table.T, rtol=1e-5)


def test_sinusoidal_positions_shift_is_a_rotation():
  """sin/cos pairs at position p + k are the pairs at p rotated by k * frequency."""
  features, shift = 16, 7
  pe = np.asarray(layers.sinusoidal_positions(jnp.arange(40)[None], features))[0]
  sin, cos = pe[:, :features // 2], pe[:, features // 2:]
  np.testing.assert_allclose(sin ** 2 + cos ** 2, 1.0, atol=1e-6)
  np.testing.assert_array_equal(pe[0], [0] * (features // 2) + [1] * (features // 2))
  angle = np.arctan2(sin[shift], cos[shift])
  rotated_sin = sin[:-shift] * np.cos(angle) + cos[:-shift] * np.sin(angle)
  np.testing.assert_allclose(rotated_sin, sin[shift:], atol=1e-4)


def test_rope_equals_complex_rotation():
  """RoFormer: pairs (x_i, x_{i+H/2}) as complex numbers, multiplied by exp(i·pos·θ_i)."""
  x = np.random.default_rng(0).normal(size=(2, 5, 3, 8))
  positions = np.array([[0, 1, 2, 3, 4], [7, 9, 11, 13, 100]])
  theta = 10_000.0 ** (-np.arange(0, 8, 2) / 8)
  z = (x[..., :4] + 1j * x[..., 4:]) * np.exp(1j * positions[:, :, None, None] * theta)
  expected = np.concatenate([z.real, z.imag], axis=-1)
  np.testing.assert_allclose(layers.apply_rope(jnp.asarray(x, jnp.float32), positions),
                             expected, atol=1e-4)


def test_relative_position_buckets_follow_t5():
  """Values worked by hand from T5's formula (32 buckets, max distance 128)."""
  relative = jnp.array([0, -1, 1, -7, -8, -20, 20, -127, -1000, 1000])
  bidirectional = layers.relative_position_bucket(relative, bidirectional=True, num_buckets=32,
                                                  max_distance=128)
  # n = -relative; keys after the query (relative > 0) use the upper 16 buckets; exact below 8;
  # 20 -> 8 + floor(log(20/8) / log(16) * 8) = 10; beyond 128 saturates at 15.
  np.testing.assert_array_equal(bidirectional, [0, 1, 17, 7, 8, 10, 26, 15, 15, 31])
  causal = layers.relative_position_bucket(relative, bidirectional=False, num_buckets=32,
                                           max_distance=128)
  # Unidirectional: future keys fold to 0; 20 -> 16 + floor(log(20/16) / log(8) * 16) = 17.
  np.testing.assert_array_equal(causal, [0, 1, 0, 7, 8, 17, 0, 31, 31, 0])


@pytest.mark.parametrize("activation,gated,reference", [
    ("relu", False, lambda h0, h1: np.maximum(h0, 0)),
    ("gelu", True, lambda h0, h1: 0.5 * h0 * (1 + np.vectorize(__import__("math").erf)(
        h0 / np.sqrt(2))) * h1),
    ("gelu_tanh", False, lambda h0, h1: 0.5 * h0 * (1 + np.tanh(
        np.sqrt(2 / np.pi) * (h0 + 0.044715 * h0 ** 3)))),
    ("silu", True, lambda h0, h1: h0 / (1 + np.exp(-h0)) * h1),
])
def test_feed_forward_against_numpy(activation, gated, reference):
  x = jax.random.normal(jax.random.key(0), (2, 3, 8))
  ffn = layers.FeedForward(16, activation=activation, gated=gated)
  params = nn.unbox(ffn.init(jax.random.key(1), x))["params"]
  params = jax.tree.map(lambda p: p + 0.1, params)
  x64 = np.asarray(x, np.float64)
  wi = params["wi_0" if gated else "wi"]
  h0 = x64 @ np.asarray(wi["kernel"], np.float64) + np.asarray(wi["bias"], np.float64)
  h1 = (x64 @ np.asarray(params["wi_1"]["kernel"], np.float64) + np.asarray(
      params["wi_1"]["bias"], np.float64)) if gated else None
  expected = reference(h0, h1) @ np.asarray(params["wo"]["kernel"], np.float64) + np.asarray(
      params["wo"]["bias"], np.float64)
  np.testing.assert_allclose(ffn.apply({"params": params}, x), expected, atol=1e-4, rtol=1e-4)


def test_unknown_activation_is_a_clear_error():
  with pytest.raises(ValueError, match="Unknown activation 'swish2'"):
    layers.FeedForward(8, activation="swish2").init(jax.random.key(0), jnp.ones((1, 2, 4)))
