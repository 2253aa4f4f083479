"""train/engine/optim.py against closed forms, float64 numpy optimizers and optax's own pieces."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models import paths
from models.config import TransformerConfig
from models.transformer import DecoderOnly
from train.engine import optim


def _cfg(**changes):
  cfg = optim.default_optim_config()
  cfg.update(changes)
  return cfg


def _lrs(schedule, num_updates):
  return np.array([float(schedule(jnp.asarray(c, jnp.int32))) for c in range(num_updates)])


@pytest.fixture(scope="module")
def model_and_params():
  cfg = TransformerConfig(vocab_size=13, d_model=8, num_heads=2, d_ff=16, num_layers=1,
                          max_len=8, position="learned", tie_output=False)
  model = DecoderOnly(cfg)
  return model, _init(model)


def _init(model):
  init = jax.jit(lambda key: nn.unbox(model.init(key, jnp.zeros((1, 6), jnp.int32))["params"]))
  return init(jax.random.key(0))


def _random_like(tree, seed):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


# ----------------------------------------------------------------------------------------------
# Schedules.


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
@pytest.mark.parametrize("warmup", [0, 10])
def test_schedule_matches_closed_form(schedule, warmup):
  peak, factor, num_steps = 2e-3, 0.1, 50
  lrs = _lrs(optim.make_schedule(_cfg(schedule=schedule, learning_rate=peak, warmup_steps=warmup,
                                      end_learning_rate_factor=factor), num_steps),
             num_steps + 5)
  s = np.arange(1, num_steps + 6, dtype=np.float64)  # 1-based update number
  end = factor * peak
  progress = np.clip((s - warmup) / (num_steps - warmup), 0.0, 1.0)
  after_warmup = {"constant": np.full_like(s, peak),
                  "cosine": end + (peak - end) * 0.5 * (1 + np.cos(np.pi * progress)),
                  "linear": peak + (end - peak) * progress}[schedule]
  expected = np.where(s <= warmup, peak * s / max(warmup, 1), after_warmup)
  np.testing.assert_allclose(lrs, expected, rtol=1e-5)
  assert lrs[0] > 0
  if warmup:
    assert lrs[warmup - 1] == pytest.approx(peak)


def test_decay_steps_overrides_num_steps():
  schedule = optim.make_schedule(_cfg(schedule="linear", warmup_steps=0, decay_steps=20,
                                      learning_rate=1.0), num_steps=100)
  assert float(schedule(9)) == pytest.approx(0.5)
  assert float(schedule(19)) == 0.0 and float(schedule(60)) == 0.0


@pytest.mark.parametrize("d_model,warmup,peak_scale", [(512, 4000, 1.0), (64, 20, 3.0)])
def test_rsqrt_is_the_papers_schedule(d_model, warmup, peak_scale):
  """lr = scale * d^-0.5 * min(s^-0.5, s * w^-1.5); learning_rate = scale * (d * w)^-0.5."""
  peak = peak_scale * (d_model * warmup) ** -0.5
  schedule = optim.make_schedule(_cfg(schedule="rsqrt", learning_rate=peak,
                                      warmup_steps=warmup), num_steps=10 * warmup)
  s = np.array([1, 2, warmup // 2, warmup - 1, warmup, warmup + 1, 3 * warmup, 10 * warmup],
               np.float64)
  paper = peak_scale * d_model ** -0.5 * np.minimum(s ** -0.5, s * warmup ** -1.5)
  ours = np.array([float(schedule(jnp.asarray(c - 1, jnp.int32))) for c in s.astype(int)])
  np.testing.assert_allclose(ours, paper, rtol=1e-5, atol=1e-6 * peak)  # float32 warmup
  assert ours.max() == pytest.approx(peak)


# ----------------------------------------------------------------------------------------------
# Weight-decay mask and decoupled decay.


@pytest.mark.parametrize("scan_layers", [False, True])
def test_weight_decay_mask_on_decoder_only(scan_layers):
  cfg = TransformerConfig(vocab_size=13, d_model=8, num_heads=2, d_ff=16, num_layers=2,
                          max_len=8, position="learned", tie_output=False,
                          scan_layers=scan_layers)
  params = _init(DecoderOnly(cfg))
  names = jax.tree.leaves(paths.param_paths(params))

  def decayed(**switches):
    mask = jax.tree.leaves(optim.weight_decay_mask(params, **switches))
    return {path for path, decays in zip(names, mask) if decays}

  kernels = {p for p in names if p.endswith("/kernel")}
  embeddings = {"token_embed/embedding", "decoder/embedder/position_embed/embedding"}
  norms_and_biases = {p for p in names if p.endswith(("/scale", "/bias"))}
  assert "decoder/logits_dense/kernel" in kernels and len(norms_and_biases) > 4
  assert embeddings <= set(names) and set(names) == kernels | embeddings | norms_and_biases
  assert decayed() == kernels
  assert decayed(decay_embeddings=True) == kernels | embeddings
  assert decayed(decay_norms_and_biases=True) == kernels | norms_and_biases


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", "sgd"])
def test_decay_is_decoupled_lr_scaled_and_masked(optimizer, model_and_params):
  """With zero gradients one update shrinks exactly the kernels by lr * weight_decay."""
  _, params = model_and_params
  lr, wd = 0.1, 0.5
  tx, _ = optim.make_optimizer(_cfg(optimizer=optimizer, schedule="constant", warmup_steps=0,
                                    learning_rate=lr, weight_decay=wd), 10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
  new_params = optax.apply_updates(params, updates)
  for path, old, new in zip(jax.tree.leaves(paths.param_paths(params)), jax.tree.leaves(params),
                            jax.tree.leaves(new_params)):
    factor = 1 - lr * wd if path.endswith("/kernel") else 1.0
    np.testing.assert_allclose(new, np.asarray(old, np.float64) * factor, rtol=1e-6, err_msg=path)


def _numpy_adamw(params, grads_seq, lrs, b1, b2, eps, wd, decays):
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v = {k: np.zeros_like(p) for k, p in params.items()}
  for t, (grads, lr) in enumerate(zip(grads_seq, lrs), start=1):
    for k, g in grads.items():
      g = np.asarray(g, np.float64)
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      m_hat, v_hat = m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)
      params[k] = params[k] - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * decays[k] * params[k])
  return params


def _numpy_sgd(params, grads_seq, lrs, momentum, nesterov, wd, decays):
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  buf = {k: np.zeros_like(v) for k, v in params.items()}
  for grads, lr in zip(grads_seq, lrs):
    for k, g in grads.items():
      g = np.asarray(g, np.float64)
      buf[k] = momentum * buf[k] + g
      direction = g + momentum * buf[k] if nesterov else buf[k]
      params[k] = params[k] - lr * (direction + wd * decays[k] * params[k])
  return params


@pytest.mark.parametrize("optimizer,nesterov", [("adamw", False), ("sgd", False), ("sgd", True)])
def test_optimizer_matches_numpy_reference(optimizer, nesterov):
  shapes = {"kernel": (3, 4), "bias": (4,), "embedding": (5, 3)}
  params = {k: np.random.RandomState(1).randn(*s).astype(np.float32) for k, s in shapes.items()}
  rng = np.random.RandomState(2)
  grads_seq = [{k: rng.randn(*s).astype(np.float32) for k, s in shapes.items()} for _ in range(4)]
  cfg = _cfg(optimizer=optimizer, nesterov=nesterov, learning_rate=0.01, schedule="linear",
             warmup_steps=2, weight_decay=0.3, clip_norm=0, b1=0.8, b2=0.95, eps=1e-6,
             momentum=0.7)
  tx, schedule = optim.make_optimizer(cfg, 6)
  state, ours = tx.init(params), params
  for grads in grads_seq:
    updates, state = tx.update(grads, state, ours)
    ours = optax.apply_updates(ours, updates)
  lrs = [0.005, 0.01, 0.0075, 0.005]  # warmup 2, then linear to 0 at update 6
  np.testing.assert_allclose(_lrs(schedule, 4), lrs, rtol=1e-6)
  decays = {"kernel": 1.0, "bias": 0.0, "embedding": 0.0}
  if optimizer == "adamw":
    reference = _numpy_adamw(params, grads_seq, lrs, 0.8, 0.95, 1e-6, 0.3, decays)
  else:
    reference = _numpy_sgd(params, grads_seq, lrs, 0.7, nesterov, 0.3, decays)
  for k in shapes:
    np.testing.assert_allclose(ours[k], reference[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_adafactor_without_decay_is_optax_adafactor():
  params = {"w": {"kernel": jnp.ones((130, 4))}, "b": {"bias": jnp.ones((4,))}}
  cfg = _cfg(optimizer="adafactor", warmup_steps=3, clip_norm=0)
  ours, schedule = optim.make_optimizer(cfg, 10)
  reference = optax.adafactor(schedule)
  ours_state, reference_state = ours.init(params), reference.init(params)
  for seed in range(4):
    grads = _random_like(params, seed)
    ours_updates, ours_state = ours.update(grads, ours_state, params)
    reference_updates, reference_state = reference.update(grads, reference_state, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ours_updates,
                 reference_updates)


# ----------------------------------------------------------------------------------------------
# Clipping.


def _sgd_updates(grads, params, grad_norm=None, **changes):
  cfg = _cfg(optimizer="sgd", momentum=0.0, schedule="constant", warmup_steps=0,
             learning_rate=1.0, **changes)
  tx, _ = optim.make_optimizer(cfg, 10)
  extra_args = {} if grad_norm is None else {"grad_norm": grad_norm}
  updates, _ = tx.update(grads, tx.init(params), params, **extra_args)
  return updates


@pytest.mark.parametrize("scale", [0.01, 100.0])
def test_clipping_matches_optax_and_numpy(scale):
  params = {"a": {"kernel": jnp.ones((3, 4))}, "b": {"bias": jnp.ones((4,))}}
  grads = jax.tree.map(lambda x: scale * x, _random_like(params, 3))
  updates = _sgd_updates(grads, params, clip_norm=0.5)
  optax_clipped, _ = optax.clip_by_global_norm(0.5).update(grads, optax.EmptyState())
  norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
  for u, g, o in zip(jax.tree.leaves(updates), jax.tree.leaves(grads),
                     jax.tree.leaves(optax_clipped)):
    np.testing.assert_allclose(-u, o, rtol=1e-6)
    np.testing.assert_allclose(-u, np.asarray(g) * min(1.0, 0.5 / norm), rtol=1e-5)
  unclipped = _sgd_updates(grads, params, clip_norm=0)
  for u, g in zip(jax.tree.leaves(unclipped), jax.tree.leaves(grads)):
    np.testing.assert_array_equal(-u, g)


@pytest.mark.parametrize("scale", [0.01, 100.0])
def test_clipping_takes_the_norm_it_is_given_and_keeps_optax_state(scale, model_and_params):
  """The train step passes the norm it logs (grad_norm) to the clipping: the same updates as
  the norm computed inside, and optax's clip_by_global_norm's state, so old checkpoints
  restore."""
  _, params = model_and_params
  grads = jax.tree.map(lambda x: scale * x, _random_like(params, 4))
  norm = optim.float32_global_norm(grads)
  want_norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
  np.testing.assert_allclose(norm, want_norm, rtol=1e-6)
  tx, _ = optim.make_optimizer(_cfg(clip_norm=0.5, warmup_steps=0), 10)
  unclipped_tx, _ = optim.make_optimizer(_cfg(clip_norm=0, warmup_steps=0), 10)
  reference = optax.chain(optax.clip_by_global_norm(0.5), unclipped_tx)
  state = tx.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(reference.init(params))
  given, _ = tx.update(grads, state, params, grad_norm=norm)
  computed, _ = tx.update(grads, state, params)
  want, _ = reference.update(grads, reference.init(params), params)
  jax.tree.map(np.testing.assert_array_equal, given, computed)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), given, want)
  if scale > 1:  # clipped: by the norm given, not one computed again
    doubled = _sgd_updates(grads, params, clip_norm=0.5, grad_norm=2 * norm)
    for u, g in zip(jax.tree.leaves(doubled), jax.tree.leaves(grads)):
      np.testing.assert_allclose(-u, np.asarray(g) * 0.5 / (2 * want_norm), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Gradient accumulation.


def _lm_loss_sums(model):
  def loss_fn(params, batch, rng):
    del rng
    logits = model.apply({"params": params}, batch["inputs"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    weights = batch["weights"]
    correct = (logits.argmax(-1) == batch["targets"]) * weights
    return (losses * weights).sum(), (weights.sum(), {"correct": correct.sum()})
  return loss_fn


@pytest.mark.slow
def test_accumulated_grads_equal_full_batch_grads(model_and_params):
  model, params = model_and_params
  rng = np.random.RandomState(0)
  tokens = rng.randint(0, 13, (8, 7))
  weights = (rng.rand(8, 6) < 0.6).astype(np.float32)
  weights[::4] = 1.0  # microbatch 0 (rows 0, 4) carries far more weight than the others
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}
  loss_fn = _lm_loss_sums(model)

  def mean_loss(p, rows=slice(None)):
    loss_sum, (weight_sum, metrics) = loss_fn(p, jax.tree.map(lambda x: x[rows], batch), None)
    return loss_sum / weight_sum, metrics

  @jax.jit
  def reference(p):
    (loss, metrics), grads = jax.value_and_grad(mean_loss, has_aux=True)(p)
    mean_of_means = jnp.mean(jnp.stack([mean_loss(p, slice(i, None, 4))[0] for i in range(4)]))
    return loss, metrics, grads, mean_of_means
  expected_loss, expected_metrics, expected_grads, mean_of_means = reference(params)
  assert abs(mean_of_means - expected_loss) > 1e-3 * expected_loss  # the weights matter here

  accumulate = jax.jit(optim.accumulate_gradients, static_argnums=(0, 3))
  loss_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
  for num_microbatches in (1, 4):
    out = accumulate(loss_and_grad, params, batch, num_microbatches, None)
    np.testing.assert_allclose(out.loss, expected_loss, rtol=1e-6)
    assert float(out.weight) == weights.sum()
    assert float(out.metrics["correct"]) == float(expected_metrics["correct"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 out.grads, expected_grads)


def test_accumulation_gives_each_microbatch_its_own_key():
  def loss_and_grad(params, batch, rng):
    noise = jax.random.uniform(rng, ())
    return (batch["x"].sum() * params, (jnp.float32(batch["x"].shape[0]), {"noise": noise})), params
  rng = jax.random.key(7)
  out = optim.accumulate_gradients(loss_and_grad, jnp.float32(2.0), {"x": jnp.ones((8, 3))}, 4,
                                   rng)
  expected = sum(float(jax.random.uniform(k, ())) for k in jax.random.split(rng, 4))
  assert float(out.metrics["noise"]) == pytest.approx(expected, rel=1e-6)
  assert float(out.loss) == pytest.approx(6.0) and float(out.weight) == 8.0


def test_accumulation_rejects_an_indivisible_batch():
  loss_and_grad = lambda p, b, r: ((b.sum(), (jnp.float32(1), {})), p)
  with pytest.raises(ValueError, match="divisible by optim.grad_accum_steps"):
    optim.accumulate_gradients(loss_and_grad, jnp.float32(1.0), jnp.ones((6, 2)), 4)


# ----------------------------------------------------------------------------------------------
# Configuration.


def test_default_config_is_valid_and_builds_every_optimizer(model_and_params):
  _, params = model_and_params
  optim.validate_optim_config(optim.default_optim_config(), batch_size=8, num_steps=1000)
  for optimizer in optim.OPTIMIZERS:
    tx, _ = optim.make_optimizer(_cfg(optimizer=optimizer), 1000)
    jax.eval_shape(tx.init, params)


@pytest.mark.parametrize("changes,batch_size,num_steps,match", [
    (dict(optimizer="adam"), None, None, "unknown optimizer 'adam'"),
    (dict(schedule="noam"), None, None, "unknown schedule 'noam'"),
    (dict(learning_rate=-1e-3), None, None, "learning_rate must be a number >= 0"),
    (dict(warmup_steps=200), None, 100, "warmup_steps=200 exceeds the decay steps"),
    (dict(warmup_steps=50, decay_steps=20), None, 1000, "warmup_steps=50 exceeds"),
    (dict(grad_accum_steps=3), 8, None, "grad_accum_steps=3 does not divide the batch size 8"),
    (dict(schedule="rsqrt", warmup_steps=0), None, None, "rsqrt schedule needs warmup_steps > 0"),
    (dict(lerning_rate=1.0), None, None, r"unknown field\(s\) \['lerning_rate'\]"),
    (dict(freeze=("(",)), None, None, "is not a valid regular expression"),
    (dict(clip_norm=-1.0), None, None, "clip_norm must be >= 0"),
])
def test_config_errors(changes, batch_size, num_steps, match):
  cfg = optim.default_optim_config()
  with cfg.unlocked(), cfg.ignore_type():
    for key, value in changes.items():
      cfg[key] = value
  with pytest.raises(ValueError, match=match):
    optim.validate_optim_config(cfg, batch_size=batch_size, num_steps=num_steps)
