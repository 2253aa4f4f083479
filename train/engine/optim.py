"""Optax optimizers for tapete: schedules, clipping, weight-decay masks, accumulation.

Config: `config.optim` (see `default_optim_config`). Which parameters train (optim.freeze,
LoRA) is train/engine/trainable.py's: it wraps the optimizer made here.

Step convention. An optax schedule is called with the optimizer's update count: 0 for the
first update. Our schedules are written in terms of the 1-based update number
`s = count + 1`, so that the first update never gets a zero learning rate:

  warmup (s <= warmup_steps):  lr = peak * s / warmup_steps
  constant:                    lr = peak
  cosine:                      lr = end + (peak - end) * (1 + cos(pi * p)) / 2
  linear:                      lr = peak + (end - peak) * p
      with p = min((s - warmup_steps) / (decay_steps - warmup_steps), 1), end = factor * peak
  rsqrt (the paper's):         lr = peak * min(s / warmup_steps, sqrt(warmup_steps / s))

The learning rate reaches `peak` at update `warmup_steps` and `end` at update `decay_steps`.
"rsqrt" is the paper's d_model^-0.5 * min(s^-0.5, s * warmup^-1.5) normalised so that its
maximum, at s == warmup_steps, equals `learning_rate`: the paper's base model (d_model=512,
warmup 4000) is `learning_rate = (512 * 4000) ** -0.5`, about 7.0e-4.

Weight decay is decoupled and scaled by the learning rate for every optimizer (as optax.adamw
and PyTorch's AdamW): each update also multiplies a decayed parameter by
`1 - lr(s) * weight_decay`.
It applies to matrices ("kernel") only, unless `decay_embeddings` / `decay_norms_and_biases`
say otherwise; parameters with other names decay when they have two or more dimensions.
"""

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from ml_collections import config_dict

from models import paths
from models.errors import InputError

OPTIMIZERS = ("adamw", "adafactor", "sgd")
SCHEDULES = ("constant", "cosine", "linear", "rsqrt")
EMBEDDING_NAMES = ("embedding", "rel_embedding")  # token, position, type and relative tables
NORM_AND_BIAS_NAMES = ("scale", "bias")


def default_optim_config() -> ml_collections.ConfigDict:
  """The `config.optim` schema with its defaults; experiments start from it."""
  return ml_collections.ConfigDict(dict(
      optimizer="adamw",                # adamw | adafactor | sgd
      learning_rate=1e-3,               # peak lr (rsqrt as the paper: (d_model*warmup)**-0.5)
      schedule="cosine",                # constant | cosine | linear | rsqrt (after linear warmup)
      warmup_steps=100,                 # updates of linear warmup from 0 to the peak
      decay_steps=config_dict.placeholder(int),  # cosine/linear end here; None = num_steps
      end_learning_rate_factor=0.0,     # final lr = factor * peak (cosine/linear)
      b1=0.9, b2=0.98, eps=1e-9,        # Adam(W) moments and epsilon
      momentum=0.9,                     # sgd; 0 = plain sgd
      nesterov=False,                   # sgd: Nesterov momentum
      weight_decay=0.0,                 # decoupled, lr-scaled decay of the masked params
      decay_embeddings=False,           # also decay embedding tables (token, position, relative)
      decay_norms_and_biases=False,     # also decay norm scales and biases
      clip_norm=1.0,                    # global-norm clipping of the trainable grads; 0/None = off
      grad_accum_steps=1,               # microbatches per step (accumulated inside the step)
      freeze=(),                        # regexes (re.search) over "/"-joined param paths of
                                        # params to freeze (applied by train/engine/trainable.py)
  ))


# ----------------------------------------------------------------------------------------------
# Validation.


