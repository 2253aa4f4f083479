"""models/lora.py: fresh adapters leave the model unchanged, merged equals unmerged, counts, errors.

The unmerged reference adds (x·a)·b to the output of every adapted Dense/DenseGeneral through a
flax method interceptor, the form of the LoRA paper (attention's query, key and value kernels,
applied as one matmul, get a·b added where the interceptor sees them); `lora.merge` instead
folds a·b into the kernels of the parameter tree. Scanned stacks are checked against the same model unrolled, layer by layer.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import lora, presets
from models.transformer import DecoderOnly, EncoderClassifier, EncoderDecoder

TOKENS = np.array([[5, 7, 9, 11, 3, 2, 0, 0], [4, 6, 8, 10, 12, 14, 16, 1]], np.int32)
MASK = TOKENS != 0
SMALL = dict(num_layers=2, d_model=32, num_heads=4, d_ff=64)


def gpt2(**changes):
  return DecoderOnly(presets.gpt2(vocab_size=40, max_len=16, dropout_rate=0.0, **SMALL,
                                  **changes))


def t5(**changes):
  return EncoderDecoder(presets.t5_v1_1(vocab_size=40, head_dim=8, dropout_rate=0.0,
                                        ffn_dropout_rate=0.0, **SMALL, **changes))


def bert(**changes):
  return EncoderClassifier(presets.bert_base(vocab_size=40, max_len=16, dropout_rate=0.0,
                                             **SMALL, **changes), num_classes=3)


def inputs(model):
  if isinstance(model, EncoderDecoder):
    return (TOKENS, TOKENS[:, ::-1].copy()), {"encoder_padding_mask": MASK}
  if isinstance(model, EncoderClassifier):
    return (TOKENS,), {"padding_mask": MASK}
  return (TOKENS,), {}


def forward(model, params):
  args, kwargs = inputs(model)
  return model.apply({"params": params}, *args, **kwargs)


def init(model):
  args, kwargs = inputs(model)
  return model.init(jax.random.key(0), *args, **kwargs)["params"]


def randomize_b(adapters, seed=1):
  """Adapters whose b is random too, so that they change the model."""
  adapters = nn.unbox(adapters)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(treedef, [
      0.3 * jax.random.normal(k, x.shape) if path[-1].key == "b" else x
      for k, (path, x) in zip(keys, leaves)])


def unmerged_forward(model, params, adapters, cfg):
  """The model with y = x·W (+ bias) + (alpha/r)·(x·a)·b added at each adapted Dense."""
  pairs = {tuple(path.split("/")[:-1]): pair for path, pair in lora._pairs(adapters).items()}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    pair = pairs.get(tuple(context.module.path))
    if context.method_name != "__call__" or pair is None:
      return out
    if isinstance(args[0], int):  # Attention's Q/K/V hand out (kernel, bias) for one matmul.
      kernel, bias = out
      return kernel + cfg.scale * jnp.tensordot(pair["a"], pair["b"], 1), bias
    num_in = pair["a"].ndim - 1
    low_rank = jnp.tensordot(jnp.tensordot(args[0], pair["a"], num_in), pair["b"], 1)
    return out + cfg.scale * low_rank

  with nn.intercept_methods(interceptor):
    return forward(model, params)


MODELS = {"gpt2": gpt2, "t5": t5, "bert": bert}
TARGETS = r"attention/(query|value|out)/kernel|mlp/(wi|wi_0|wo)/kernel|pooler/kernel"


@pytest.mark.parametrize("name", MODELS)
def test_fresh_adapters_leave_the_model_unchanged(name):
  model = MODELS[name]()
  boxed = init(model)
  cfg = lora.LoraConfig(targets=TARGETS, rank=4, alpha=8.0)
  adapters = lora.init(jax.random.key(1), boxed, cfg)
  params = nn.unbox(boxed)
  np.testing.assert_array_equal(forward(model, lora.merge(params, adapters, cfg)),
                                forward(model, params))
  a_leaves = [x for path, x in jax.tree_util.tree_leaves_with_path(nn.unbox(adapters))
              if path[-1].key == "a"]
  assert all(np.abs(a).max() > 0 for a in a_leaves)


@pytest.mark.parametrize("name", MODELS)
def test_merged_equals_unmerged(name):
  model = MODELS[name]()
  boxed = init(model)
  cfg = lora.LoraConfig(targets=TARGETS, rank=3, alpha=6.0)
  adapters = randomize_b(lora.init(jax.random.key(1), boxed, cfg))
  params = nn.unbox(boxed)
  merged = forward(model, lora.merge(params, adapters, cfg))
  assert np.abs(merged - forward(model, params)).max() > 1e-3  # the adapters do something
  np.testing.assert_allclose(merged, unmerged_forward(model, params, adapters, cfg),
                             atol=2e-5, rtol=2e-5)


def layer(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


def unrolled(tree, num_layers):
  """A scanned tree ({"layers": stacked}) as the unrolled one ({"layers_0": ..., ...})."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for key, value in tree.items():
    if key == "layers":
      out.update({f"layers_{i}": layer(value, i) for i in range(num_layers)})
    else:
      out[key] = unrolled(value, num_layers)
  return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_scanned_stack_gets_one_adapter_per_layer(name):
  scanned, plain = MODELS[name](scan_layers=True), MODELS[name]()
  boxed = init(scanned)
  cfg = lora.LoraConfig(targets=TARGETS, rank=2, alpha=4.0)
  adapters = randomize_b(lora.init(jax.random.key(1), boxed, cfg))
  params = nn.unbox(boxed)
  np.testing.assert_allclose(
      forward(scanned, lora.merge(params, adapters, cfg)),
      unmerged_forward(plain, unrolled(params, 2), unrolled(adapters, 2), cfg),
      atol=2e-5, rtol=2e-5)


