"""train/engine/trainable.py: what trains (freezing, LoRA), what init_from restores, what is read.

References: optax's own clipping and set_to_zero semantics written out in numpy, the tensor
names a Hugging Face folder holds (read with safetensors), and bitwise equality.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy

from experiments import finetune_gpt2
from train import assets
from models import paths, pretrained
from models.config import TransformerConfig
from models.transformer import DecoderOnly
from train.engine import loop, optim, tasks
from train.engine.state import TrainState
from train.engine.trainable import Trainable
from train.run import config as config_lib


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
  """Tiny checkpoints built once for this module, away from ~/.cache."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("TAPETE_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield


def lm_trainable(**optim_changes) -> Trainable:
  config = config_lib.base_config()
  config.data.seq_len = 6
  config.optim.update(optim_changes)
  model = DecoderOnly(TransformerConfig(vocab_size=13, d_model=8, num_heads=2, d_ff=16,
                                        num_layers=1, max_len=8, position="learned",
                                        tie_output=False))
  return Trainable(model, tasks.init_inputs("lm", config.data), config.lora, config.optim.freeze)


def sgd(trainable: Trainable, **changes) -> optax.GradientTransformation:
  cfg = optim.default_optim_config()
  cfg.update(dict(optimizer="sgd", momentum=0.0, schedule="constant", warmup_steps=0,
                  learning_rate=1.0, **changes))
  return trainable.optimizer(optim.make_optimizer(cfg, 10)[0])


def random_like(tree, seed):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


@pytest.mark.slow
def test_clipping_sees_only_the_trainable_gradients():
  trainable = lm_trainable(freeze=("^token_embed/",))
  params = jax.tree.map(jnp.ones_like, jax.tree.map(
      lambda s: jnp.zeros(s.shape, s.dtype), trainable.abstract_params))
  grads = random_like(params, 0)
  grads["token_embed"]["embedding"] = grads["token_embed"]["embedding"] * 1e3
  tx = sgd(trainable, clip_norm=1.0)
  updates, _ = tx.update(grads, tx.init(params), params)
  names, mask = jax.tree.leaves(paths.param_paths(grads)), jax.tree.leaves(trainable.mask)
  trained = [np.asarray(g, np.float64) for g, m in zip(jax.tree.leaves(grads), mask) if m]
  norm = np.sqrt(sum(np.sum(g ** 2) for g in trained))
  for name, u, g, m in zip(names, jax.tree.leaves(updates), jax.tree.leaves(grads), mask):
    expected = np.asarray(g) * min(1.0, 1.0 / norm) if m else np.zeros(g.shape)
    np.testing.assert_allclose(-np.asarray(u), expected, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("what", ["freeze", "lora"])
def test_the_norm_of_every_gradient_clips_as_the_trainable_ones_alone(what):
  """The train step passes the norm it logs, over every gradient, to the clipping inside
  optax.partition: the frozen gradients are zeros (stop_gradient), so the updates are bitwise
  those of the clipping's own norm over the trainable gradients."""
  trainable = lm_trainable(freeze=("^token_embed/",)) if what == "freeze" else lm_trainable()
  if what == "lora":
    with trainable.lora_settings.unlocked():
      trainable.lora_settings.enabled = True
    trainable = Trainable(trainable.model, trainable.init_inputs, trainable.lora_settings)
  params = nn.unbox(trainable.init(jax.random.key(0)))
  batch = jnp.arange(12).reshape(2, 6) % 13
  loss = lambda p: jnp.sum(trainable.model.apply({"params": trainable.model_params(p)},
                                                 batch) ** 2)
  grads = jax.grad(loss)(params)
  tx = sgd(trainable, clip_norm=1e-3)
  state = TrainState.create(params=params, tx=tx, rng=jax.random.key(0))
  norm = optim.float32_global_norm(grads)
  given = state.apply_gradients(grads, tx, grad_norm=norm)
  own = state.apply_gradients(grads, tx)
  jax.tree.map(np.testing.assert_array_equal, given.params, own.params)
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, given.params, params)))
  own_updates, _ = tx.update(grads, state.opt_state, params)
  halved, _ = tx.update(grads, state.opt_state, params, grad_norm=2 * norm)  # the norm is read
  jax.tree.map(lambda h, o: np.testing.assert_allclose(2 * h, o, rtol=1e-6), halved, own_updates)


