"""GPT-2 124M training and decoding, and a seq2seq step, measured on this machine's accelerator
in one process, against the PyTorch baseline and issue 21's goals.

  python -m benchmarks.accelerator [--torch_baseline=PATH/torch_gpt2_baseline.py]
  python -m benchmarks.accelerator --tiny --peak_flops=1e12   # tiny shapes on CPU, seconds

benchmarks/accelerator.sh runs it on a GPU host. It prints one table, the goals met or short,
the best train row's top kernels (benchmarks/profile_step.py), then one JSON line. The rows:

  torch    the PyTorch baseline (torch.compile; --torch_baseline) at batch 16 and 32, and its
           compiled greedy decoding (--decode-compile, CUDA graphs) at batch 1 and 16 (--tiny:
           eager, on CPU).
  train    experiments/gpt2_small.py's model (GPT-2's 50,257-token vocabulary) through the
           loop's own jitted train step on synthetic rows of 1,024 tokens, for each attention
           implementation (those that refuse the case say why): batch 16 and 32 unpacked
           (laid out as the loop lays out its batches: rows of one example lose their segment
           ids), batch 16 packed with 4 and 30 examples a row; the A/B rows: the best batch-16 row's program compiled with each of
           accelerator_rows.COMPILER_OPTIONS, in this process.
  compile  the first train row's cold compile, and its compile again in a fresh jit from the
           persistent cache.
  decode   greedy decoding with models.decoding, 128 new tokens after a 64-token prompt, batch
           1 and 16, random weights in bf16, the prefill included (the baseline's is not).
  attention  causal self-attention alone, forward and backward, at GPT-2's batch-16 shape:
           unpacked and with 4, 16 and 64 segments a row, per fused kernel and XLA.
  seq2seq  one train step of experiments/transformer_base.py (96 rows x 256 + 256 tokens).

They run in the order of the goals, and those not started within --budget_seconds are
skipped: the torch rows (before JAX holds the device's memory), batch 16 unpacked for each
implementation, decoding, the fastest implementation's packed and batch-32 rows, the A/B rows,
the attention table, the profile, the other implementations' packed and batch-32 rows, seq2seq.

A step's time is --steps steps dispatched back to back after --warmup, waited for once. MFU is
model FLOPs (metrics.step_flops: rematerialised work not counted, fused attention counted as
full attention, as the baseline's 6N + 12·L·d·T) / seconds / the devices' peak. Memory is the
compiled program's (arguments, outputs, temporaries); torch's is its peak allocated. Compile
seconds: trace, lower and compile, with JAX's persistent cache in a new empty folder.
"""

import argparse
import json
import os
import tempfile
import time

import jax

from benchmarks import accelerator_rows as rows_lib
from benchmarks import profile_step
from models.attention_choice import IMPLEMENTATIONS
from train.engine import metrics
from train.run import compilation_cache

FUSED_FIRST = ("cudnn", "pallas", "splash", "xla")  # The implementations, in the rows' order.


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="tiny shapes, on CPU, in seconds")
  parser.add_argument("--torch_baseline", default="", help="path of torch_gpt2_baseline.py")
  parser.add_argument("--implementations", default=",".join(FUSED_FIRST),
                      help="attention implementations of the train rows, comma-separated")
  parser.add_argument("--options", default="",
                      help="A/B rows: names in accelerator_rows.COMPILER_OPTIONS, "
                           "comma-separated (default all; --tiny: the first two)")
  parser.add_argument("--steps", type=int, default=0, help="timed steps (default 20; tiny 3)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  parser.add_argument("--peak_flops", type=float, default=0.0,
                      help="per device, for MFU; 0 = from train.engine.metrics' table")
  parser.add_argument("--budget_seconds", type=float, default=420.0,
                      help="rows not started by then are skipped (an 8-minute device call "
                           "leaves time to install wheels and start)")
  parser.add_argument("--top", type=int, default=15, help="kernels of the profile printed")
  args = parser.parse_args(argv)
  args.steps = args.steps or (3 if args.tiny else 20)
  if args.steps < 1 or args.warmup < 1:
    parser.error("--steps and --warmup must be at least 1.")
  names = list(rows_lib.COMPILER_OPTIONS)
  args.options = args.options.split(",") if args.options else names[:2] if args.tiny else names
  unknown = [n for n in args.options if n not in rows_lib.COMPILER_OPTIONS]
  if unknown:
    parser.error(f"--options: unknown {unknown}; known: {names}.")
  args.implementations = args.implementations.split(",")
  unknown = [n for n in args.implementations if n not in IMPLEMENTATIONS]
  if unknown:
    parser.error(f"--implementations: unknown {unknown}; known: {list(IMPLEMENTATIONS)}.")
  return args