@pytest.mark.slow
def test_number_of_adapter_parameters():
  d, n, h, r, layers = 32, 4, 8, 4, 2
  cfg = lora.LoraConfig(targets=r"self_attention/(query|value)/kernel", rank=r, alpha=1.0)
  count = lambda tree: sum(x.size for x in jax.tree.leaves(nn.unbox(tree)))
  for model in (gpt2(), gpt2(scan_layers=True)):
    adapters = lora.init(jax.random.key(0), init(model), cfg)
    assert count(adapters) == layers * 2 * r * (d + n * h)
  # Encoder-decoder: encoder self, decoder self and cross attention; out kernels [N, H, D].
  cfg = lora.LoraConfig(targets=(r"attention/out/kernel", r"mlp/wo/kernel"), rank=r, alpha=1.0)
  adapters = lora.init(jax.random.key(0), init(t5()), cfg)
  assert count(adapters) == 3 * layers * r * (n * h + d) + 2 * layers * r * (64 + d)


def test_works_on_abstract_params_and_keeps_logical_names():
  model = gpt2(scan_layers=True)
  abstract = jax.eval_shape(lambda: init(model))
  cfg = lora.LoraConfig(targets=r"query/kernel", rank=2)
  adapters = lora.init(jax.random.key(3), abstract, cfg)
  np.testing.assert_array_equal(nn.unbox(adapters)["decoder"]["layers"]["self_attention"][
      "query"]["kernel"]["a"], nn.unbox(lora.init(jax.random.key(3), init(model), cfg))[
          "decoder"]["layers"]["self_attention"]["query"]["kernel"]["a"])
  pair = adapters["decoder"]["layers"]["self_attention"]["query"]["kernel"]
  assert pair["a"].names == ("layers", "embed", None)
  assert pair["b"].names == ("layers", None, "heads", "head_dim")
  bound = 1 / math.sqrt(32)
  assert np.abs(pair["a"].value).max() <= bound and np.all(pair["b"].value == 0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(targets=r"self_atention/query/kernel"), "matches no parameter path"),
    (dict(targets=r"query/bias"), "not kernels"),
    (dict(targets=r"query/kernel", rank=0), "rank must be a positive integer"),
    (dict(targets=r"query/kernel", alpha=-1.0), "alpha must be a finite number > 0"),
    (dict(targets=r"(query"), "not a valid regular expression"),
])
def test_bad_configs_are_clear_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    lora.init(jax.random.key(0), init(gpt2()), lora.LoraConfig(**kwargs))


def test_unboxed_multi_axis_kernels_need_their_names():
  params = nn.unbox(init(gpt2()))
  with pytest.raises(ValueError, match="logical axis names"):
    lora.init(jax.random.key(0), params, lora.LoraConfig(targets="query/kernel"))
  adapters = lora.init(jax.random.key(0), params, lora.LoraConfig(targets="mlp/wi/kernel"))
  assert adapters["decoder"]["layers_0"]["mlp"]["wi"]["kernel"]["a"].shape == (32, 8)


def test_adapters_from_another_model_are_an_error():
  cfg = lora.LoraConfig(targets="query/kernel")
  adapters = lora.init(jax.random.key(0), init(gpt2()), cfg)
  with pytest.raises(ValueError, match="different models"):
    lora.merge(nn.unbox(init(bert())), adapters, cfg)
