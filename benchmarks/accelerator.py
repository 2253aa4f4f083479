"""GPT-2 124M training and decoding, and a seq2seq step, measured on this machine's accelerator.

  python -m benchmarks.accelerator [--torch_baseline=benchmarks/torch_gpt2_baseline.py]
  python -m benchmarks.accelerator --tiny --peak_flops=1e12   # tiny shapes on CPU, seconds

benchmarks/accelerator.sh runs it on a GPU host. It prints one table, then one JSON line:

  train    experiments/gpt2_small.py's model (GPT-2's 50,257-token vocabulary) through the
           loop's own jitted train step (loop.build, init_state, jit_train_step: what
           `python -m train` runs) on synthetic rows of 1,024 tokens, one example a row
           ("unpacked") or four ("packed"), both with segment ids as the loop's batches carry
           them, for each attention implementation
           (those that raise ValueError for the case are skipped), at batch 16 and 32
           (--tiny: batch 8 only).
  torch    the PyTorch baseline (torch.compile, --torch_baseline) at the same batches and for
           decoding, and the ratio tapete / torch of tokens/s (--tiny: eager, on CPU).
  decode   greedy decoding with models.decoding, 128 new tokens after a 64-token prompt, batch
           1 and 16, random weights in the compute dtype (bf16): B x 128 / seconds, the
           prompt's prefill included (the baseline leaves its prefill out, so the ratio is, if
           anything, unfair to tapete).
  seq2seq  one train step of experiments/transformer_base.py (96 rows x 256 + 256 tokens).

Everything is measured: a step's time is the median of --steps steps, each waited for
(block_until_ready), after --warmup steps; compile is the seconds to lower and compile the
first step, cold; peak memory is the device's `peak_bytes_in_use`. So each job runs in its
own process (--tiny: all in this one; CPUs report no memory): an implementation at a batch
size, whose unpacked and packed rows have the same shapes and so share one compiled program;
decoding, batch 1 then 16 (one model, so batch 16's peak memory is its own); the seq2seq
step. MFU is FLOPs / step seconds / peak: the FLOPs of the step's matrix products
(metrics.step_flops), the largest count among the implementations of the same shape, as the
count sees nothing inside cuDNN or Pallas kernels. Jobs run most important first; those not
started within --budget_seconds are skipped (the default leaves an 8-minute device call time
to install wheels and start).
"""

import argparse
import contextlib
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from models import decoding
from models.attention import IMPLEMENTATIONS
from train import loop, metrics, parallel
from train.config import REPO_ROOT

LENGTH, PROMPT, NEW_TOKENS, GPT2_VOCAB = 1024, 64, 128, 50_257
TINY_LENGTH, TINY_PROMPT, TINY_NEW_TOKENS = 64, 8, 16


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="tiny shapes, on CPU, in seconds")
  parser.add_argument("--torch_baseline", default="", help="path of torch_gpt2_baseline.py")
  parser.add_argument("--implementations", default="",
                      help="comma-separated; default: models.attention.IMPLEMENTATIONS "
                           "but 'reference'")
  parser.add_argument("--steps", type=int, default=0, help="timed steps (default 20; tiny 3)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps, the first compiles")
  parser.add_argument("--peak_flops", type=float, default=0.0,
                      help="per device, for MFU; 0 = from train.metrics' table")
  parser.add_argument("--budget_seconds", type=float, default=420.0,
                      help="jobs not started by then are skipped; a job ends by then")
  parser.add_argument("--job", default="", help=argparse.SUPPRESS)  # A child's one job (JSON).
  args = parser.parse_args(argv)
  args.steps = args.steps or (3 if args.tiny else 20)
  if args.steps < 1 or args.warmup < 1:
    parser.error("--steps and --warmup must be at least 1.")
  return args


# ---------------------------------------------------------------- synthetic batches