class Budget:
  """Seconds left of --budget_seconds; `open()` says whether a row may still start."""

  def __init__(self, seconds: float, tiny: bool):
    self.start, self.seconds, self.margin = time.perf_counter(), seconds, 0 if tiny else 15

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def left(self) -> float:
    return self.seconds - self.elapsed()

  def open(self) -> bool:
    return self.left() > self.margin


SKIPPED = {"skipped": "time budget spent"}


def attempt(measure, *args):
  """measure(*args), or the row's refusal (ValueError: a case the code turns down) or failure
  (anything else: an out-of-memory, a kernel that does not build): one row lost, not the run.
  """
  try:
    return measure(*args)
  except ValueError as e:
    return rows_lib.refused(e)
  except Exception as e:  # Whatever else goes wrong on a device, it is this row's.
    return rows_lib.failed(e)


class Experiment:
  """An experiment's step and state, shared by its rows (the state is donated at each step)."""

  def __init__(self, config, workdir: str):
    self.exp, self.state, self.step, self.shardings = rows_lib.train_step(config, workdir)


class Run:
  """The rows measured so far, and what later rows reuse."""

  def __init__(self, args, workdir: str):
    self.args, self.workdir = args, workdir
    self.budget = Budget(args.budget_seconds, args.tiny)
    self.rows, self.experiments, self.unpacked = [], {}, {}
    self.best = None  # (tokens/s, row, compiled program) of the fastest train row
    self.extra = {}   # compile seconds cold and warm, the profile's lines
    self.last = 0.0   # budget seconds at the last row's end

  def add(self, row: dict, result: dict):
    """Records a row's result, with the seconds since the previous row's (its cost here)."""
    now = self.budget.elapsed()
    self.rows.append({**row, "result": result, "wall_seconds": round(now - self.last, 2)})
    self.last = now

  def experiment(self, implementation):
    if implementation not in self.experiments:
      self.experiments[implementation] = Experiment(
          rows_lib.gpt2_config(self.args.tiny, implementation), self.workdir)
    return self.experiments[implementation]

  def train(self, implementation, batch: int, examples, options: str = "default"):
    """A GPT-2 train row: `examples` a row (None: unpacked)."""
    row = {"kind": "train", "implementation": implementation, "batch": batch,
           "layout": "unpacked" if examples is None else f"packed {examples}", "options": options}
    if not self.budget.open():
      return self.add(row, SKIPPED)
    length = rows_lib.TINY_LENGTH if self.args.tiny else rows_lib.LENGTH
    vocab = 256 if self.args.tiny else rows_lib.GPT2_VOCAB

    def measure():
      train_row = rows_lib.TrainRow(self.experiment(implementation),
                                    rows_lib.lm_batch(batch, length, vocab, examples))
      return (train_row, *train_row.measure(self.args, rows_lib.COMPILER_OPTIONS[options]))
    measured = attempt(measure)
    if isinstance(measured, dict):
      return self.add(row, measured)
    train_row, result, compiled = measured
    self.add(row, result)
    if compiled is None:
      return
    if examples is None and options == "default":
      self.unpacked.setdefault(batch, {})[implementation] = train_row
      if "cold" not in self.extra:
        self.extra["cold"] = result["compile_seconds"]
        self.extra["warm"] = rows_lib.warm_compile_seconds(train_row)
    if self.best is None or result["tokens_per_second"] > self.best[0]:
      self.best = (result["tokens_per_second"], {**row, "train_row": train_row}, compiled)

  def ab_rows(self, batch: int):
    """The best unpacked row at `batch`, its program compiled with each other option set."""
    measured = [r for r in self.rows if r["kind"] == "train" and r["batch"] == batch
                and r["layout"] == "unpacked" and "tokens_per_second" in r["result"]]
    if not measured:
      return
    best = max(measured, key=lambda r: r["result"]["tokens_per_second"])
    train_row = self.unpacked[batch][best["implementation"]]
    for name in (n for n in self.args.options if n != "default"):
      row = {**{k: v for k, v in best.items() if k != "result"}, "options": name}
      if not self.budget.open():
        self.add(row, SKIPPED)
        continue
      measured = attempt(train_row.measure, self.args, rows_lib.COMPILER_OPTIONS[name])
      result, compiled = (measured, None) if isinstance(measured, dict) else measured
      self.add(row, result)
      if compiled is not None and result["tokens_per_second"] > self.best[0]:
        self.best = (result["tokens_per_second"], {**row, "train_row": train_row}, compiled)


