"""Evaluate a saved run without training it.

  python -m train.evaluate --workdir=DIR [--split=validation] [--checkpoint_step=N]

Loss, accuracy and perplexity over the split (default: the run's `data.eval_split`), for
seq2seq exact match and BLEU of decoding with the run's `config.decode`, and for classify F1
and per-class precision and recall (train.engine.tasks.class_metrics), computed by the training
loop's own eval (train.engine.loop.Evaluator, the same batches and `train.eval_batches`) with the
params of checkpoint N (default: the latest). The results are printed, and appended to
metrics.jsonl (and TensorBoard) at N's step, with `split` set to the split's name.
"""

import os

from absl import app, flags, logging
import jax
import orbax.checkpoint as ocp

from models.errors import InputError
from train.engine import loop, metrics as metrics_lib, parallel
from train.run import cli, compilation_cache, validation, workdir as workdir_lib

FLAGS = flags.FLAGS


def checkpoint_step(workdir: str, step: int | None) -> int:
  """`step` if `workdir` holds a complete checkpoint of it; with None, the latest."""
  folder = os.path.join(workdir, "checkpoints")
  steps = sorted(ocp.utils.checkpoint_steps(folder)) if os.path.isdir(folder) else []
  if not steps:
    raise InputError(f"{workdir} holds no complete checkpoint in checkpoints/: train it first "
                     "(python -m train --config=... --workdir=...).")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise InputError(f"--checkpoint_step={step}: {workdir} holds checkpoints of steps "
                     f"{', '.join(map(str, steps))}; pick one of them.")
  return step


def evaluate(workdir: str, split: str | None = None, step: int | None = None) -> dict:
  """Evaluates the run in `workdir` at checkpoint `step` (None: the latest) on `split` (None:
  its eval split), appends the results to its metrics.jsonl, and returns them."""
  config = workdir_lib.run_config(workdir)
  if split is not None:
    config.data.eval_split = split
  validation.validate(config, workdir)
  step = checkpoint_step(workdir, step)
  exp = loop.build(config, workdir)
  model = exp.task.model
  boxed = jax.eval_shape(lambda rng: model.init(rng, *exp.trainable.init_inputs)["params"],
                         jax.random.key(0))
  params = jax.device_put(
      exp.trainable.trained_params(os.path.join(workdir, "checkpoints", str(step))),
      parallel.shardings_for(boxed, exp.mesh))
  evaluator = loop.Evaluator(exp, split=config.data.eval_split)
  results = evaluator.evaluate(params)
  writer = metrics_lib.MetricsWriter(workdir, num_steps=step, start_step=step,
                                     enabled=jax.process_index() == 0)
  try:
    writer.write(step, evaluator.split, results)
  finally:
    writer.close()
  return results


def define_flags():
  """The flags of `python -m train.evaluate`, defined when it runs (not on import)."""
  flags.DEFINE_string("workdir", None, "Workdir of a training run.")
  flags.DEFINE_string("split", None, "Split to evaluate on; default: the run's data.eval_split.")
  flags.DEFINE_integer("checkpoint_step", None, "Step of the checkpoint; default: the latest.")
  flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # orbax and grain are chatty at INFO
  compilation_cache.use()
  cli.guarded(evaluate)(FLAGS.workdir, FLAGS.split, FLAGS.checkpoint_step)


if __name__ == "__main__":
  define_flags()
  cli.run(main, cli.parse_flags)
