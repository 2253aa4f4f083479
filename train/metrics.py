"""Where metrics go: WORKDIR/metrics.jsonl, TensorBoard events, and a progress bar on a TTY.

Also the arithmetic of throughput: a traced step's FLOPs and the peak FLOP/s of the device,
for MFU (model FLOPs utilisation).
"""

import json
import os
import sys
import time

import jax
from jax.extend import core as jex_core
import numpy as np
import tqdm

from train import records

# Dense bf16 peak FLOP/s per chip, by the start of jax's `device_kind`.
PEAK_FLOPS = {
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA GH200": 989e12,
    "NVIDIA B200": 2250e12, "NVIDIA A100": 312e12, "NVIDIA L4": 121e12,
    "NVIDIA A10G": 70e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def peak_flops_per_device(override: float = 0.0) -> float | None:
  """The config's value if set, else the table's for this device kind, else None (CPU)."""
  if override:
    return override
  kind = jax.devices()[0].device_kind
  for prefix, flops in PEAK_FLOPS.items():
    if kind.startswith(prefix):
      return flops
  return None


def step_flops(traced) -> float | None:
  """FLOPs of one call of a traced program (`jax.jit(f).trace(...)`), all devices together:
  2 x the multiply-adds of its matrix products (dot_general), as MFU counts them.

  Counted in the jaxpr, not by XLA: a GPU's compiled program calls libraries for its matrix
  products, which XLA's cost analysis does not count (an H200's GPT-2 step counted a ninth of
  its FLOPs), and there is no cost analysis of the lowered program on GPUs. Custom kernels
  (cuDNN fused attention, Pallas) count nothing; a while loop's body counts once. None if the
  program has no matrix product.
  """
  return _jaxpr_flops(getattr(traced.jaxpr, "jaxpr", traced.jaxpr)) or None


def _jaxpr_flops(jaxpr) -> float:
  flops = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contracting, _), _ = eqn.params["dimension_numbers"]
      lhs_shape = eqn.invars[0].aval.shape
      flops += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod(
          [lhs_shape[d] for d in contracting])
      continue
    inner = [_jaxpr_flops(getattr(sub, "jaxpr", sub)) for value in eqn.params.values()
             for sub in (value if isinstance(value, (list, tuple)) else [value])
             if isinstance(sub, (jex_core.Jaxpr, jex_core.ClosedJaxpr))]
    if eqn.primitive.name == "cond":  # One branch runs.
      flops += max(inner, default=0.0)
    elif eqn.primitive.name == "scan":
      flops += eqn.params["length"] * sum(inner)
    elif eqn.primitive.name == "shard_map":  # Its body is one shard's program.
      shape = eqn.params["mesh"].shape
      flops += np.prod([shape[a] for a in eqn.params["newly_manual_axes"]]) * sum(inner)
    else:
      flops += sum(inner)
  return float(flops)


def tensorboard_writer(logdir: str):
  """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch, where it
  is installed, only to accept torch tensors, which we never pass; that import took 1.6 s of
  every run's start-up."""
  hidden = "torch" not in sys.modules
  if hidden:
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX catches
  try:
    import tensorboardX
  finally:
    if hidden:
      del sys.modules["torch"]
  return tensorboardX.SummaryWriter(logdir)


class MetricsWriter:
  """Appends one JSON object a line (step, split, values) and mirrors it to TensorBoard."""

  def __init__(self, workdir: str, *, num_steps: int, start_step: int, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.jsonl = records.open_for_append(workdir)
    self.tensorboard_dir = os.path.join(workdir, "tensorboard")
    self.tensorboard = tensorboard_writer(self.tensorboard_dir)
    self.bar = tqdm.tqdm(total=num_steps, initial=start_step, dynamic_ncols=True,
                         disable=not sys.stderr.isatty(), unit="step")

  def write(self, step: int, split: str, values: dict):
    if not self.enabled:
      return
    values = {k: float(v) for k, v in values.items()}
    self.jsonl.write(json.dumps({"step": step, "split": split, **values}) + "\n")
    self.jsonl.flush()
    for name, value in values.items():
      self.tensorboard.add_scalar(f"{split}/{name}", value, step)
    self.tensorboard.flush()
    if split == "train":
      self.bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}", refresh=False)
    else:
      self.bar.write(f"step {step} {split}: " + ", ".join(
          f"{k}={v:.4g}" for k, v in values.items()))

  def advance(self, steps: int = 1):
    if self.enabled:
      self.bar.update(steps)

  def close(self):
    if self.enabled:
      self.bar.close()
      self.tensorboard.close()
      self.jsonl.close()


class Stopwatch:
  """Seconds since the last `lap`, for tokens/s."""

  def __init__(self):
    self.start = time.perf_counter()

  def lap(self) -> float:
    now = time.perf_counter()
    elapsed, self.start = now - self.start, now
    return elapsed