def measure_all(args, workdir: str) -> Run:
  """Every row, most important first (the torch ones before JAX touches the device)."""
  run = Run(args, workdir)
  small, large = (8, None) if args.tiny else (16, 32)
  if args.torch_baseline:
    for batch, decode in ((small, True), (large, False))[:1 if args.tiny else 2]:
      result = (rows_lib.run_torch(args, batch, decode, run.budget.left())
                if run.budget.open() else SKIPPED)
      run.add({"kind": "torch", "batch": batch}, result)
  # An empty persistent cache: cold compiles, then the warm one from it.
  jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
  jax.config.update("jax_enable_compilation_cache", True)
  compilation_cache.use()

  for name in args.implementations:
    run.train(name, small, None)
  results = attempt(rows_lib.measure_decode, [1, 16], args, workdir) if run.budget.open() else (
      SKIPPED)
  for i, batch in enumerate((1, 16)):
    run.add({"kind": "decode", "batch": batch}, results if isinstance(results, dict)
            else results[i])
  # The goals' rows on the fastest implementation first; the others' after the A/B rows, the
  # attention table and the profile.
  rate = {r["implementation"]: r["result"]["tokens_per_second"] for r in run.rows
          if r["kind"] == "train" and "tokens_per_second" in r["result"]}
  ran = sorted(run.unpacked.get(small, {}), key=lambda name: -rate[name])
  for name in ran[:1]:
    for examples in (4, 30):
      run.train(name, small, examples)
    if large:
      run.train(name, large, None)
  run.ab_rows(small)
  for name in ("cudnn", "pallas", "xla"):
    for segments in (None, 4, 16, 64):
      run.add({"kind": "attention", "implementation": name, "segments": segments},
              attempt(rows_lib.measure_attention, name, segments, args)
              if run.budget.open() else SKIPPED)
  if run.best is not None and run.budget.open():
    run.extra["profile"] = profile(args, run.best)
  for name in ran[1:]:
    for examples in (4, 30):
      run.train(name, small, examples)
    if large:
      run.train(name, large, None)
  rows = 8 if args.tiny else 96

  def seq2seq():
    holder = Experiment(rows_lib.seq2seq_config(args.tiny), workdir)
    d, vocab = holder.exp.config.data, 256 if args.tiny else 32_000
    batch = rows_lib.seq2seq_batch(rows, d.inputs_len, d.targets_len, vocab)
    return rows_lib.TrainRow(holder, batch).measure(args)[0]
  run.add({"kind": "seq2seq", "batch": rows}, attempt(seq2seq) if run.budget.open() else SKIPPED)
  return run


def profile(args, best) -> list[str]:
  """benchmarks/profile_step.py's report of the best train row's program."""
  _, row, compiled = best
  train_row = row["train_row"]
  pargs = profile_step.parse_args(
      [f"--batch={row['batch']}", f"--steps={min(args.steps, 5)}", "--warmup=1",
       f"--top={args.top}"] + (["--tiny"] if args.tiny else [])
      + ([f"--implementation={row['implementation']}"] if row["implementation"] else []))
  try:
    measured = profile_step.trace_program(
        compiled, train_row.holder, train_row.batch, pargs.warmup, pargs.steps,
        tempfile.mkdtemp(prefix="profile_step_"))
    times, ops = profile_step.kernel_times(measured["trace_dir"])
  except Exception as e:  # A trace the profiler could not write or read: the table stands.
    return [f"profile failed: {rows_lib.failed(e)['failed']}"]
  measured["step_flops"] = train_row.flops
  label = f"{row['layout']}, options {row['options']}"
  return [f"Top kernels of the best train row ({label}):"] + profile_step.report(
      pargs, measured, times, ops)


# ---------------------------------------------------------------- the table and the goals

def add_ratios(run: Run, peak_total):
  """MFU of train rows; tapete / torch tokens/s at the same batch."""
  torch_train = {r["batch"]: torch_rate(r["result"]) for r in run.rows if r["kind"] == "torch"}
  torch_decode = torch_decode_rates(run)
  for row in run.rows:
    result = row["result"]
    if peak_total and result.get("step_flops") and "step_seconds" in result:
      result["mfu"] = result["step_flops"] / result["step_seconds"] / peak_total
    reference = (torch_train if row["kind"] == "train" else
                 torch_decode if row["kind"] == "decode" else {}).get(row.get("batch"))
    if reference and result.get("tokens_per_second"):
      result["torch_ratio"] = result["tokens_per_second"] / reference


