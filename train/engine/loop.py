"""The training loop: config -> data, model, sharded state -> steps, metrics, evals, checkpoints.

Rerunning with the same workdir resumes from the latest checkpoint: parameters, optimizer
state, step, rng and the data iterator's position, so the resumed run continues with exactly
the numbers an uninterrupted one would have produced.
"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import sacrebleu
from jax.experimental import multihost_utils

from models import decoding
from models.errors import named_path
from train.engine import (checkpoint, metrics as metrics_lib, optim, parallel, preemption, records,
                          tasks)
from train.engine.metrics import say
from train.engine.state import TrainState
from train.engine.trainable import Trainable, pretrained_model, read_source
from train.run import (config as config_lib, hf_copy, inputs as inputs_lib, validation,
                       workdir as workdir_lib)


class NonFiniteLossError(RuntimeError):
  pass


@dataclasses.dataclass
class Experiment:
  """Everything built from a config before the first step."""
  config: object
  workdir: str
  inputs: inputs_lib.Inputs
  model_cfg: object
  task: tasks.Task
  trainable: Trainable
  mesh: object
  tx: optax.GradientTransformation
  schedule: optax.Schedule


def build(config, workdir: str) -> Experiment:
  """Data, model and optimizer of a validated config (train/run/validation.py); nothing compiled."""
  inputs = inputs_lib.make_inputs(config.task, config.data, config.seed, config.init_from,
                                  workdir)
  source = read_source(config.init_from, config.task, config.model, config.seed, workdir,
                       config.lora.adapter_only_checkpoint)
  model_cfg = config_lib.model_config(
      config, inputs.vocab_size, pretrained_model(config.init_from, config.model, workdir, source))
  model = tasks.make_model(config.task, model_cfg, num_classes=config.model.num_classes,
                           pooling=config.model.pooling)
  task = tasks.Task(config.task, model, config.label_smoothing)
  reread = (functools.partial(read_source, config.init_from, config.task, config.model,
                              config.seed) if config.init_from else None)
  trainable = Trainable(model, tasks.init_inputs(config.task, config.data), config.lora,
                        config.optim.freeze, source, reread)
  tx, schedule = optim.make_optimizer(config.optim, config.train.num_steps)
  return Experiment(config, workdir, inputs, model_cfg, task, trainable,
                    parallel.make_mesh(config.mesh), trainable.optimizer(tx), schedule)


def init_state(exp: Experiment, rng):
  """The sharded TrainState and its shardings (parameters placed by the mesh rules)."""
  init_rng, train_rng = jax.random.split(rng)
  init = lambda rng: TrainState.create(params=exp.trainable.init(rng), tx=exp.tx, rng=train_rng)
  return parallel.init_state(init, exp.mesh, parallel.DEFAULT_RULES, init_rng)


def make_train_step(exp: Experiment):
  accum = exp.config.optim.grad_accum_steps

  def loss_fn(params, batch, rng):
    objective_sum, sums = exp.task.loss(exp.trainable.model_params(params), batch, rng,
                                        train=True)
    return objective_sum, (sums["weight"], sums)

  def train_step(state: TrainState, batch):
    out = optim.accumulate_gradients(jax.value_and_grad(loss_fn, has_aux=True), state.params,
                                     batch, accum, state.step_key())
    grad_norm = optim.float32_global_norm(out.grads)  # once: for clipping and the metric
    new_state = state.apply_gradients(grads=out.grads, tx=exp.tx, grad_norm=grad_norm)
    return new_state, {**out.metrics, "grad_norm": grad_norm}

  return train_step


def jit_train_step(exp: Experiment, shardings, max_segments_per_row: int | None = None):
  """The train step jitted over the mesh: state placed by `shardings` and donated. The
  attention is promised `max_segments_per_row`: the capacity of the batches it will take
  (inputs.BatchLayout; 1: rows of one example, without segment ids), one jitted step per
  capacity; None: what the config's packing guarantees of every train batch."""
  if max_segments_per_row is None:
    max_segments_per_row = inputs_lib.max_segments_per_row(exp.config.task, exp.config.data)
  step = parallel.on_mesh(make_train_step(exp), exp.mesh,
                          max_segments_per_row=max_segments_per_row)
  return jax.jit(step,
                 in_shardings=(shardings, parallel.batch_sharding(exp.mesh)),
                 out_shardings=(shardings, None), donate_argnums=0)


