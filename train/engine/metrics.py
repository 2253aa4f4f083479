"""Where metrics go: WORKDIR/metrics.jsonl, TensorBoard events, and a progress bar on a TTY; and
`say`, the lines for the person running the experiment.

Also the arithmetic of throughput: a traced step's FLOPs and the peak FLOP/s of the device,
for MFU (model FLOPs utilisation).
"""

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
import numpy as np
import tqdm

from train.engine import records


def say(message: str):
  """Prints `message` on process 0 only, flushed at once."""
  if jax.process_index() == 0:
    print(message, flush=True)


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


def step_flops(traced, *, hardware: bool = False) -> float | None:
  """Model FLOPs of one call of a traced program (`jax.jit(f).trace(...)`), all devices
  together: 2 x the multiply-adds of its matrix products (dot_general), as MFU counts them.
  None if the program has no matrix product.

  Counted in the jaxpr, not by XLA: a GPU's compiled program calls libraries for its matrix
  products, which XLA's cost analysis does not count (an H200's GPT-2 step counted a ninth of
  its FLOPs), and there is no cost analysis of the lowered program on GPUs.

  Model FLOPs are the work the model needs, whatever runs it (PaLM, appendix B):
  - a rematerialised forward (jax.checkpoint, nn.remat) is not counted again in the backward
    pass; with hardware=True it is (hardware FLOPs, for utilisation of the device);
  - fused attention kernels (cuDNN's, jax's Pallas GPU flash and TPU splash attention) count
    from their operands' shapes what XLA's attention would: Q Kᵀ and P V over every (query,
    key) pair, 4·B·N·T·S·H forward, twice that backward. A causal mask halves no count: the
    PyTorch baseline's 6N + 12·L·d·T a token, and XLA's masked einsums, count full attention
    too, so MFUs compare. What a kernel recomputes (flash attention's Q Kᵀ in its backward) is
    not counted, hardware or not;
  - another Pallas kernel counts its body's products once per cell of its grid;
  - a scan counts its body `length` times, a cond its largest branch, a while loop's body once.
  """
  jaxpr = getattr(traced.jaxpr, "jaxpr", traced.jaxpr)
  return _jaxpr_flops(jaxpr, hardware) or None


# Names of jax.checkpoint's primitive (`remat2` in jax 0.10; `checkpoint` in other versions).
REMAT = ("remat2", "checkpoint", "remat")
# Fused attention kernels: the factor of a forward's FLOPs each performs, and its operands'
# layout. cuDNN's (jax._src.cudnn.fused_attention_stablehlo) by primitive, its layout a
# parameter; Pallas kernels by the start of their name: jax's GPU flash attention
# (pallas.ops.gpu.attention) and TPU splash attention (pallas.ops.tpu.splash_attention, [N, T,
# H] under a vmap over the batch; its backward is two kernels, dQ's and dK/dV's).
CUDNN_ATTENTION = {"dot_product_attention_fwd_wrapper": 1, "dot_product_attention_fwd": 1,
                   "dot_product_attention_bwd_wrapper": 2, "dot_product_attention_bwd": 2}
PALLAS_ATTENTION = {"mha_forward": (1, "BTNH"), "mha_backward": (2, "BTNH"),
                    "splash_mha_fwd": (1, "NTH"), "splash_mha_dkv": (1, "NTH"),
                    "splash_mha_dq": (1, "NTH")}


def attention_flops(query_shape, key_shape, layout: str = "BTNH") -> float:
  """Forward FLOPs of softmax(Q Kᵀ) V over every (query, key) pair: 2 products of
  2·B·N·T·S·H each, whatever is masked. Layouts: BTNH, BNTH, or NTH after any batch axes."""
  if layout == "BTNH":
    (batch, length, heads, head_dim), keys = query_shape, key_shape[1]
  elif layout == "BNTH":
    (batch, heads, length, head_dim), keys = query_shape, key_shape[2]
  else:
    batch, (heads, length, head_dim), keys = np.prod(query_shape[:-3]), query_shape[-3:], (
        key_shape[-2])
  return 4.0 * batch * heads * length * keys * head_dim


def _kernel_attention_flops(eqn) -> float | None:
  """An attention kernel's model FLOPs from its query's and key's shapes (its first two
  floating operands); None for another kernel."""
  name = eqn.primitive.name
  if name in CUDNN_ATTENTION:
    factor, layout = CUDNN_ATTENTION[name], (
        "BNTH" if eqn.params.get("layout") in (1, "BNTH") else "BTNH")
  elif name == "pallas_call":
    kernel = str(eqn.params.get("name", ""))
    factor, layout = next((found for start, found in PALLAS_ATTENTION.items()
                           if kernel.startswith(start)), (None, None))
    if factor is None:
      return None
  else:
    return None
  query, key = [v.aval.shape for v in eqn.invars
                if jnp.issubdtype(v.aval.dtype, jnp.floating)][:2]
  return factor * attention_flops(query, key, layout)


def _sub_jaxprs(eqn) -> list:
  return [getattr(sub, "jaxpr", sub) for value in eqn.params.values()
          for sub in (value if isinstance(value, (list, tuple)) else [value])
          if isinstance(sub, (jex_core.Jaxpr, jex_core.ClosedJaxpr))]


def _jaxpr_flops(jaxpr, hardware: bool) -> float:
  flops = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (contracting, _), _ = eqn.params["dimension_numbers"]
      lhs_shape = eqn.invars[0].aval.shape
      flops += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod(
          [lhs_shape[d] for d in contracting])
      continue
    kernel = _kernel_attention_flops(eqn)
    if kernel is not None:
      flops += kernel
      continue
    if name == "pallas_call":  # Its jaxpr is one cell of its grid.
      grid = getattr(eqn.params.get("grid_mapping"), "grid", ())
      flops += np.prod([g for g in grid if isinstance(g, int)]) * sum(
          _jaxpr_flops(sub, hardware) for sub in _sub_jaxprs(eqn))
      continue
    if name in REMAT and eqn.params.get("differentiated") and not hardware:
      flops += _jaxpr_flops(_backward_part(eqn.params["jaxpr"]), hardware)
      continue
    inner = [_jaxpr_flops(sub, hardware) for sub in _sub_jaxprs(eqn)]
    if name == "cond":  # One branch runs.
      flops += max(inner, default=0.0)
    elif name == "scan":
      flops += eqn.params["length"] * sum(inner)
    elif name == "shard_map":  # Its body is one shard's program.
      shape = eqn.params["mesh"].shape
      flops += np.prod([shape[a] for a in eqn.params["newly_manual_axes"]]) * sum(inner)
    else:
      flops += sum(inner)
  return float(flops)


def _backward_part(jaxpr):
  """The backward pass of a differentiated checkpoint's body, without the forward it
  recomputes. jax's transpose of a checkpoint takes the residuals, then the cotangents (the
  last operand is one), and first evaluates every equation that needs no cotangent (the
  forward recomputation), then the transposed ones: the backward starts at the first equation
  that reads a cotangent."""
  cotangent = jaxpr.invars[-1]
  for start, eqn in enumerate(jaxpr.eqns):
    if cotangent in eqn.invars:
      break
  else:
    start = len(jaxpr.eqns)
  return jaxpr.replace(eqns=jaxpr.eqns[start:])


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