def _resolved(optim_cfg) -> ml_collections.ConfigDict:
  """The defaults updated with `optim_cfg`; unknown fields are an error."""
  cfg = default_optim_config()
  given = dict(optim_cfg.items())
  unknown = sorted(set(given) - set(cfg))
  if unknown:
    raise InputError(f"Invalid optim config: unknown field(s) {unknown}; known fields are "
                     f"{sorted(cfg)}.")
  with cfg.ignore_type():
    cfg.update(given)
  return cfg


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _problems(cfg, batch_size: int | None, num_steps: int | None) -> list[str]:
  problems = []
  if cfg.optimizer not in OPTIMIZERS:
    problems.append(f"unknown optimizer {cfg.optimizer!r}; choose from {OPTIMIZERS}")
  if cfg.schedule not in SCHEDULES:
    problems.append(f"unknown schedule {cfg.schedule!r}; choose from {SCHEDULES}")
  for name in ("learning_rate", "weight_decay", "end_learning_rate_factor", "eps"):
    value = getattr(cfg, name)
    if not _is_number(value) or not math.isfinite(value) or value < 0:
      problems.append(f"{name} must be a number >= 0 and finite, got {value!r}")
  for name in ("b1", "b2", "momentum"):
    value = getattr(cfg, name)
    if not _is_number(value) or not 0 <= value < 1:
      problems.append(f"{name} must be in [0, 1), got {value!r}")
  if cfg.clip_norm is not None and (not _is_number(cfg.clip_norm)
                                    or not math.isfinite(cfg.clip_norm) or cfg.clip_norm < 0):
    problems.append(f"clip_norm must be >= 0 and finite (0 or None = no clipping), got "
                    f"{cfg.clip_norm!r}")
  if not isinstance(cfg.warmup_steps, int) or cfg.warmup_steps < 0:
    problems.append(f"warmup_steps must be an integer >= 0, got {cfg.warmup_steps!r}")
  elif cfg.schedule == "rsqrt" and cfg.warmup_steps == 0:
    problems.append("the rsqrt schedule needs warmup_steps > 0 (its peak is at warmup_steps)")
  if cfg.decay_steps is not None and (not isinstance(cfg.decay_steps, int)
                                      or cfg.decay_steps <= 0):
    problems.append(f"decay_steps must be a positive integer or None, got {cfg.decay_steps!r}")
  if num_steps is not None and (not isinstance(num_steps, int) or num_steps <= 0):
    problems.append(f"num_steps must be a positive integer, got {num_steps!r}")
  decay_steps = cfg.decay_steps or num_steps
  if (isinstance(decay_steps, int) and isinstance(cfg.warmup_steps, int)
      and cfg.warmup_steps > decay_steps):
    problems.append(f"warmup_steps={cfg.warmup_steps} exceeds the decay steps ({decay_steps}, "
                    "optim.decay_steps or else train.num_steps): lower warmup_steps or raise "
                    "the steps")
  if not isinstance(cfg.grad_accum_steps, int) or cfg.grad_accum_steps < 1:
    problems.append(f"grad_accum_steps must be an integer >= 1, got {cfg.grad_accum_steps!r}")
  elif batch_size is not None and batch_size % cfg.grad_accum_steps:
    problems.append(f"grad_accum_steps={cfg.grad_accum_steps} does not divide the batch size "
                    f"{batch_size}: choose a divisor of it or change train.batch_size")
  return problems + paths.pattern_problems("freeze pattern", cfg.freeze)


def validate_optim_config(optim_cfg, batch_size: int | None = None,
                          num_steps: int | None = None) -> None:
  """Raises one InputError naming every problem of `optim_cfg` (and the fix)."""
  problems = _problems(_resolved(optim_cfg), batch_size, num_steps)
  if problems:
    raise InputError("Invalid optim config: " + "; ".join(problems) + ".")


# ----------------------------------------------------------------------------------------------
# Schedules.


