"""Where metrics go: WORKDIR/metrics.jsonl, TensorBoard events, and a progress bar on a TTY.

Also the arithmetic of throughput: a compiled step's FLOPs and the peak FLOP/s of the device,
for MFU (model FLOPs utilisation).
"""

import json
import os
import sys
import time

import jax
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


def step_flops(lowered) -> float | None:
  """FLOPs of one call of a lowered program (`jax.jit(f).lower(...)`), all devices together.

  XLA's cost analysis of the program before its optimizations: after them, a GPU's matrix
  products are library calls it does not count (an H200's compiled GPT-2 step counted a ninth
  of the lowered one's FLOPs). Kernels called as custom calls (cuDNN fused attention, Pallas)
  count nothing. None where the backend gives no count.
  """
  analysis = lowered.cost_analysis()
  if isinstance(analysis, dict):
    analysis = [analysis]
  flops = sum(float(part.get("flops", 0.0)) for part in analysis or [])
  return flops if flops > 0 else None


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
