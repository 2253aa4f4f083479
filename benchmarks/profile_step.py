"""Where the train step's device time goes: a jax.profiler trace of the loop's own step, summed
by kernel.

  python -m benchmarks.profile_step [--model=gpt2|seq2seq] [--batch=16] [--implementation=NAME]
  python -m benchmarks.profile_step --tiny     # tiny shapes, on CPU, in seconds

The step is benchmarks/accelerator.py's (the loop's jitted train step on synthetic batches of
GPT-2 small, four examples a row, or of transformer_base); that benchmark also profiles its
best row's program through `trace_program`. After --warmup steps it traces
--steps more, then prints the step's seconds and FLOPs, the kernels' summed time a step,
largest first, with their share and what XLA op each runs, and where the trace lies (for
TensorBoard's profile plugin or ui.perfetto.dev). On an accelerator the kernels are those of
its device rows; on a CPU, the XLA ops run on the host's threads.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile
import time
import types

import jax

from benchmarks import accelerator_rows
from models.attention_choice import IMPLEMENTATIONS
from train.engine import metrics, parallel
from train.run import inputs


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=("gpt2", "seq2seq"), default="gpt2")
  parser.add_argument("--batch", type=int, default=0, help="rows (default 16; seq2seq 96)")
  parser.add_argument("--implementation", default=None, choices=IMPLEMENTATIONS,
                      help="attention implementation (default: the automatic choice)")
  parser.add_argument("--steps", type=int, default=5, help="traced steps")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps, the first compiles")
  parser.add_argument("--top", type=int, default=30, help="kernels printed")
  parser.add_argument("--trace_dir", default="", help="default: a new temporary folder")
  parser.add_argument("--tiny", action="store_true", help="tiny shapes, on CPU, in seconds")
  args = parser.parse_args(argv)
  if args.steps < 1 or args.warmup < 1:
    parser.error("--steps and --warmup must be at least 1.")
  args.batch = args.batch or (8 if args.tiny else 96 if args.model == "seq2seq" else 16)
  return args


def experiment_and_batch(args):
  """The experiment to build and one synthetic batch of its shapes."""
  if args.model == "gpt2":
    config = accelerator_rows.gpt2_config(args.tiny, args.implementation)
    length = accelerator_rows.TINY_LENGTH if args.tiny else accelerator_rows.LENGTH
    vocab = 256 if args.tiny else accelerator_rows.GPT2_VOCAB
    return config, accelerator_rows.lm_batch(args.batch, length, vocab, 4)
  config = accelerator_rows.experiment_config(
      "transformer_base", args.tiny, "experiments/data/en_de_tiny.tsv",
      vocab_size=0 if args.tiny else 32_000, attention_implementation=args.implementation)
  d = config.data
  return config, accelerator_rows.seq2seq_batch(args.batch, d.inputs_len, d.targets_len,
                                                256 if args.tiny else 32_000)


def trace_steps(args) -> dict:
  """Runs warm-up steps, then traces `args.steps` steps into args.trace_dir (default: a new
  temporary folder); their seconds a step, FLOPs and trace folder."""
  with tempfile.TemporaryDirectory() as workdir:  # The local dataset that building prepares.
    config, batch = experiment_and_batch(args)
    holder = types.SimpleNamespace()
    holder.exp, holder.state, steps, _ = accelerator_rows.train_step(config, workdir)
    capacity, batch = inputs.BatchLayout(config.task, config.data)(batch)
    step, batch = steps(capacity), parallel.host_to_global(batch, holder.exp.mesh)
    flops = metrics.step_flops(step.trace(holder.state, batch))
    measured = trace_program(step, holder, batch, args.warmup, args.steps,
                             args.trace_dir or tempfile.mkdtemp(prefix="profile_step_"))
    return {**measured, "step_flops": flops}


def trace_program(step, holder, batch, warmup: int, steps: int, trace_dir: str) -> dict:
  """`warmup` steps of `step` (jitted or compiled) on `holder.state` (which each replaces),
  then `steps` more traced into `trace_dir`: their seconds a step, and the folder."""
  for _ in range(warmup):
    sums = accelerator_rows.step_once(step, holder, batch)
  jax.block_until_ready(sums)
  with jax.profiler.trace(trace_dir):
    start = time.perf_counter()
    for _ in range(steps):
      sums = accelerator_rows.step_once(step, holder, batch)
    jax.block_until_ready(sums)
    seconds = (time.perf_counter() - start) / steps
  return {"step_seconds": seconds, "trace_dir": trace_dir}


def kernel_times(trace_dir: str) -> tuple[dict, dict]:
  """({kernel name: summed microseconds}, {kernel name: its XLA op}) from the newest trace:
  the device rows' events where there are any (their "Stream" rows' alone where there are
  such, as other rows repeat the kernels by XLA op or module), else the XLA ops on the host's
  threads."""
  path = max(glob.glob(os.path.join(trace_dir, "plugins/profile/*/*.trace.json.gz")),
             key=os.path.getmtime)
  with gzip.open(path) as f:
    events = json.load(f)["traceEvents"]
  processes = {e["pid"]: e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
  devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  streams = {key for key, name in threads.items() if key[0] in devices
             and name.startswith("Stream")}
  times, ops = collections.Counter(), {}
  for e in events:
    if e.get("ph") != "X":
      continue
    on_device = (e["pid"], e.get("tid")) in streams if streams else e["pid"] in devices
    host_op = (threads.get((e["pid"], e.get("tid")), "").startswith("tf_XLA")
               and "::" not in e["name"])  # Not the runtime's own frames (ThunkExecutor::...).
    if on_device or (not devices and host_op):
      times[e["name"]] += e.get("dur", 0)
      ops.setdefault(e["name"], (e.get("args") or {}).get("hlo_op", ""))
  return times, ops


def report(args, measured: dict, times: dict, ops: dict) -> list[str]:
  device = jax.devices()[0]
  flops = measured["step_flops"]
  busy_us = sum(times.values())
  lines = [f"{args.model} B{args.batch} on {device.device_kind} ({device.platform}), "
           f"attention {args.implementation or 'automatic'}: "
           f"{measured['step_seconds'] * 1e3:.2f} ms a step"
           + (f", {flops / measured['step_seconds'] / 1e12:.3g} TFLOP/s of matrix products"
              if flops else "")
           + f"; kernels {busy_us / args.steps / 1e3:.2f} ms a step"]
  lines.append(f"{'ms/step':>9} {'share':>6}  kernel (XLA op)")
  for name, us in times.most_common(args.top):
    op = f" ({ops[name]})" if ops.get(name) and ops[name] != name else ""
    lines.append(f"{us / args.steps / 1e3:9.3f} {100 * us / busy_us:5.1f}%  {name[:100]}{op}")
  lines.append(f"trace: {measured['trace_dir']}")
  return lines


def main(argv=None):
  args = parse_args(argv)
  try:
    measured = trace_steps(args)
  except ValueError as e:  # An attention implementation this device cannot run, say.
    sys.exit(f"error: {e}")
  times, ops = kernel_times(measured["trace_dir"])
  print("\n".join(report(args, measured, times, ops)))


if __name__ == "__main__":
  main()