def make_schedule(optim_cfg, num_steps: int) -> optax.Schedule:
  """The learning rate as a function of the update count (0 = first update); module doc."""
  validate_optim_config(optim_cfg, num_steps=num_steps)
  cfg = _resolved(optim_cfg)
  peak, warmup = cfg.learning_rate, cfg.warmup_steps
  decay_steps = max((cfg.decay_steps or num_steps) - warmup, 1)
  end = cfg.end_learning_rate_factor * peak
  if cfg.schedule == "constant":
    after_warmup = optax.constant_schedule(peak)
  elif cfg.schedule == "cosine":
    after_warmup = optax.cosine_decay_schedule(peak, decay_steps, cfg.end_learning_rate_factor)
  elif cfg.schedule == "linear":
    after_warmup = optax.linear_schedule(peak, end, decay_steps)
  else:
    after_warmup = lambda t: peak * jnp.sqrt(warmup / (t + warmup))
  by_update_number = optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), after_warmup], [warmup])
  return lambda count: by_update_number(count + 1)


# ----------------------------------------------------------------------------------------------
# The weight-decay mask.


def weight_decay_mask(params, *, decay_embeddings: bool = False,
                      decay_norms_and_biases: bool = False) -> Any:
  """True where a parameter decays: kernels; embeddings, norms and biases only when asked."""
  def decays(path, leaf):
    name = path.rsplit("/", 1)[-1]
    if name == "kernel":
      return True
    if name in EMBEDDING_NAMES:
      return decay_embeddings
    if name in NORM_AND_BIAS_NAMES:
      return decay_norms_and_biases
    return len(getattr(leaf, "shape", ())) >= 2
  return jax.tree.map(decays, paths.param_paths(params), params)


# ----------------------------------------------------------------------------------------------
# Optimizers.


def _optimizer(cfg, schedule: optax.Schedule, decay_mask: Callable) -> optax.GradientTransformation:
  if cfg.optimizer == "adamw":
    return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                       weight_decay=cfg.weight_decay, mask=decay_mask)
  if cfg.optimizer == "adafactor":
    # optax.adafactor's default chain, with the decay moved before the learning rate so that
    # it is lr-scaled like the others (optax.adafactor's own decay is not).
    return optax.chain(
        optax.scale_by_factored_rms(),
        optax.clip_by_block_rms(1.0),
        optax.scale_by_param_block_rms(),
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(schedule))
  return optax.chain(
      optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov) if cfg.momentum else optax.identity(),
      optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
      optax.scale_by_learning_rate(schedule))


