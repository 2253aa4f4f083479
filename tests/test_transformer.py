"""The three model families: configuration checks and properties that must always hold.

Models init and run under jit: one compile a program, where eager flax compiles every op."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import presets
from models.config import TransformerConfig
from models.transformer import (DecoderOnly, EncoderClassifier, EncoderDecoder, EncoderMaskedLM,
                                EncoderOnly)

TINY = dict(vocab_size=37, d_model=32, num_heads=4, d_ff=64, num_layers=2, max_len=32,
            dropout_rate=0.0)
FAMILIES = {
    "transformer_base": (presets.transformer_base, EncoderDecoder),
    "gpt2": (presets.gpt2, DecoderOnly),
    "bert_base": (presets.bert_base, EncoderOnly),
    "t5_v1_0": (presets.t5_v1_0, EncoderDecoder),
    "t5_v1_1": (presets.t5_v1_1, EncoderDecoder),
    "llama": (presets.llama, DecoderOnly),
}


def tiny(preset, **overrides):
  extra = {"head_dim": 8, "ffn_dropout_rate": 0.0} if preset in (presets.t5_v1_0,
                                                                  presets.t5_v1_1) else {}
  if preset is presets.llama:
    extra = {"num_kv_heads": 2}
  return preset(**{**TINY, **extra, **overrides})


def tokens(key, shape, vocab=37):
  return jax.random.randint(jax.random.key(key), shape, 1, vocab)


def init_params(model, *args, **kwargs):
  """model.init(key 0, *args, **kwargs)'s params, unboxed, computed under jit."""
  init = jax.jit(functools.partial(model.init, **kwargs))
  return nn.unbox(init(jax.random.key(0), *args))["params"]


def jit_apply(model, **kwargs):
  """A jitted function of (params, *args, **more_kwargs) -> model.apply's output."""
  return jax.jit(lambda p, *a, **more: model.apply({"params": p}, *a, **kwargs, **more))


def init_and_fn(model, *args, **kwargs):
  """Params (unboxed) and a function of (params, *args) -> output."""
  return init_params(model, *args, **kwargs), jit_apply(model, **kwargs)


@pytest.mark.slow
def test_every_preset_builds_its_family():
  enc, dec = tokens(1, (2, 7)), tokens(2, (2, 5))
  for name, (preset, family) in FAMILIES.items():
    model = family(tiny(preset))
    args = (enc, dec) if family is EncoderDecoder else (enc,)
    out, _ = jax.jit(model.init_with_output)(jax.random.key(0), *args)
    width = 32 if family is EncoderOnly else 37
    assert out.shape == args[-1].shape + (width,), name
    assert np.isfinite(out).all(), name


def test_presets_have_published_sizes():
  def count(preset, family, args):
    shapes = jax.eval_shape(lambda: family(preset()).init(jax.random.key(0), *args))
    return sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes["params"])))
  ids = jnp.zeros((1, 8), jnp.int32)
  assert count(presets.gpt2, DecoderOnly, (ids,)) == 124_439_808  # HF GPT2LMHeadModel
  assert count(presets.bert_base, EncoderOnly, (ids,)) == 109_482_240 - 768 * 768 - 768  # no pooler
  assert count(presets.t5_v1_0, EncoderDecoder, (ids, ids)) == 60_506_624  # HF t5-small


@pytest.mark.parametrize("preset", [presets.gpt2, presets.llama, presets.t5_v1_0])
def test_decoder_is_causal(preset):
  """Changing tokens after position t leaves the logits at positions <= t bitwise unchanged."""
  model = DecoderOnly(tiny(preset))
  x = tokens(3, (2, 12))
  params, fn = init_and_fn(model, x)
  t = 5
  changed = x.at[:, t + 1:].set(tokens(4, (2, 12 - t - 1)))
  before, after = fn(params, x), fn(params, changed)
  np.testing.assert_array_equal(before[:, :t + 1], after[:, :t + 1])
  assert not np.allclose(before[:, t + 1:], after[:, t + 1:])


def test_encoder_decoder_decoder_side_is_causal():
  model = EncoderDecoder(tiny(presets.transformer_base))
  src, tgt = tokens(1, (2, 9)), tokens(2, (2, 10))
  params, fn = init_and_fn(model, src, tgt)
  changed = tgt.at[:, 4:].set(tokens(5, (2, 6)))
  np.testing.assert_array_equal(fn(params, src, tgt)[:, :4], fn(params, src, changed)[:, :4])


def _pack(seqs, length):
  row = np.zeros(length, np.int32)
  segment_ids = np.zeros(length, np.int32)
  positions = np.zeros(length, np.int32)
  start = 0
  for i, s in enumerate(seqs):
    row[start:start + len(s)] = s
    segment_ids[start:start + len(s)] = i + 1
    positions[start:start + len(s)] = np.arange(len(s))
    start += len(s)
  return row[None], segment_ids[None], positions[None]