def torch_rate(result: dict) -> float | None:
  """The baseline's tokens/s measured as ours: its timed steps back to back, one wait at the
  end (tokens_per_s_wall; its tokens_per_s is from the median step's CUDA events)."""
  return result.get("tokens_per_s_wall") or result.get("tokens_per_s")


def torch_decode_rates(run: Run) -> dict:
  return {d["batch"]: d["tokens_per_s"] for r in run.rows if r["kind"] == "torch"
          for d in r["result"].get("decode", {}).get("results", [])}


def label(row: dict) -> str:
  if row["kind"] == "train":
    options = "" if row["options"] == "default" else f" [{row['options']}]"
    return f"train {row['implementation']} B{row['batch']} {row['layout']}{options}"
  if row["kind"] == "torch":
    return f"torch B{row['batch']} train"
  return f"{row['kind']} B{row['batch']}"


def format_row(row: dict) -> list[str]:
  result = row["result"]
  for reason in ("refused", "skipped", "failed", "error"):
    if reason in result:
      return [f"{label(row):<44} {reason}: {result[reason]}"]
  if row["kind"] == "torch":
    name = "torch.compile" if result.get("compile") is True else "torch eager"
    rate = torch_rate(result)
    lines = [f"{name + ' B' + str(row['batch']) + ' train':<44} "
             + cells(rate, rate and result.get("batch", 0) * result.get("seq", 0) / rate,
                     result.get("mfu_wall") or result.get("mfu"),
                     (result.get("peak_mem_gib") or 0) * 2**30, result.get("first_step_s"),
                     None)]
    decode = result.get("decode", {})
    kind = "compiled" if decode.get("compiled") else "eager"
    for d in decode.get("results", []):
      lines.append(f"{'torch decode B' + str(d['batch']) + ' (' + kind + ')':<44} "
                   + cells(d["tokens_per_s"], d["ms_per_step"] / 1e3, None, None, None, None))
    return lines
  return [f"{label(row):<44} " + cells(
      result.get("tokens_per_second"), result.get("step_seconds"), result.get("mfu"),
      result.get("memory_bytes"), result.get("compile_seconds"), result.get("torch_ratio"))
      + (f"  ({result['note']})" if result.get("note") else "")]


def cells(tokens, seconds, mfu, memory, compile_s, ratio) -> str:
  dash = lambda width: f"{'-':>{width}}"
  return " ".join([
      f"{tokens:>12,.0f}" if tokens else dash(12),
      f"{seconds * 1e3:>9.2f}" if seconds else dash(9),
      f"{100 * mfu:>6.1f}%" if mfu else dash(7),
      f"{memory / 2**30:>8.2f}" if memory else dash(8),
      f"{compile_s:>9.1f}" if compile_s is not None else dash(9),
      f"{ratio:>7.2f}" if ratio else dash(7)])


HEADER = (f"{'':<44} {'tokens/s':>12} {'ms':>9} {'MFU':>7} {'GiB':>8} {'compile s':>9} "
          f"{'x torch':>7}")


def attention_table(run: Run, tiny: bool) -> list[str]:
  rows = [r for r in run.rows if r["kind"] == "attention"]
  B, T, N, H = rows_lib.attention_shape(tiny)
  lines = [f"Causal attention alone, forward + backward, B{B} T{T} N{N} H{H} bf16: ms "
           "(TFLOP/s of full attention)",
           f"{'':<10}" + "".join(f"{c:>22}" for c in ("unpacked", "4 segments", "16 segments",
                                                       "64 segments"))]
  for name in dict.fromkeys(r["implementation"] for r in rows):
    out = []
    for r in (r for r in rows if r["implementation"] == name):
      result = r["result"]
      out.append(f"{result['step_seconds'] * 1e3:>11.3f} ({result['tflops']:>6.1f})"
                 if "step_seconds" in result else f"{next(iter(result)):>22}")
    lines.append(f"{name:<10}" + "".join(f"{c:>22}" for c in out))
  return lines


