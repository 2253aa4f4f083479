"""Attention maps against a float64 numpy attention from the params; heatmaps of the heads;
the maps train.attention_maps draws for a run, over the tokens training feeds."""

import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import presets
from models.attention_weights import attention_maps
from models.transformer import DecoderOnly, EncoderDecoder, EncoderOnly
from train import attention_maps as attention_maps_cli
from train.data import pipeline, tokenizers
from train.engine import tasks
from train.run import config as config_lib, workdir as workdir_lib
from train.run.figures import plot_heads, save_attention_figure

ROOT = pathlib.Path(__file__).resolve().parents[1]

TINY = dict(vocab_size=37, d_model=32, num_heads=4, d_ff=64, num_layers=2, max_len=32,
            dropout_rate=0.0)
SENTENCE = "gato sentou no tapete".split()


def tokens(seed, shape):
  return jax.random.randint(jax.random.key(seed), shape, 1, TINY["vocab_size"])


def init(model, *args, **kwargs):
  """Unboxed params, every leaf perturbed so zero biases and unit scales play a part too."""
  params = nn.unbox(model.init(jax.random.key(0), *args, **kwargs))["params"]
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return treedef.unflatten([x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                            for x, k in zip(leaves, keys)])


def numpy_first_layer_weights(params, tokens_BT, cfg):
  """float64 softmax(Q Kᵀ/√H + causal mask) of a pre-LN GPT-2 decoder's first layer."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  layer = p["decoder"]["layers_0"]
  T = tokens_BT.shape[1]
  x_BTD = p["token_embed"]["embedding"][np.asarray(tokens_BT)]
  x_BTD = x_BTD + p["decoder"]["embedder"]["position_embed"]["embedding"][:T]
  norm = layer["self_attention_norm"]
  centered_BTD = x_BTD - x_BTD.mean(-1, keepdims=True)
  h_BTD = centered_BTD / np.sqrt((centered_BTD ** 2).mean(-1, keepdims=True) + cfg.norm_epsilon)
  h_BTD = h_BTD * norm["scale"] + norm["bias"]
  attention = layer["self_attention"]
  q_BTNH = np.einsum("btd,dnh->btnh", h_BTD, attention["query"]["kernel"])
  q_BTNH = q_BTNH + attention["query"]["bias"]
  k_BTNH = np.einsum("btd,dnh->btnh", h_BTD, attention["key"]["kernel"])
  k_BTNH = k_BTNH + attention["key"]["bias"]
  logits_BNTS = np.einsum("btnh,bsnh->bnts", q_BTNH, k_BTNH) / np.sqrt(cfg.head_dim)
  logits_BNTS = np.where(np.tril(np.ones((T, T), bool)), logits_BNTS, -np.inf)
  logits_BNTS = logits_BNTS - logits_BNTS.max(-1, keepdims=True)
  exp_BNTS = np.exp(logits_BNTS)
  return exp_BNTS / exp_BNTS.sum(-1, keepdims=True)


def test_decoder_only_first_layer_matches_numpy_attention():
  cfg = presets.gpt2(**TINY)
  model = DecoderOnly(cfg)
  tokens_BT = tokens(0, (2, 6))
  params = init(model, tokens_BT)
  maps = attention_maps(model, params, tokens_BT)
  assert list(maps) == ["decoder"] and list(maps["decoder"]) == ["self"]
  weights_LBNTS = maps["decoder"]["self"]
  assert weights_LBNTS.shape == (2, 2, 4, 6, 6) and weights_LBNTS.dtype == jnp.float32
  expected_BNTS = numpy_first_layer_weights(params, tokens_BT, cfg)
  np.testing.assert_allclose(weights_LBNTS[0], expected_BNTS, atol=1e-5)
  # The second layer sees other inputs: the comparison above can tell layers apart.
  assert not np.allclose(weights_LBNTS[1], expected_BNTS, atol=1e-3)
  # A whole variables dict is accepted as well as the params collection.
  np.testing.assert_array_equal(attention_maps(model, {"params": params}, tokens_BT)
                                ["decoder"]["self"], weights_LBNTS)


@pytest.mark.parametrize("preset,overrides", [(presets.gpt2, {}),
                                              (presets.llama, {"num_kv_heads": 2})])
def test_causal_maps_are_lower_triangular_with_rows_summing_to_one(preset, overrides):
  model = DecoderOnly(preset(**{**TINY, **overrides}))
  tokens_BT = tokens(1, (2, 7))
  weights_LBNTS = np.asarray(attention_maps(model, init(model, tokens_BT), tokens_BT)
                             ["decoder"]["self"])
  assert weights_LBNTS.shape == (2, 2, 4, 7, 7)
  future_TT = np.triu(np.ones((7, 7), bool), k=1)
  assert np.all(weights_LBNTS[..., future_TT] == 0.0)
  assert np.all(weights_LBNTS[..., ~future_TT] > 0.0)
  np.testing.assert_allclose(weights_LBNTS.sum(-1), 1.0, atol=1e-5)


def test_padding_keys_get_zero_weight():
  model = EncoderOnly(presets.bert_base(**TINY))
  tokens_BT = tokens(2, (2, 6))
  padding_mask_BT = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], bool)
  params = init(model, tokens_BT, padding_mask=padding_mask_BT)
  maps = attention_maps(model, params, tokens_BT, padding_mask=padding_mask_BT)
  assert list(maps) == ["encoder"] and list(maps["encoder"]) == ["self"]
  weights_LBNTS = np.asarray(maps["encoder"]["self"])
  assert weights_LBNTS.shape == (2, 2, 4, 6, 6)
  assert np.all(weights_LBNTS[:, 1, :, :, 3:] == 0.0)
  assert np.all(weights_LBNTS[:, 1, :, :, :3] > 0.0)
  assert np.all(weights_LBNTS[:, 0] > 0.0)
  np.testing.assert_allclose(weights_LBNTS.sum(-1), 1.0, atol=1e-5)


def _stack_layers(params):
  """Unrolled params (layers_0, layers_1, ...) -> scanned params (layers, leading axis)."""
  if not isinstance(params, dict):
    return params
  if "layers_0" in params:
    count = sum(name.startswith("layers_") for name in params)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                           *[params[f"layers_{i}"] for i in range(count)])
    rest = {k: v for k, v in params.items() if not k.startswith("layers_")}
    return {**rest, "layers": stacked}
  return {k: _stack_layers(v) for k, v in params.items()}


@pytest.mark.slow
def test_encoder_decoder_maps_and_scanned_equals_unrolled():
  cfg = presets.transformer_base(**TINY, num_decoder_layers=3)
  source_BS, target_BT = tokens(3, (2, 7)), tokens(4, (2, 5))
  source_mask_BS = jnp.array([[1] * 7, [1] * 4 + [0] * 3], bool)
  args, kwargs = (source_BS, target_BT), {"encoder_padding_mask": source_mask_BS}
  model = EncoderDecoder(cfg)
  params = init(model, *args, **kwargs)
  maps = attention_maps(model, params, *args, **kwargs)
  shapes = jax.tree.map(jnp.shape, maps)
  assert shapes == {"encoder": {"self": (2, 2, 4, 7, 7)},
                    "decoder": {"self": (3, 2, 4, 5, 5), "cross": (3, 2, 4, 5, 7)}}
  cross_LBNTS = np.asarray(maps["decoder"]["cross"])
  assert np.all(cross_LBNTS[:, 1, :, :, 4:] == 0.0)
  np.testing.assert_allclose(cross_LBNTS.sum(-1), 1.0, atol=1e-5)

  scanned = EncoderDecoder(cfg.replace(scan_layers=True))
  scanned_maps = attention_maps(scanned, _stack_layers(params), *args, **kwargs)
  assert jax.tree.map(jnp.shape, scanned_maps) == shapes
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), scanned_maps, maps)


def test_module_without_attention_is_a_clear_error():
  dense = nn.Dense(3)
  params = dense.init(jax.random.key(0), jnp.ones((1, 2)))["params"]
  with pytest.raises(ValueError, match="sowed no attention weights"):
    attention_maps(dense, params, jnp.ones((1, 2)))


def test_plot_heads_draws_one_labelled_heatmap_per_head(tmp_path):
  weights_NTS = jax.nn.softmax(jax.random.normal(jax.random.key(5), (5, 4, 4)), axis=-1)
  fig = plot_heads(weights_NTS, SENTENCE, SENTENCE, title="layer 0", max_cols=2)
  heads = [ax for ax in fig.axes if ax.images]
  assert [ax.get_title() for ax in heads] == [f"head {i}" for i in range(5)]
  assert len(fig.axes) == 5 + 1  # The heads and one shared colour bar.
  assert {ax.get_subplotspec().colspan.start for ax in heads} == {0, 1}
  for head, ax in enumerate(heads):
    assert [t.get_text() for t in ax.get_xticklabels()] == SENTENCE
    assert [t.get_text() for t in ax.get_yticklabels()] == SENTENCE
    np.testing.assert_allclose(ax.images[0].get_array(), weights_NTS[head], rtol=1e-6)
  assert fig._suptitle.get_text() == "layer 0"

  path = save_attention_figure(tmp_path / "maps" / "gato.png", weights_NTS, SENTENCE, SENTENCE)
  with open(path, "rb") as f:
    png = f.read()
  assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def test_plot_heads_rejects_mismatched_tokens():
  weights_NTS = np.full((2, 4, 3), 1 / 3)
  with pytest.raises(ValueError, match="3 key tokens"):
    plot_heads(weights_NTS, SENTENCE, SENTENCE)
  with pytest.raises(ValueError, match=r"\[N, T, S\]"):
    plot_heads(weights_NTS[None], SENTENCE, SENTENCE[:3])


def test_models_import_no_plotting_library():
  modules = sorted(p.stem for p in (ROOT / "models").glob("*.py") if p.stem != "__init__")
  code = "".join(f"import models.{m}\n" for m in modules)
  code += "import sys\nprint('matplotlib' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, text=True, capture_output=True,
                       check=True).stdout
  assert len(modules) > 5 and out.strip() == "False"


def test_a_classify_run_is_drawn_over_the_row_training_feeds():
  tokenizer = tokenizers.ByteTokenizer()
  config = config_lib.base_config()
  config.task, config.model.num_classes, config.data.seq_len = "classify", 3, 12
  model = tasks.make_model("classify", presets.bert_base(**{
      **TINY, "vocab_size": tokenizer.vocab_size}), num_classes=3)
  row = next(iter(pipeline.classification_pipeline(
      [{"text": "gato", "label": 0}], tokenizer, batch_size=1, seq_len=12, shuffle=False,
      num_epochs=1, process_index=0, process_count=1)))
  inputs = {k: jnp.asarray(row[k]) for k in ("padding_mask", "token_types")}
  params = init(model, jnp.asarray(row["tokens"]), **inputs)
  run = workdir_lib.Run(config, model, params, tokenizer, tokenizer, None)
  maps = attention_maps_cli.head_maps(run, "gato", layer=0)
  assert maps.query_labels == maps.key_labels == ["<s>", "g", "a", "t", "o", "</s>"]
  expected = attention_maps(model, params, jnp.asarray(row["tokens"]), **inputs)
  (family, kinds), = expected.items()
  np.testing.assert_array_equal(maps.weights_NTS, kinds["self"][0, 0, :, :6, :6])
  assert maps.title == f"{family} self-attention, layer 0: 'gato'"