@pytest.mark.parametrize("preset", [presets.gpt2, presets.llama, presets.t5_v1_1])
def test_packed_decoder_equals_separate_sequences(preset):
  model = DecoderOnly(tiny(preset))
  seqs = [np.asarray(tokens(i, (n,))) for i, n in ((1, 5), (2, 7), (3, 3))]
  row, segment_ids, positions = _pack(seqs, 18)
  params, apply = init_and_fn(model, row)
  packed = apply(params, row, segment_ids=segment_ids, positions=positions)
  implied = apply(params, row, segment_ids=segment_ids)
  np.testing.assert_allclose(implied[:, :15], packed[:, :15], atol=1e-6)  # 15.. is padding
  start = 0
  for s in seqs:
    alone = apply(params, s[None])
    np.testing.assert_allclose(packed[:, start:start + len(s)], alone, atol=2e-5, rtol=2e-5)
    start += len(s)


@pytest.mark.parametrize("preset", [presets.transformer_base, presets.t5_v1_0])
def test_packed_encoder_decoder_equals_separate_pairs(preset):
  model = EncoderDecoder(tiny(preset))
  sources = [np.asarray(tokens(i, (n,))) for i, n in ((1, 6), (2, 4))]
  targets = [np.asarray(tokens(i + 10, (n,))) for i, n in ((1, 3), (2, 5))]
  src, src_seg, src_pos = _pack(sources, 12)
  tgt, tgt_seg, tgt_pos = _pack(targets, 9)
  params, apply = init_and_fn(model, src, tgt)
  packed = apply(params, src, tgt, encoder_segment_ids=src_seg,
                       decoder_segment_ids=tgt_seg, encoder_positions=src_pos,
                       decoder_positions=tgt_pos)
  start = 0
  for s, t in zip(sources, targets):
    alone = apply(params, s[None], t[None])
    np.testing.assert_allclose(packed[:, start:start + len(t)], alone, atol=2e-5, rtol=2e-5)
    start += len(t)


def test_encoder_padding_is_ignored():
  model = EncoderOnly(tiny(presets.bert_base))
  x = tokens(1, (2, 8))
  padding_mask = jnp.arange(8)[None] < jnp.array([[5], [8]])
  params, apply = init_and_fn(model, x)
  run = lambda ids: apply(params, ids, padding_mask=padding_mask)
  other = x.at[0, 5:].set(tokens(9, (3,)))
  np.testing.assert_allclose(run(x)[0, :5], run(other)[0, :5], atol=1e-6)
  np.testing.assert_allclose(run(x)[1], run(other)[1], atol=1e-6)


def _stack_layers(params, num_layers):
  """Unrolled params (layers_0, layers_1, ...) -> scanned params (layers, leading axis)."""
  if not isinstance(params, dict):
    return params
  if "layers_0" in params:
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                           *[params[f"layers_{i}"] for i in range(num_layers)])
    rest = {k: v for k, v in params.items() if not k.startswith("layers_")}
    return {**rest, "layers": stacked}
  return {k: _stack_layers(v, num_layers) for k, v in params.items()}


@pytest.mark.slow
@pytest.mark.parametrize("preset,family,policy", [(presets.gpt2, DecoderOnly, "full"),
                                                  (presets.t5_v1_0, EncoderDecoder, "dots"),
                                                  (presets.bert_base, EncoderOnly,
                                                   "dots_no_batch")])
def test_scan_equals_unrolled_and_remat_keeps_gradients(preset, family, policy):
  cfg = tiny(preset)
  args = (tokens(1, (2, 6)), tokens(2, (2, 5)))[:2 if family is EncoderDecoder else 1]
  params, _ = init_and_fn(family(cfg), *args)
  loss = lambda model, p: jnp.mean(jnp.square(model.apply({"params": p}, *args)))
  value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
  value, grads = value_and_grad(family(cfg), params)

  scanned = family(cfg.replace(scan_layers=True))
  scan_params = _stack_layers(params, cfg.num_layers)
  scanned_init = nn.unbox(jax.eval_shape(scanned.init, jax.random.key(0), *args))["params"]
  assert jax.tree.map(jnp.shape, scanned_init) == jax.tree.map(jnp.shape, scan_params)
  scan_value, scan_grads = value_and_grad(scanned, scan_params)
  np.testing.assert_allclose(scan_value, value, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
               scan_grads, _stack_layers(grads, cfg.num_layers))

  remat_value, remat_grads = value_and_grad(family(cfg.replace(remat_policy=policy)), params)
  np.testing.assert_allclose(remat_value, value, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
               remat_grads, grads)