def goals(run: Run) -> list[dict]:
  """Issue 21's goals against what was measured."""
  def train(batch, layout="unpacked", implementation=None):
    found = [r for r in run.rows if r["kind"] == "train" and r["batch"] == batch
             and r["layout"] == layout and r["options"] == "default"
             and "tokens_per_second" in r["result"]
             and implementation in (None, r["implementation"])]
    return max(found, key=lambda r: r["result"]["tokens_per_second"], default=None)
  torch = {r["batch"]: r["result"] for r in run.rows if r["kind"] == "torch"}
  decode = {r["batch"]: r["result"].get("tokens_per_second") for r in run.rows
            if r["kind"] == "decode"}
  torch_decode = torch_decode_rates(run)
  out = []

  def goal(name, value, target, met, shown=None):
    out.append({"goal": name, "value": value, "target": target,
                "status": "n/a" if value is None else "met" if met(value) else "short",
                "shown": shown})
  for batch in sorted({r["batch"] for r in run.rows if r["kind"] == "train"}):
    best = train(batch)
    ratio = best and best["result"].get("torch_ratio")
    goal(f"train B{batch} x torch.compile" + (f" (best: {best['implementation']})"
                                              if best else ""),
         ratio, ">= 1.0 (1.2 wanted)", lambda v: v >= 1.0, ratio and f"{ratio:.2f}x")
    mine, theirs = best and best["result"].get("memory_bytes"), torch.get(batch, {}).get(
        "peak_mem_gib")
    goal(f"memory B{batch}, GiB, <= torch", mine and theirs and mine / 2**30 / theirs,
         "<= 1.0", lambda v: v <= 1.0,
         mine and theirs and f"{mine / 2**30:.2f} vs {theirs:.2f}")
    if best:
      for examples in (4, 30):
        packed = train(batch, f"packed {examples}", best["implementation"])
        value = packed and packed["result"]["tokens_per_second"] / best["result"][
            "tokens_per_second"]
        goal(f"packed {examples} / unpacked, B{batch} {best['implementation']}", value,
             ">= 0.95", lambda v: v >= 0.95, value and f"{value:.2f}")
  goal("decode B1 tokens/s", decode.get(1), ">= 3,000 (6,000 moonshot)",
       lambda v: v >= 3000, decode.get(1) and f"{decode[1]:,.0f}")
  ratio = decode.get(1) and torch_decode.get(1) and decode[1] / torch_decode[1]
  goal("decode B1 x torch compiled decode", ratio, ">= 1.0", lambda v: v >= 1.0,
       ratio and f"{ratio:.2f}x")
  goal("decode B16 tokens/s", decode.get(16), ">= 40,000", lambda v: v >= 40_000,
       decode.get(16) and f"{decode[16]:,.0f}")
  cold, warm = run.extra.get("cold"), run.extra.get("warm")
  goal("first-step compile, cold, s", cold, "<= 15", lambda v: v <= 15, cold and f"{cold:.1f}")
  goal("first-step compile from the persistent cache, s", warm, "<= 3", lambda v: v <= 3,
       warm and f"{warm:.1f}")
  return out


def device_info(args) -> dict:
  """This process's devices, and the peak FLOP/s of one for MFU (None where unknown)."""
  device = jax.devices()[0]
  return {"device": f"{jax.device_count()} x {device.device_kind} ({device.platform})",
          "peak_flops": metrics.peak_flops_per_device(args.peak_flops)}


def main(argv=None):
  args = parse_args(argv)
  # The local datasets that building prepares, and the persistent compilation cache.
  with tempfile.TemporaryDirectory() as workdir:
    run = measure_all(args, workdir)
  info = device_info(args)
  peak = info["peak_flops"]
  add_ratios(run, peak and peak * jax.device_count())
  print(f"{info['device']}, jax {jax.__version__}, "
        + (f"peak {peak / 1e12:.0f} TFLOP/s a device" if peak else "no peak FLOP/s known")
        + f"; {run.budget.elapsed():.0f} s")
  print(HEADER)
  order = {"torch": 0, "train": 0, "decode": 1, "seq2seq": 2}
  table = sorted((r for r in run.rows if r["kind"] in order),
                 key=lambda r: (order[r["kind"]], r["batch"], r["kind"] != "torch"))
  for row in table:
    print("\n".join(format_row(row)))
  print(f"compile of the first train row: {run.extra.get('cold', float('nan')):.1f} s cold, "
        f"{run.extra.get('warm', float('nan')):.1f} s from the persistent cache (a fresh jit)")
  print("\n".join(attention_table(run, args.tiny)))
  met = goals(run)
  print(f"{'Goals (issue 21)':<52} {'measured':>16} {'goal':>26}  status")
  for g in met:
    print(f"{g['goal']:<52} {g['shown'] or '-':>16} {g['target']:>26}  {g['status']}")
  print("\n".join(run.extra.get("profile", [])))
  print(json.dumps({"device": info["device"], "jax": jax.__version__, "peak_flops": peak,
                    "compile_seconds": {k: run.extra.get(k) for k in ("cold", "warm")},
                    "goals": met, "rows": run.rows}))


if __name__ == "__main__":
  main()
