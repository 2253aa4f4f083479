"""The measurements behind benchmarks/accelerator.py's rows, each in this one process.

A train row compiles the loop's own jitted step (loop.build, init_state, jit_train_step: what
`python -m train` runs) AOT, with per-compile XLA options, and times --steps steps dispatched
back to back with one wait at the end (as the PyTorch baseline's loop runs: no host sync a
step). Its memory is the compiled program's (arguments + outputs - donated + temporaries:
`memory_analysis`), as a process-wide peak would mix the rows.
"""

import contextlib
import functools
import importlib
import json
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from models import attention, attention_kernels, decoding
from train.engine import loop, metrics, parallel
from train.run import inputs, validation
from train.run.config import REPO_ROOT

LENGTH, PROMPT, NEW_TOKENS, GPT2_VOCAB = 1024, 64, 128, 50_257
TINY_LENGTH, TINY_PROMPT, TINY_NEW_TOKENS = 64, 8, 16
# The A/B rows: XLA options compiled into one program each (jax's compiler_options), by name.
COMPILER_OPTIONS = {
    "default": {},
    "no_triton_gemm": {"xla_gpu_enable_triton_gemm": False},
    "cublaslt": {"xla_gpu_enable_cublaslt": True},
    "cudnn_layer_norm": {"xla_gpu_enable_cudnn_layer_norm": True},
    "latency_hiding": {"xla_gpu_enable_latency_hiding_scheduler": True},
    "no_command_buffers": {"xla_gpu_enable_command_buffer": ""},
}


# ---------------------------------------------------------------- synthetic batches

def segments(rng, rows: int, length: int, count: int):
  """(ids, positions) [rows, length]: `count` examples a row, every token real."""
  ids, positions = np.zeros((rows, length), np.int32), np.zeros((rows, length), np.int32)
  for r in range(rows):
    cuts = np.sort(rng.choice(np.arange(1, length), count - 1, replace=False))
    for i, (start, end) in enumerate(zip([0, *cuts], [*cuts, length])):
      ids[r, start:end], positions[r, start:end] = i + 1, np.arange(end - start)
  return ids, positions


def lm_batch(rows: int, length: int, vocab: int, examples_per_row: int | None) -> dict:
  """Random tokens with segment ids, as the pipeline writes them: one example a row (None:
  unpacked, every id 1) or that many packed examples a row."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (rows, length + 1), dtype=np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "weights": np.ones((rows, length), np.float32)}
  batch["segment_ids"], batch["positions"] = segments(rng, rows, length, examples_per_row or 1)
  return batch


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


def seq2seq_config(tiny: bool):
  return experiment_config("transformer_base", tiny, "experiments/data/en_de_tiny.tsv",
                           vocab_size=0 if tiny else 32_000)


def build(config, workdir: str) -> loop.Experiment:
  """The config validated, then loop.build, its dataset preparation's messages sent to stderr:
  stdout holds the table."""
  validation.validate(config, workdir)
  with contextlib.redirect_stdout(sys.stderr):
    return loop.build(config, workdir)


def train_step(config, workdir: str):
  """(experiment, initial state, the loop's jitted train step for a segment capacity, the
  state's shardings), as `python -m train` has them."""
  exp = build(config, workdir)
  state, shardings = loop.init_state(exp, jax.random.key(0))
  steps = functools.cache(functools.partial(loop.jit_train_step, exp, shardings))
  return exp, state, steps, shardings


# ---------------------------------------------------------------- measuring

def refused(error: Exception) -> dict:
  """A case that cannot run here: the first sentence of its error."""
  return {"refused": str(error).split(". ")[0].split("\n")[0][:160]}


def failed(error: Exception) -> dict:
  return {"failed": f"{type(error).__name__}: {str(error).splitlines()[0][:140]}"
          if str(error) else type(error).__name__}


def program_bytes(compiled) -> int | None:
  """Device memory the compiled program needs: arguments and outputs (the donated counted
  once) and its temporaries."""
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
               + m.temp_size_in_bytes)
  except (AttributeError, TypeError, NotImplementedError, jax.errors.JaxRuntimeError):
    return None


def back_to_back(run, warmup: int, steps: int) -> float:
  """Seconds a call of `run()` (which returns what to wait for): `warmup` calls waited for,
  then `steps` dispatched back to back and waited for once."""
  for _ in range(warmup):
    jax.block_until_ready(run())
  start = time.perf_counter()
  for _ in range(steps):
    out = run()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