@pytest.mark.parametrize("preset", [presets.gpt2, presets.llama])
def test_bfloat16_compute_stays_close_to_float32(preset):
  cfg = tiny(preset)
  x = tokens(1, (2, 16))
  params, fn32 = init_and_fn(DecoderOnly(cfg), x)
  fn16 = jit_apply(DecoderOnly(cfg.replace(dtype="bfloat16")))
  out32, out16 = fn32(params, x), fn16(params, x)
  assert out16.dtype == jnp.float32  # logits always leave in float32
  assert jax.tree.leaves(params)[0].dtype == jnp.float32
  scale = np.abs(out32).max()
  assert np.abs(out16 - out32).max() < 0.05 * scale
  np.testing.assert_array_equal(jax.nn.softmax(out16).argmax(-1)[0, :4],
                                jax.nn.softmax(out32).argmax(-1)[0, :4])


def test_dropout_needs_an_rng_and_changes_outputs_only_in_training():
  cfg = tiny(presets.gpt2, dropout_rate=0.5)
  model, x = DecoderOnly(cfg), tokens(1, (2, 8))
  params, apply = init_and_fn(model, x)
  eval_a = apply(params, x)
  np.testing.assert_array_equal(eval_a, apply(params, x))
  train_apply = jax.jit(lambda p, rng: model.apply({"params": p}, x, deterministic=False,
                                                   rngs={"dropout": rng}))
  train = lambda seed: train_apply(params, jax.random.key(seed))
  assert not np.allclose(train(1), eval_a)
  np.testing.assert_array_equal(train(1), train(1))


@pytest.mark.parametrize("overrides,message", [
    (dict(d_model=30), "not divisible by num_heads"),
    (dict(num_kv_heads=3), "must divide num_heads"),
    (dict(activation="swish2"), "unknown activation 'swish2'"),
    (dict(position="alibi"), "unknown position 'alibi'"),
    (dict(norm="batchnorm"), "unknown norm"),
    (dict(remat_policy="sometimes"), "unknown remat_policy"),
    (dict(attention_implementation="flash"), r"'flash'; choose from \(None, 'reference'"),
    (dict(dtype="float33"), "is not a dtype"),
    (dict(dropout_rate=1.5), "dropout_rate must be in"),
    (dict(vocab_size=0), "vocab_size must be positive"),
    (dict(position="rope", head_dim=7), "even head_dim"),
    (dict(head_dim=0), "head_dim must be positive"),
])
def test_bad_config_is_one_clear_error(overrides, message):
  with pytest.raises(ValueError, match=message):
    TransformerConfig(**{**TINY, **overrides})


def test_head_dim_resolved_and_derived_again_by_replace():
  derived = TransformerConfig(**TINY)  # 32 / 4 heads
  assert derived.head_dim == 8
  assert derived.replace(d_model=64).head_dim == 16
  assert derived.replace(num_heads=8).head_dim == 4
  assert derived.replace(d_model=64).replace(num_heads=2).head_dim == 32
  assert derived.replace(head_dim=12).replace(d_model=64).head_dim == 12
  explicit = TransformerConfig(**TINY, head_dim=8)  # T5-style: fixed whatever d_model is
  assert explicit == derived and explicit.replace(d_model=64).head_dim == 8
  with pytest.raises(ValueError, match="not divisible"):
    derived.replace(d_model=30)
  wide = derived.replace(d_model=64, param_dtype="bfloat16")
  params = init_params(DecoderOnly(wide), tokens(0, (1, 4)))
  query = params["decoder"]["layers_0"]["self_attention"]["query"]["kernel"]
  assert query.shape == (64, 4, 16) and query.dtype == jnp.bfloat16


def test_llama_preset_is_llama2_7b():
  """LLaMA-2 7B (meta-llama/Llama-2-7b-hf) has 6,738,415,616 parameters: no grouped-query."""
  count = lambda cfg: sum(x.size for x in jax.tree.leaves(jax.eval_shape(
      DecoderOnly(cfg).init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))))
  assert count(presets.llama()) == 6_738_415_616
  grouped = presets.llama(num_kv_heads=8)  # Grouped-query by override: K and V 4x smaller.
  assert count(grouped) == 6_738_415_616 - 32 * 2 * 4096 * (4096 - 1024)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_classifier_head_pools_only_real_tokens(pooling):
  model = EncoderClassifier(tiny(presets.bert_base), num_classes=3, pooling=pooling)
  x = tokens(1, (2, 8))
  padding_mask = jnp.arange(8)[None] < jnp.array([[5], [8]])
  params, apply = init_and_fn(model, x, padding_mask=padding_mask)
  run = lambda ids: apply(params, ids)
  logits = run(x)
  assert logits.shape == (2, 3)
  np.testing.assert_allclose(run(x.at[0, 5:].set(3)), logits, atol=1e-6)
  assert ("pooler" in params) == (pooling == "cls")


def test_masked_lm_head_ties_the_token_table():
  model = EncoderMaskedLM(tiny(presets.bert_base))
  x = tokens(1, (2, 8))
  params, apply = init_and_fn(model, x)
  assert apply(params, x).shape == (2, 8, 37)
  assert set(params) == {"encoder", "transform", "transform_norm", "output_bias"}