def write_config(exp: Experiment):
  """WORKDIR/config.json: the config as run, with the model's vocab_size resolved; written
  once the run has started or resumed, so that a refused command leaves it as it was."""
  resolved = exp.config.copy_and_resolve_references()
  with resolved.unlocked():
    resolved.model.vocab_size = exp.model_cfg.vocab_size
  if jax.process_index() == 0:
    path = os.path.join(exp.workdir, "config.json")
    with open(path + ".tmp", "w") as f:
      f.write(resolved.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(path + ".tmp", path)  # Atomic: a reader sees the old file or the new one.


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains to `config.train.num_steps`, resuming from `workdir`; returns the last eval."""
  config = config_lib.resolve_assets(config)  # asset:NAME -> its folder, before anything reads it
  validation.validate(config, workdir)  # once, here: what follows takes the config as valid
  parallel.maybe_initialize_distributed(config.distributed)
  workdir_lib.check_workdir(config, workdir)
  with named_path(f"--workdir={workdir}"):
    os.makedirs(workdir, exist_ok=True)
  exp = build(config, workdir)
  # All checked, nothing compiled yet.
  hf_copy.keep(config.init_from, workdir, exp.model_cfg.tie_output)
  t = config.train
  state, shardings = init_state(exp, jax.random.key(config.seed))
  train_iter = iter(exp.inputs.train_pipeline(t.batch_size))
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                               save_every=t.checkpoint_every or t.num_steps,
                               keep=t.keep_checkpoints) as checkpointer:
    state, data_state = exp.trainable.start(checkpointer, state, shardings)
    if data_state is not None:
      train_iter.set_state(data_state)
      say(f"Resumed from step {int(state.step)} of {workdir}.")
    write_config(exp)
    num_params, num_trained = exp.trainable.num_params
    trained = "" if num_trained == num_params else f" ({num_trained:,} trained)"
    say(f"{config.task}: {num_params / 1e6:.2f}M parameters{trained} on {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s), mesh {dict(exp.mesh.shape)}; TensorBoard: "
        f"tensorboard --logdir {os.path.join(workdir, 'tensorboard')}")
    writer = metrics_lib.MetricsWriter(workdir, num_steps=t.num_steps,
                                       start_step=int(state.step),
                                       enabled=jax.process_index() == 0)
    try:
      results = run(exp, state, shardings, train_iter, checkpointer, writer)
    finally:
      writer.close()
  say(f"Done: {workdir} holds metrics.jsonl, tensorboard/ and checkpoints/. Ask it with: "
      f"python -m train.generate --workdir={workdir} --input=TEXT")
  return results


def run(exp: Experiment, state, shardings, train_iter, checkpointer, writer) -> dict:
  """Steps to num_steps: metrics every log_every, evals, checkpoints; stops on SIGTERM."""
  t = exp.config.train
  train_steps = functools.cache(functools.partial(jit_train_step, exp, shardings))
  layout = inputs_lib.BatchLayout(exp.config.task, exp.config.data)
  evaluator = Evaluator(exp)
  throughput = Throughput(exp)
  data_report = DataReport("train")
  learning_rate = host_schedule(exp.schedule)
  step, pending = int(state.step), []
  eval_due = lambda step: (t.eval_every and step % t.eval_every == 0) or step == t.num_steps
  last_eval = {}
  if step and eval_due(step):  # A run killed during this eval runs it again.
    last_eval = (records.recorded(exp.workdir, step, "eval")
                 or evaluator(state.params, step, writer))
  with preemption.PreemptionGuard() as guard:
    while step < t.num_steps:
      capacity, batch = layout(next(train_iter))
      batch = parallel.host_to_global(batch, exp.mesh)
      train_step = train_steps(capacity)
      throughput.count_flops_once(train_step, state, batch)
      state, sums = train_step(state, batch)
      step += 1
      pending.append(sums)
      writer.advance()
      stop = guard.should_stop(step)
      last = step == t.num_steps
      save = checkpointer.should_save(step) or last or stop
      if step % t.log_every == 0 or save:
        logged = flush(pending, step, learning_rate(step - 1))
        writer.write(step, "train", {**logged, **throughput.lap(logged, len(pending)),
                                     **data_report(train_iter.counts)})
        pending = []
      if save:
        checkpointer.save(step, exp.trainable.saved_view(state), train_iter.get_state(),
                          force=last or stop)
      if stop:
        say(f"Stopped by a signal at step {step}; checkpoint saved, rerun to resume.")
        break
      if eval_due(step):
        last_eval = evaluator(state.params, step, writer)
        throughput.skip()
  return last_eval


def host_schedule(schedule: optax.Schedule):
  """update count -> the learning rate `schedule` gives it, as the optimizer computes it
  (jitted, an int32 count, float32) but on the host's CPU: logging it costs the step nothing."""
  try:
    host = jax.local_devices(backend="cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS without "cpu": the default device
    host = None
  on_host = jax.jit(schedule)
  return lambda count: float(on_host(jax.device_put(np.int32(count), host)))


def flush(pending: list, step: int, learning_rate: float) -> dict:
  """Sums the steps' metric sums since the last log (the last step's grad norm, and its
  `learning_rate`); a non-finite loss stops the run."""
  sums = jax.device_get(jax.tree.map(lambda *xs: sum(xs), *pending))
  summary = tasks.summarize(sums)
  if not np.isfinite(summary["loss"]):
    raise NonFiniteLossError(
        f"The training loss became {summary['loss']} by step {step}. The last good "
        "checkpoint is kept; lower optim.learning_rate, raise optim.warmup_steps or set "
        "optim.clip_norm, then rerun to resume from it.")
  summary["grad_norm"] = float(pending[-1]["grad_norm"])
  summary["learning_rate"] = learning_rate
  summary["tokens"] = float(sums["weight"])
  return summary


class Throughput:
  """tokens/s (real target tokens) and MFU between logs, compile and eval time excluded.

  MFU is the step's FLOPs (its matrix products, forward and backward; see metrics.step_flops)
  per second, over the peak of the mesh's devices together.
  """

  def __init__(self, exp: Experiment):
    peak = metrics_lib.peak_flops_per_device(exp.config.train.peak_flops)
    self.mesh_peak = peak and peak * exp.mesh.size
    self.flops_per_step, self.counted = None, False
    self.stopwatch = metrics_lib.Stopwatch()
    self.first = True

  def count_flops_once(self, train_step, state, batch):
    """Counts the step's FLOPs on the first call where a peak is known."""
    if self.mesh_peak and not self.counted:
      self.flops_per_step = metrics_lib.step_flops(train_step.trace(state, batch))
      self.counted = True

  def skip(self):
    self.stopwatch.lap()

  def lap(self, logged: dict, steps: int) -> dict:
    seconds = self.stopwatch.lap()
    if self.first:  # The first interval holds the compilation.
      self.first = False
      return {"step_seconds_with_compile": seconds / steps}
    out = {"tokens_per_second": logged["tokens"] / seconds, "step_seconds": seconds / steps}
    if self.flops_per_step:
      out["mfu"] = self.flops_per_step * steps / seconds / self.mesh_peak
    return out


class Evaluator:
  """Loss metrics over the eval split (for classify also F1 and per-class precision and
  recall: train.engine.tasks.class_metrics); for seq2seq also decoding: exact match and BLEU.

  The loop calls it with the state's params; train.evaluate calls `evaluate` with a saved
  run's model params, recording them under the split's own name.
  """

  def __init__(self, exp: Experiment, split: str = "eval"):
    self.exp, self.split = exp, split
    t = exp.config.train
    self.batch_size = t.batch_size
    sharding = parallel.batch_sharding(exp.mesh)
    loss = lambda p, b: exp.task.loss(p, b)[1]
    self.layout = inputs_lib.BatchLayout(exp.config.task, exp.config.data, name=split)
    # One jitted eval step per segment capacity of the batches (inputs.BatchLayout).
    self.eval_steps = functools.cache(lambda capacity: jax.jit(
        parallel.on_mesh(loss, exp.mesh, max_segments_per_row=capacity),
        in_shardings=(None, sharding)))
    self.model_params = jax.jit(exp.trainable.model_params)
    self.search = workdir_lib.decoding_search(exp.config.decode, exp.config.task,
                                              exp.config.data.targets_len,
                                              exp.inputs.target_tokenizer)
    self.data_report = DataReport(split)

  def __call__(self, params, step: int, writer) -> dict:
    """Evaluates the state's `params` and writes the results as (`step`, split)."""
    results = self.evaluate(self.model_params(params))
    writer.write(step, self.split, results)
    return results

  def evaluate(self, params) -> dict:
    """The metrics of the model's `params` (as the model applies them) over the eval split."""
    exp, sums = self.exp, None
    batches = iter(exp.inputs.eval_pipeline(self.batch_size))
    for capacity, batch, _ in self.layout.lockstep(batches, exp.config.train.eval_batches):
      out = self.eval_steps(capacity)(params, parallel.host_to_global(batch, exp.mesh))
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    results = {**tasks.summarize(jax.device_get(sums)), **self.data_report(batches.counts)}
    if exp.config.task == "seq2seq":
      results.update(self.decode_metrics(params))
    return results

  def decode_metrics(self, params) -> dict:
    """Exact match and BLEU of decoding the eval split, one example a row. Sources, references
    and predictions are all read back from global arrays, so they share the global batch's
    order: the mesh's devices', which need not be the processes'."""
    exp = self.exp
    inputs, targets, predictions = [], [], []
    batches = iter(exp.inputs.eval_pipeline(self.batch_size, pack=False))
    for _, _, batch in self.layout.lockstep(batches, exp.config.train.eval_batches):
      rows = parallel.host_to_global({"sources": batch["encoder_tokens"],
                                      "mask": batch["encoder_segment_ids"] != 0,
                                      "references": batch["decoder_targets"],
                                      "real": batch["weights"].sum(-1) > 0}, exp.mesh)
      out = decoding.generate_encoder_decoder(
          exp.task.model, params, rows["sources"], self.search,
          encoder_padding_mask_BS=rows.pop("mask"), decoder_start_id=exp.inputs.decoder_start_id)
      rows = gather({**rows, "predictions": out.tokens_BN})
      for keep, src, ref, pred in zip(rows["real"], rows["sources"], rows["references"],
                                      rows["predictions"]):
        if keep:
          inputs.append(exp.inputs.input_tokenizer.decode(src))
          targets.append(exp.inputs.target_tokenizer.decode(ref))
          predictions.append(exp.inputs.target_tokenizer.decode(pred))
    exact = np.mean([p == r for p, r in zip(predictions, targets)]) if targets else 0.0
    bleu = sacrebleu.corpus_bleu(predictions, [targets]).score if targets else 0.0
    for src, ref, pred in list(zip(inputs, targets, predictions))[
        :exp.config.train.print_examples]:
      say(f"  {src} -> {pred}" + ("" if pred == ref else f"   (expected: {ref})"))
    return {"exact_match": float(exact), "bleu": float(bleu), "decoded": float(len(targets))}


def gather(tree):
  """Every host's rows as numpy arrays, a pytree like `tree`: of global jax arrays, the whole
  arrays (in the global order); of host-local numpy rows, their concatenation in process order."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


class DataReport:
  """The data pipeline's counts as metrics, and a line whenever examples were lost or cut.

  Counts are cumulative over the run (a resumed run's include the steps before the resume):
  examples read, and those dropped (empty, over-long pairs), cut (truncated, split) or
  decoded with replacement characters (invalid UTF-8).
  """

  LOSSES = ("empty", "dropped_long", "truncated", "truncated_tokens", "split", "invalid_utf8")

  def __init__(self, split: str):
    self.split, self.reported = split, {}

  def __call__(self, host_counts: dict) -> dict:
    """The metrics of every host's counts summed (a host counts the examples it read)."""
    counts = dict(zip(host_counts, gather(np.asarray([list(host_counts.values())])).sum(0)))
    losses = {k: int(counts[k]) for k in self.LOSSES if counts.get(k)}
    if losses and losses != self.reported:
      say(f"{self.split} data: {int(counts['examples']):,} examples read; " + ", ".join(
          f"{v:,} {k.replace('_', ' ')}" for k, v in losses.items()) + ".")
      self.reported = losses
    return {f"data_{k}": int(v) for k, v in counts.items()}