class TrainRow:
  """A train step compiled for one batch's shapes: traced and lowered once, then compiled with
  each set of XLA options asked (`measure`). `holder` has the experiment's exp, step,
  shardings and state; the state, donated at each step, is the holder's latest."""

  def __init__(self, holder, batch: dict):
    self.holder = holder
    exp = holder.exp
    start = time.perf_counter()
    # As the loop lays out its batches: rows of one example lose their segment ids.
    self.capacity, batch = inputs.BatchLayout(exp.config.task, exp.config.data)(batch)
    self.batch = parallel.host_to_global(batch, exp.mesh)
    self.traced = holder.step(self.capacity).trace(holder.state, self.batch)
    self.lowered = self.traced.lower()
    self.lower_seconds = time.perf_counter() - start
    self.flops = metrics.step_flops(self.traced)
    self.hardware_flops = metrics.step_flops(self.traced, hardware=True)

  def measure(self, args, options: dict | None = None) -> tuple[dict, object]:
    """(result, compiled program): tokens/s of --steps back-to-back steps, compile seconds
    (the first program's include its trace and lowering), the program's memory. An option
    this XLA does not know refuses the row."""
    start = time.perf_counter()
    try:
      compiled = self.lowered.compile(compiler_options=options or None)
    except jax.errors.JaxRuntimeError as e:
      return {"refused": str(e).splitlines()[0][:160]}, None
    compile_seconds = time.perf_counter() - start + self.lower_seconds
    self.lower_seconds = 0.0  # Later programs reuse the trace.
    run = lambda: step_once(compiled, self.holder, self.batch)
    seconds = back_to_back(run, args.warmup, args.steps)
    tokens = float(run()["weight"])
    result = {"tokens_per_second": tokens / seconds, "step_seconds": seconds,
              "compile_seconds": compile_seconds, "step_flops": self.flops,
              "hardware_flops": self.hardware_flops, "memory_bytes": program_bytes(compiled)}
    return result, compiled


def step_once(compiled, holder, batch):
  """One step of `compiled` on the holder's state, which it replaces; the step's sums."""
  holder.state, sums = compiled(holder.state, batch)
  return sums


def warm_compile_seconds(row: TrainRow) -> float:
  """Seconds to trace, lower and compile `row`'s step again in a fresh jit, with JAX's
  in-memory caches cleared: what a rerun pays with the persistent compilation cache."""
  jax.clear_caches()
  fresh = loop.jit_train_step(row.holder.exp, row.holder.shardings, row.capacity)
  start = time.perf_counter()
  fresh.trace(row.holder.state, row.batch).lower().compile()
  return time.perf_counter() - start


def measure_decode(batches: list[int], args, workdir: str) -> list[dict]:
  """Greedy decoding (models.decoding) of the GPT-2 model with random weights in its compute
  dtype, at each batch size: B x new tokens / seconds, the prompt's prefill included (the
  baseline leaves its prefill out); step_seconds: a new token's share of the call."""
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
    generate = lambda: decoding.generate_decoder_only(module, params, prompt_BT, None, search)
    start = time.perf_counter()
    jax.block_until_ready(generate())  # Compiles.
    first = time.perf_counter() - start
    seconds = statistics.median(_timed(generate) for _ in range(max(args.steps // 4, 2)))
    results.append({"tokens_per_second": len(prompt_BT) * new_tokens / seconds,
                    "step_seconds": seconds / new_tokens, "generate_seconds": seconds,
                    "compile_seconds": max(first - seconds, 0.0)})
  return results


def _timed(run) -> float:
  start = time.perf_counter()
  jax.block_until_ready(run())
  return time.perf_counter() - start


def attention_shape(tiny: bool) -> tuple[int, int, int, int]:
  """[B, T, N, H] of GPT-2 small's attention at batch 16 (--tiny: small)."""
  return (2, TINY_LENGTH, 2, 16) if tiny else (16, LENGTH, 12, 64)


def measure_attention(implementation: str, segments_per_row: int | None, args) -> dict:
  """Causal self-attention alone, forward and backward (the gradient of q, k and v), in bf16:
  unpacked (None: no segment ids) or with that many segments a row, the kernel promised that
  many (attention_kernels.segments_at_most, as the loop promises its packed batches')."""
  B, T, N, H = attention_shape(args.tiny)
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.bfloat16) for _ in range(3))
  ids = (None if segments_per_row is None
         else jnp.asarray(segments(rng, B, T, segments_per_row)[0]))

  def loss(q, k, v, ids):
    out = attention.dot_product_attention(q, k, v, is_causal=True, query_segment_ids=ids,
                                          kv_segment_ids=ids, implementation=implementation)
    return out.astype(jnp.float32).sum()
  promise = (contextlib.nullcontext() if segments_per_row is None
             else attention_kernels.segments_at_most(segments_per_row))
  with promise:
    try:
      compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v, ids).compile()
    except ValueError as e:
      return refused(e)
  seconds = back_to_back(lambda: compiled(q, k, v, ids), args.warmup, args.steps)
  flops = 3 * metrics.attention_flops((B, T, N, H), (B, T, N, H))
  return {"step_seconds": seconds, "tflops": flops / seconds / 1e12}


def run_torch(args, batch: int, decode: bool, timeout: float) -> dict:
  """The PyTorch baseline's JSON summary (its last stdout line): training at `batch`, and with
  `decode` its compiled greedy decoding (--decode-compile: torch.compile's CUDA graphs) at
  batch 1 and 16."""
  command = [sys.executable, args.torch_baseline, f"--batch={batch}", f"--steps={args.steps}",
             f"--warmup={max(args.warmup, 3)}", f"--prompt-len={PROMPT}",
             f"--decode-tokens={NEW_TOKENS}"]
  command += ["--both", "--decode-batches=1,16"] if decode else []
  command += ["--decode-compile"] if decode and not args.tiny else []
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