@pytest.mark.slow
def test_frozen_params_stay_bitwise_unchanged_and_get_no_gradient():
  trainable = lm_trainable(freeze=("^token_embed/", "layers_0/.*bias$"))
  cfg = optim.default_optim_config()
  cfg.update(dict(weight_decay=0.1, decay_embeddings=True, decay_norms_and_biases=True,
                  warmup_steps=0, learning_rate=0.1))
  tx = trainable.optimizer(optim.make_optimizer(cfg, 10)[0])
  params = nn.unbox(trainable.init(jax.random.key(0)))
  batch = jnp.arange(12).reshape(2, 6) % 13
  loss = lambda p: jnp.sum(trainable.model.apply({"params": trainable.model_params(p)}, batch))
  names = jax.tree.leaves(paths.param_paths(params))
  frozen = {n for n, m in zip(names, jax.tree.leaves(trainable.mask)) if not m}
  assert len(frozen) == 9  # token table; 2 norm, 4 attention and 2 mlp biases of layer 0
  grads = jax.grad(loss)(params)
  for name, g in zip(names, jax.tree.leaves(grads)):
    assert (not np.any(np.asarray(g))) == (name in frozen), name
  state, new = tx.init(params), params
  for seed in range(3):
    updates, state = tx.update(random_like(params, seed), state, new)
    new = optax.apply_updates(new, updates)
  for name, old, now in zip(names, jax.tree.leaves(params), jax.tree.leaves(new)):
    assert (np.asarray(old).tobytes() == np.asarray(now).tobytes()) == (name in frozen), name


@pytest.mark.parametrize("freeze, match", [
    (("token_embd",), "optim.freeze pattern 'token_embd' matches no parameter path"),
    ((".*",), "freeze every parameter"),
])
def test_bad_freeze_patterns(freeze, match):
  with pytest.raises(ValueError, match=match):
    lm_trainable(freeze=freeze)


@pytest.mark.pretrained
@pytest.mark.parametrize("head, pooling, absent", [
    ("classifier", "cls", {"classifier/kernel", "classifier/bias"}),
    ("classifier", "mean", {"classifier/kernel", "classifier/bias"}),
    ("mlm", "cls", None),
])
def test_import_reports_the_params_the_file_does_not_hold(head, pooling, absent):
  folder = assets.folder("tiny_bert")
  names = set(safetensors.numpy.load_file(f"{folder}/model.safetensors"))
  assert not any(n.startswith("classifier") for n in names) and "pooler.dense.weight" in names
  if head == "mlm":  # A BertModel file has no MLM head: an error, not a fresh head.
    with pytest.raises(pretrained.PretrainedError, match="missing"):
      pretrained.import_hf(folder, head=head)
    return
  imported = pretrained.import_hf(folder, head=head, num_classes=3, pooling=pooling)
  assert imported.initialised == absent
  assert absent <= set(paths.flatten(imported.params))


@pytest.mark.slow
def test_an_hf_folder_is_read_once_per_run(tmp_path, monkeypatch):
  config = finetune_gpt2.get_config("tiny")
  config.train.num_steps = config.train.checkpoint_every = 2
  config.train.eval_batches = 1
  reads = []
  read = pretrained._read_tensors
  monkeypatch.setattr(pretrained, "_read_tensors", lambda path: reads.append(path) or read(path))
  loop.train_and_evaluate(config, str(tmp_path))
  assert len(reads) == 1, reads