def segments(rng, rows: int, length: int, count: int):
  """(ids, positions) [rows, length]: `count` examples a row, every token real."""
  ids, positions = np.zeros((rows, length), np.int32), np.zeros((rows, length), np.int32)
  for r in range(rows):
    cuts = np.sort(rng.choice(np.arange(1, length), count - 1, replace=False))
    for i, (start, end) in enumerate(zip([0, *cuts], [*cuts, length])):
      ids[r, start:end], positions[r, start:end] = i + 1, np.arange(end - start)
  return ids, positions


def lm_batch(rows: int, length: int, vocab: int, examples_per_row: int) -> dict:
  rng = np.random.default_rng(0)
  ids, positions = segments(rng, rows, length, examples_per_row)
  tokens = rng.integers(0, vocab, (rows, length + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": ids,
          "positions": positions, "weights": np.ones((rows, length), np.float32)}


def seq2seq_batch(rows: int, source: int, target: int, vocab: int) -> dict:
  rng = np.random.default_rng(0)
  enc_ids, enc_positions = segments(rng, rows, source, 4)
  dec_ids, dec_positions = segments(rng, rows, target, 4)
  targets = rng.integers(0, vocab, (rows, target + 1), dtype=np.int32)
  return {"encoder_tokens": rng.integers(0, vocab, (rows, source), dtype=np.int32),
          "encoder_segment_ids": enc_ids, "encoder_positions": enc_positions,
          "decoder_inputs": targets[:, :-1], "decoder_targets": targets[:, 1:],
          "decoder_segment_ids": dec_ids, "decoder_positions": dec_positions,
          "weights": np.ones((rows, target), np.float32)}


# ---------------------------------------------------------------- experiments

def experiment_config(name: str, tiny: bool, local_data: str, **model):
  """The experiment's config (its tiny variant with --tiny) on a bundled local file through
  byte tokens, so that nothing downloads: the batches are synthetic anyway."""
  c = importlib.import_module(f"experiments.{name}").get_config("tiny" if tiny else "")
  c.data.source = f"local:{REPO_ROOT / local_data}"
  c.data.source_options = {"validation_fraction": 0.15, "test_fraction": 0.15}
  c.data.tokenizer, c.data.vocab_size, c.data.num_workers = "bytes", 0, 0
  c.model.update(model)
  return c


def gpt2_config(tiny: bool, implementation):
  return experiment_config("gpt2_small", tiny, "experiments/data/tiny_corpus.txt",
                           vocab_size=0 if tiny else GPT2_VOCAB,
                           attention_implementation=implementation)


def build(config, workdir: str) -> loop.Experiment:
  """loop.build, its dataset preparation's messages sent to stderr: stdout holds the table."""
  with contextlib.redirect_stdout(sys.stderr):
    return loop.build(config, workdir)


def peak_bytes():
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def train_step(config, workdir: str):
  """(experiment, initial state, the loop's jitted train step), as `python -m train` has them."""
  exp = build(config, workdir)
  state, shardings = loop.init_state(exp, jax.random.key(0))
  return exp, state, loop.jit_train_step(exp, shardings)


def measure_train(config, batches: list[dict], args, workdir: str) -> list[dict]:
  """The loop's train step, compiled once, timed on each synthetic batch (of the same shapes:
  a later batch runs the program compiled for the first, so it shares its compile seconds)."""
  exp, state, step = train_step(config, workdir)
  results = []
  for batch in batches:
    batch = parallel.host_to_global(batch, exp.mesh)
    try:
      start = time.perf_counter()
      step.lower(state, batch).compile()
    except ValueError as e:
      results.append(refused(e))
      continue
    compile_seconds = results[0]["compile_seconds"] if results else (
        time.perf_counter() - start)
    seconds = []
    for _ in range(args.warmup + args.steps):
      start = time.perf_counter()
      state, sums = step(state, batch)
      jax.block_until_ready(sums)
      seconds.append(time.perf_counter() - start)
    step_seconds = statistics.median(seconds[args.warmup:])
    results.append({"tokens_per_second": float(sums["weight"]) / step_seconds,
                    "step_seconds": step_seconds, "compile_seconds": compile_seconds,
                    "step_flops": metrics.step_flops(step.trace(state, batch)),
                    "peak_bytes": peak_bytes()})
  return results


def refused(error: ValueError) -> dict:
  """A case an implementation cannot take: the first sentence of its error."""
  return {"refused": str(error).split(". ")[0]}


def measure_decode(batches: list[int], args, workdir: str) -> list[dict]:
  """Greedy decoding of the GPT-2 model with random weights in its compute dtype, at each
  batch size in turn (one model; the peak memory is the largest batch's so far)."""
  exp = build(gpt2_config(args.tiny, None), workdir)
  module = exp.task.model
  prompt_len, new_tokens = (TINY_PROMPT, TINY_NEW_TOKENS) if args.tiny else (PROMPT, NEW_TOKENS)
  prompts_BT = [np.random.default_rng(0).integers(
      0, exp.model_cfg.vocab_size, (rows, prompt_len), dtype=np.int32) for rows in batches]
  params = jax.jit(module.init)(jax.random.key(0), prompts_BT[0])["params"]
  params = jax.tree.map(lambda x: x.astype(exp.model_cfg.dtype), params)

  search = decoding.Search(method="greedy", max_new_tokens=new_tokens)
  results = []
  for prompt_BT in prompts_BT:
    seconds = []
    for _ in range(1 + max(args.steps // 4, 2)):  # The first call compiles.
      start = time.perf_counter()
      jax.block_until_ready(
          decoding.generate_decoder_only(module, params, prompt_BT, None, search))
      seconds.append(time.perf_counter() - start)
    generate_seconds = statistics.median(seconds[1:])
    results.append({"tokens_per_second": len(prompt_BT) * new_tokens / generate_seconds,
                    "step_seconds": generate_seconds,
                    "compile_seconds": seconds[0] - generate_seconds, "peak_bytes": peak_bytes()})
  return results


def job_rows(job: dict) -> list[dict]:
  """A job's rows of the table, before their results: train, unpacked then packed; decode,
  one a batch size; the others, one."""
  if job["kind"] == "train":
    return [{**job, "packed": packed} for packed in (False, True)]
  if job["kind"] == "decode":
    return [{"kind": "decode", "batch": batch} for batch in job["batches"]]
  return [job]


def run_job(job: dict, args, workdir: str) -> list[dict]:
  """The results of a job's rows (`job_rows`). `workdir` holds the local datasets that
  building an experiment prepares (once)."""
  try:
    if job["kind"] == "train":
      length = TINY_LENGTH if args.tiny else LENGTH
      vocab = 256 if args.tiny else GPT2_VOCAB
      batches = [lm_batch(job["batch"], length, vocab, examples) for examples in (1, 4)]
      return measure_train(gpt2_config(args.tiny, job["implementation"]), batches, args, workdir)
    if job["kind"] == "decode":
      return measure_decode(job["batches"], args, workdir)
    assert job["kind"] == "seq2seq", job
    config = experiment_config("transformer_base", args.tiny, "experiments/data/en_de_tiny.tsv",
                               vocab_size=0 if args.tiny else 32_000)
    d, vocab = config.data, 256 if args.tiny else 32_000
    batch = seq2seq_batch(job["batch"], d.inputs_len, d.targets_len, vocab)
    return measure_train(config, [batch], args, workdir)
  except ValueError as e:
    return [refused(e)] * len(job_rows(job))


def run_child(job: dict, args, timeout: float) -> list[dict]:
  """`run_job` in a fresh process: its own peak memory and cold compilations, and a crash
  costs its rows only. {"results": [...], "device": ..., "peak_flops": ...}."""
  command = [sys.executable, "-m", "benchmarks.accelerator", f"--job={json.dumps(job)}",
             f"--steps={args.steps}", f"--warmup={args.warmup}",
             f"--peak_flops={args.peak_flops}"] + (["--tiny"] if args.tiny else [])
  rows = len(job_rows(job))
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"results": [{"skipped": f"over {timeout:.0f} s"}] * rows}
  lines = done.stdout.strip().splitlines()
  if done.returncode or not lines:
    last = (done.stderr.strip().splitlines() or ["no output"])[-1][:120]
    return {"results": [{"skipped": f"failed: {last}"}] * rows}
  return json.loads(lines[-1])


def run_torch(args, batch: int, decode: bool, timeout: float) -> dict:
  """The PyTorch baseline's JSON summary (its last stdout line)."""
  command = [sys.executable, args.torch_baseline, f"--batch={batch}", f"--steps={args.steps}",
             f"--warmup={max(args.warmup, 3)}", f"--prompt-len={PROMPT}",
             f"--decode-tokens={NEW_TOKENS}"]
  command += ["--both", "--decode-batches=1,16"] if decode else []
  command += ["--tiny", "--device=cpu", "--no-compile"] if args.tiny else []
  if args.peak_flops:
    command.append(f"--peak-flops={args.peak_flops}")
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"over {timeout:.0f} s"}
  lines = done.stdout.strip().splitlines()
  try:
    return json.loads(lines[-1])
  except (IndexError, json.JSONDecodeError):
    return {"error": f"no summary: {(done.stderr.strip().splitlines() or ['?'])[-1][:120]}"}


# ---------------------------------------------------------------- the table

def plan(args, implementations) -> list[dict]:
  """Every job, most important first: batch 16 training, decoding, seq2seq, batch 32."""
  small, large = (8, None) if args.tiny else (16, 32)
  train = lambda batch: [{"kind": "train", "implementation": name, "batch": batch}
                         for name in implementations]
  torch = lambda batch, decode: ([{"kind": "torch", "batch": batch, "decode": decode}]
                                 if args.torch_baseline else [])
  rest = [] if args.tiny else train(large) + torch(large, False)
  return (torch(small, True) + train(small) + [{"kind": "decode", "batches": [1, 16]}]
          + [{"kind": "seq2seq", "batch": 8 if args.tiny else 96}] + rest)


def run_all(args, jobs: list[dict], workdir: str) -> tuple[list[dict], dict]:
  """(each job's rows with their results, the device's description and peak FLOP/s)."""
  start, rows, refusals = time.perf_counter(), [], {}
  # With --tiny this process measures; else only its children touch the device.
  info = device_info(args) if args.tiny else {"device": "no device reported",
                                              "peak_flops": args.peak_flops or None}
  for job in jobs:
    count = len(job_rows(job))
    left = args.budget_seconds - (time.perf_counter() - start)
    if left < 20:
      results = [{"skipped": "time budget spent"}] * count
    elif job["kind"] == "torch":
      results = [run_torch(args, job["batch"], job["decode"], left)]
    elif job.get("implementation") in refusals:  # It refused the smaller batch: same reasons.
      results = refusals[job["implementation"]]
    elif args.tiny:
      results = run_job(job, args, workdir)
    else:
      out = run_child(job, args, min(left, 240))
      results = out["results"]
      info = out if "device" in out else info
    if job["kind"] == "train" and all("refused" in r for r in results):
      refusals[job["implementation"]] = results
    rows.extend({**row, "result": result} for row, result in zip(job_rows(job), results))
  return rows, {"device": info["device"], "peak_flops": info["peak_flops"]}


def label(row: dict) -> str:
  if row["kind"] == "train":
    return (f"train {row['implementation']:<9} B{row['batch']:<3} "
            f"{'packed' if row['packed'] else 'unpacked'}")
  if row["kind"] == "torch":
    name = "torch.compile" if row["result"].get("compile") is True else "torch eager"
    return f"{name:<15} B{row['batch']:<3} train"
  return f"{row['kind']:<15} B{row['batch']}"


def add_mfu_and_ratios(rows: list[dict], peak):
  """MFU from the largest FLOP count of each shape; tapete / torch tokens/s."""
  flops = {}
  for row in rows:
    key = (row["kind"], row["batch"], row.get("packed"))
    flops[key] = max(flops.get(key, 0.0), row["result"].get("step_flops") or 0.0)
  torch_train = {r["batch"]: r["result"].get("tokens_per_s") for r in rows if r["kind"] == "torch"}
  torch_decode = {d["batch"]: d["tokens_per_s"] for r in rows if r["kind"] == "torch"
                  for d in r["result"].get("decode", {}).get("results", [])}
  for row in rows:
    result, key = row["result"], (row["kind"], row["batch"], row.get("packed"))
    if peak and flops.get(key) and "step_seconds" in result:
      result["mfu"] = flops[key] / result["step_seconds"] / peak
    reference = (torch_train if row["kind"] == "train" else
                 torch_decode if row["kind"] == "decode" else {}).get(row["batch"])
    if reference and result.get("tokens_per_second"):
      result["torch_ratio"] = result["tokens_per_second"] / reference


def format_row(row: dict) -> str:
  result = row["result"]
  for reason in ("refused", "skipped", "error"):
    if reason in result:
      return f"{label(row):<32} {reason}: {result[reason]}"
  tokens = result.get("tokens_per_second") or result.get("tokens_per_s")
  mfu = result.get("mfu")
  peak = result.get("peak_bytes") or (result.get("peak_mem_gib") or 0) * 2**30
  compile_s = result.get("compile_seconds") or result.get("first_step_s")
  cells = [f"{tokens:>12,.0f}", f"{100 * mfu:>6.1f}%" if mfu else f"{'-':>7}",
           f"{peak / 2**30:>8.2f}" if peak else f"{'-':>8}",
           f"{compile_s:>9.1f}" if compile_s is not None else f"{'-':>9}",
           f"{result['torch_ratio']:>7.2f}" if result.get("torch_ratio") else ""]
  lines = [f"{label(row):<32} " + " ".join(cells)]
  for decode in result.get("decode", {}).get("results", []):
    lines.append(f"{'torch decode    B' + str(decode['batch']):<32} "
                 f"{decode['tokens_per_s']:>12,.0f}")
  return "\n".join(lines)


def device_info(args) -> dict:
  """This process's devices, and the peak FLOP/s of one for MFU (None where unknown)."""
  device = jax.devices()[0]
  return {"device": f"{jax.device_count()} x {device.device_kind} ({device.platform})",
          "peak_flops": metrics.peak_flops_per_device(args.peak_flops)}


def main(argv=None):
  args = parse_args(argv)
  if args.job:
    if not args.tiny:  # Compile seconds of a cold start, whatever the environment caches.
      jax.config.update("jax_enable_compilation_cache", False)
    with tempfile.TemporaryDirectory() as workdir:
      results = run_job(json.loads(args.job), args, workdir)
    print(json.dumps({"results": results, **device_info(args)}))
    return
  start = time.perf_counter()
  implementations = (args.implementations.split(",") if args.implementations
                     else [name for name in IMPLEMENTATIONS if name != "reference"])
  with tempfile.TemporaryDirectory() as workdir:
    rows, info = run_all(args, plan(args, implementations), workdir)
  peak = info["peak_flops"]
  add_mfu_and_ratios(rows, peak)
  print(f"{info['device']}, jax {jax.__version__}, "
        + (f"peak {peak / 1e12:.0f} TFLOP/s a device" if peak else "no peak FLOP/s known")
        + f"; {time.perf_counter() - start:.0f} s")
  print(f"{'':<32} {'tokens/s':>12} {'MFU':>7} {'peak GiB':>8} {'compile s':>9} {'x torch':>7}")
  order = {"train": 0, "torch": 0, "decode": 1, "seq2seq": 2}
  for row in sorted(rows, key=lambda r: (order[r["kind"]], r["batch"], r["kind"] == "torch")):
    print(format_row(row))
  print(json.dumps({"device": info["device"], "jax": jax.__version__, "peak_flops": peak,
                    "rows": rows}))


if __name__ == "__main__":
  main()
