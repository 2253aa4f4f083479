"""The train step computes each thing once: one global norm for clipping and the logged
grad_norm, no learning rate (logged from the host), hits counted in the loss's own pass (no
argmax), the loss over the padded vocabulary (no slice of the logits).

Counted in the jaxpr of the loop's step for experiments/gpt2_small.py:tiny (vocabulary 260
padded to 384); values against gradients of the task's loss taken apart from the step, clipped
by hand in float64, and the schedule jitted as the step ran it.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import gpt2_small
from train.engine import loop, optim, parallel


@pytest.fixture(scope="module")
def gpt2_tiny(tmp_path_factory):
  """(experiment, initial state, one train batch) of the tiny GPT-2, on the mesh."""
  config = gpt2_small.get_config("tiny")
  exp = loop.build(config, str(tmp_path_factory.mktemp("run")))
  state, _ = loop.init_state(exp, jax.random.key(0))
  batch = next(iter(exp.inputs.train_pipeline(config.train.batch_size)))
  return exp, state, parallel.host_to_global(batch, exp.mesh)


def equations(jaxpr):
  """Every equation of `jaxpr` and of the jaxprs inside it (jit, custom_vjp, scan...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for inner in param if isinstance(param, (list, tuple)) else (param,):
        inner = getattr(inner, "jaxpr", inner)
        if hasattr(inner, "eqns"):
          yield from equations(inner)


def test_the_step_computes_one_norm_no_learning_rate_no_argmax_and_no_vocab_slice(gpt2_tiny):
  exp, state, batch = gpt2_tiny
  cfg = exp.model_cfg
  assert cfg.padded_vocab_size > cfg.vocab_size
  eqns = list(equations(jax.make_jaxpr(loop.make_train_step(exp))(state, batch).jaxpr))
  named = lambda name: [e for e in eqns if e.primitive.name == name]
  assert len([e for e in named("sqrt") if e.outvars[0].aval.shape == ()]) == 1
  assert len(named("cos")) == 1  # the optimizer's cosine schedule; none for the metric
  assert not named("argmax")
  assert not [e for e in named("slice") if e.invars[0].aval.shape[-1] == cfg.padded_vocab_size]


def test_the_step_logs_the_norm_it_clips_by(gpt2_tiny):
  """With SGD at lr 1, the step's update is the clipped gradient itself: clipped by the norm
  of gradients taken apart from the step, in float64, to half of it."""
  exp, state, batch = gpt2_tiny

  def mean_loss(params):
    objective, metrics = exp.task.loss(exp.trainable.model_params(params), batch,
                                       state.step_key(), train=True)
    return objective / metrics["weight"]
  grads = jax.jit(jax.grad(mean_loss))(state.params)
  norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))

  cfg = optim.default_optim_config()
  cfg.update(dict(optimizer="sgd", momentum=0.0, schedule="constant", warmup_steps=0,
                  learning_rate=1.0, clip_norm=float(norm / 2)))
  tx, _ = optim.make_optimizer(cfg, 10)
  sgd = dataclasses.replace(exp, tx=tx)
  new_state, sums = jax.jit(loop.make_train_step(sgd))(state.replace(
      opt_state=tx.init(state.params)), batch)
  assert "learning_rate" not in sums
  np.testing.assert_allclose(sums["grad_norm"], norm, rtol=1e-5)
  jax.tree.map(lambda new, old, g: np.testing.assert_allclose(
      np.asarray(old, np.float64) - np.asarray(new, np.float64), np.asarray(g) / 2, rtol=1e-4,
      atol=1e-7), new_state.params, state.params, grads)


def test_the_logged_learning_rate_is_the_one_the_step_computed(gpt2_tiny):
  """Bitwise what the step's jitted schedule gives an int32 count (the step logged that)."""
  exp, _, _ = gpt2_tiny
  warmup, num_steps = exp.config.optim.warmup_steps, exp.config.train.num_steps
  on_host = loop.host_schedule(exp.schedule)
  in_step = jax.jit(exp.schedule)
  counts = sorted({0, 1, warmup - 1, warmup, (warmup + num_steps) // 2, num_steps - 1})
  for count in counts:
    assert on_host(count) == float(in_step(jnp.int32(count))), count
  assert on_host(warmup - 1) == pytest.approx(exp.config.optim.learning_rate, rel=1e-6)