def make_optimizer(optim_cfg,
                   num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax transformation of `config.optim` and its learning-rate schedule.

  Adafactor is optax.adafactor's defaults (factored second moments,
  update clipping 1.0, parameter-scaled steps, no momentum) with our schedule and weight decay;
  b1, b2, eps and momentum do not apply to it.
  """
  cfg = _resolved(optim_cfg)
  schedule = make_schedule(cfg, num_steps)
  decay_mask = functools.partial(weight_decay_mask, decay_embeddings=cfg.decay_embeddings,
                                 decay_norms_and_biases=cfg.decay_norms_and_biases)
  tx = _optimizer(cfg, schedule, decay_mask)
  if cfg.clip_norm:
    tx = optax.chain(clip_by_global_norm(cfg.clip_norm), tx)
  return tx, schedule


# ----------------------------------------------------------------------------------------------
# Clipping by the global norm, computed once a step.


def float32_global_norm(tree) -> jax.Array:
  """sqrt(sum of squares) over every leaf, summed in float32 whatever the leaves' dtype (optax's
  own, optax.tree.norm from 0.2.5 on, sums in theirs: bf16 gradients would lose the norm)."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """optax.clip_by_global_norm (the same state, so checkpoints of either restore) that takes
  the updates' norm from the extra argument `grad_norm` when the caller has it already: the
  train step computes it once for clipping and its logged metric. Without it, computed here.

  A caller passing `grad_norm` to a transformation that sees part of the gradient (frozen
  params, optax.partition) passes the norm of what it sees: the train step's frozen params get
  exact zeros (stop_gradient), which leave the norm unchanged."""
  def update(updates, state, params=None, *, grad_norm=None, **extra_args):
    del params, extra_args
    norm = float32_global_norm(updates) if grad_norm is None else grad_norm
    unclipped = norm < max_norm
    clip = lambda x: jax.lax.select(unclipped, x, (x / norm.astype(x.dtype)) * max_norm)
    return jax.tree.map(clip, updates), state
  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


# ----------------------------------------------------------------------------------------------
# Gradient accumulation.


class Accumulated(NamedTuple):
  """What `accumulate_gradients` returns for the whole batch."""
  grads: Any          # gradient of the weighted mean loss: sum of grads / total weight
  loss: jax.Array     # weighted mean loss: sum of loss sums / total weight
  weight: jax.Array   # total weight (e.g. the number of target tokens)
  metrics: Any        # metric sums over the whole batch (divide by `weight` to average)


def _microbatches(x, num_microbatches: int):
  """[B, ...] -> [num_microbatches, B // num_microbatches, ...]; microbatch i: rows i, i+n, ...

  Strided rather than contiguous rows, so that a batch sharded over its leading axis gives
  microbatches spread over the same devices (no data movement).
  """
  if x.ndim == 0 or x.shape[0] % num_microbatches:
    raise InputError(f"A batch leaf of shape {x.shape} cannot be split into {num_microbatches} "
                     "microbatches: its leading (batch) axis must be divisible by "
                     "optim.grad_accum_steps.")
  return x.reshape((x.shape[0] // num_microbatches, num_microbatches) + x.shape[1:]).swapaxes(0, 1)


def _accumulator(shape: jax.ShapeDtypeStruct):
  dtype = shape.dtype
  if jnp.issubdtype(dtype, jnp.floating):
    dtype = jnp.promote_types(dtype, jnp.float32)
  return jnp.zeros(shape.shape, dtype)


def accumulate_gradients(loss_and_grad_fn: Callable, params, batch, num_microbatches: int,
                         rng: jax.Array | None = None) -> Accumulated:
  """Gradients of the whole batch's weighted mean loss, summed over microbatches by `lax.scan`.

  Contract: `loss_and_grad_fn(params, microbatch, rng) -> ((loss_sum, (weight_sum,
  metric_sums)), grads_of_loss_sum)`, i.e. `jax.value_and_grad(loss_fn, has_aux=True)` of a
  `loss_fn` returning the *sum* of the per-example (or per-token) losses, the sum of their
  weights and a pytree of metric sums. Sums add up across microbatches, so the result equals
  one call on the full batch whatever the weights of each microbatch. Every batch leaf is split
  along its leading axis; each microbatch gets its own key split from `rng` (None stays None).
  Sums are kept in at least float32; a total weight of 0 gives zero grads and loss.
  """
  if not isinstance(num_microbatches, int) or num_microbatches < 1:
    raise InputError(f"num_microbatches must be an integer >= 1, got {num_microbatches!r}.")
  if num_microbatches == 1:
    (loss_sum, (weight_sum, metric_sums)), grad_sums = loss_and_grad_fn(params, batch, rng)
  else:
    microbatches = jax.tree.map(lambda x: _microbatches(x, num_microbatches), batch)
    rngs = None if rng is None else jax.random.split(rng, num_microbatches)

    def add(sums, microbatch_and_rng):
      out = loss_and_grad_fn(params, *microbatch_and_rng)
      return jax.tree.map(lambda s, o: s + o.astype(s.dtype), sums, out), None

    first = jax.tree.map(lambda x: x[0], (microbatches, rngs))
    zeros = jax.tree.map(_accumulator, jax.eval_shape(loss_and_grad_fn, params, *first))
    sums, _ = jax.lax.scan(add, zeros, (microbatches, rngs))
    (loss_sum, (weight_sum, metric_sums)), grad_sums = sums
  denominator = jnp.where(weight_sum > 0, weight_sum, 1)
  grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grad_sums, params)
  return Accumulated(grads, loss_sum / denominator, weight_sum, metric_sums)
