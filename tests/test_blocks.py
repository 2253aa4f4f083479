"""models/blocks.py: layers built from keyword fields are the layers the families build, and an
encoder layer computes what flax's own attention, Dense and LayerNorm compute."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.blocks import DecoderLayer, EncoderLayer, layer_fields
from models.config import TransformerConfig
from models.errors import InputError
from models.transformer import DecoderOnly, EncoderDecoder

TINY = dict(vocab_size=37, d_model=16, num_heads=4, d_ff=32, num_layers=2, max_len=16)


def _family_layer(model, tokens, stack: str, **kwargs):
  """(params, input, output, intermediates) of `stack`/layers_0 in one forward of `model`."""
  variables = model.init(jax.random.key(0), *tokens, **kwargs)
  _, state = model.apply(variables, *tokens, **kwargs, capture_intermediates=True,
                         mutable=["intermediates"])
  seen = state["intermediates"][stack]
  params = nn.unbox(variables["params"])[stack]["layers_0"]
  return params, seen["embedder"]["__call__"][0], seen["layers_0"]["__call__"][0], state


def _tree_shapes(tree):
  return jax.tree.map(jnp.shape, tree)


def test_a_decoder_layer_built_by_keywords_is_the_family_layer():
  cfg = TransformerConfig(**TINY, position="rope", norm="rmsnorm", norm_use_bias=False,
                          activation="silu", gated_ffn=True, num_kv_heads=2, sliding_window=3,
                          use_bias=False, qkv_bias=True, rope_max_wavelength=500.0)
  tokens_BT = jnp.asarray(np.random.default_rng(0).integers(1, 37, (2, 8)))
  params, x_BTD, y_BTD, _ = _family_layer(DecoderOnly(cfg), (tokens_BT,), "decoder")
  layer = DecoderLayer(num_heads=4, head_dim=4, num_kv_heads=2, d_ff=32, norm="rmsnorm",
                       norm_use_bias=False, activation="silu", gated_ffn=True, use_bias=False,
                       qkv_bias=True, rope_max_wavelength=500.0, sliding_window=3)
  own = nn.unbox(layer.init(jax.random.key(1), x_BTD))["params"]
  assert _tree_shapes(own) == _tree_shapes(params)
  np.testing.assert_array_equal(layer.apply({"params": params}, x_BTD), y_BTD)


def test_a_cross_attending_decoder_layer_built_by_keywords_is_the_family_layer():
  cfg = TransformerConfig(**TINY, position="learned", pre_norm=False, activation="gelu")
  rng = np.random.default_rng(1)
  source_BS, target_BT = (jnp.asarray(rng.integers(1, 37, (2, n))) for n in (6, 5))
  padding_BS = jnp.arange(6)[None] < jnp.asarray([[6], [4]])
  params, x_BTD, y_BTD, state = _family_layer(EncoderDecoder(cfg), (source_BS, target_BT),
                                              "decoder", encoder_padding_mask=padding_BS)
  encoded_BSD = state["intermediates"]["encoder"]["__call__"][0]
  layer = DecoderLayer(num_heads=4, head_dim=4, d_ff=32, pre_norm=False, activation="gelu",
                       cross_attention=True)
  own = nn.unbox(layer.init(jax.random.key(1), x_BTD, encoded=encoded_BSD))["params"]
  assert _tree_shapes(own) == _tree_shapes(params)
  y = layer.apply({"params": params}, x_BTD, encoded=encoded_BSD,
                  cross_mask=padding_BS[:, None, None, :])
  np.testing.assert_array_equal(y, y_BTD)


def test_layer_fields_sets_every_field_but_cross_attention():
  fields = {f.name for f in dataclasses.fields(DecoderLayer)} - {"parent", "name"}
  assert set(layer_fields(TransformerConfig(**TINY))) == fields - {"cross_attention"}
  assert set(layer_fields(TransformerConfig(**TINY))) == (
      {f.name for f in dataclasses.fields(EncoderLayer)} - {"parent", "name"})


def test_a_decoder_layer_refuses_encoded_input_its_cross_attention_setting_does_not_match():
  x_BTD = jnp.ones((1, 3, 8))
  with pytest.raises(InputError, match="cross_attention"):
    DecoderLayer(num_heads=2, head_dim=4, d_ff=8, cross_attention=True).init(
        jax.random.key(0), x_BTD)
  with pytest.raises(InputError, match="cross_attention"):
    DecoderLayer(num_heads=2, head_dim=4, d_ff=8).init(jax.random.key(0), x_BTD, encoded=x_BTD)


class _FlaxPostLN(nn.Module):
  """The paper's post-LN encoder layer written with flax's own modules only."""

  @nn.compact
  def __call__(self, x_BTD, mask):
    attend = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16, name="self_attention")
    x_BTD = nn.LayerNorm(1e-6, name="self_attention_norm")(x_BTD + attend(x_BTD, mask=mask))
    h_BTF = nn.relu(nn.Dense(32, name="wi")(x_BTD))
    return nn.LayerNorm(1e-6, name="mlp_norm")(x_BTD + nn.Dense(16, name="wo")(h_BTF))


def test_a_post_ln_encoder_layer_matches_flax_attention_dense_and_layernorm():
  rng = np.random.default_rng(2)
  x_BTD = jnp.asarray(rng.normal(size=(2, 6, 16)), jnp.float32)
  valid_BT = jnp.arange(6)[None] < jnp.asarray([[6], [3]])
  mask_B11T = valid_BT[:, None, None, :]
  layer = EncoderLayer(num_heads=4, head_dim=4, d_ff=32, pre_norm=False)
  params = nn.unbox(layer.init(jax.random.key(0), x_BTD))["params"]
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), params)
  reference = {"self_attention": params["self_attention"],
               "self_attention_norm": params["self_attention_norm"],
               "wi": params["mlp"]["wi"], "wo": params["mlp"]["wo"],
               "mlp_norm": params["mlp_norm"]}
  want = _FlaxPostLN().apply({"params": reference}, x_BTD, mask_B11T)
  got = layer.apply({"params": params}, x_BTD, mask=mask_B11T)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
