"""benchmarks/accelerator.py --tiny runs end to end on CPU, in one process, and prints every
row measured, the goals and the best row's kernels; its timing and A/B compiles, by hand."""

import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import one_device_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_tiny_benchmark_prints_every_row_with_measured_numbers():
  done = subprocess.run(
      [sys.executable, "-m", "benchmarks.accelerator", "--tiny", "--peak_flops=1e12",
       "--steps=2", "--warmup=1", "--implementations=xla,cudnn", "--top=5"],
      cwd=ROOT, env=one_device_env(), capture_output=True, text=True, timeout=400)
  assert done.returncode == 0, done.stderr[-2000:]
  lines = done.stdout.strip().splitlines()
  summary = json.loads(lines[-1])
  table = "\n".join(lines[:-1])
  assert lines[0].startswith("1 x cpu (cpu), jax "), lines[0]  # Nothing but the table.
  rows = {(r["kind"], r.get("implementation"), r.get("batch") or r.get("segments"),
           r.get("layout"), r.get("options")): r["result"] for r in summary["rows"]}
  trained = [("train", "xla", 8, layout, "default")
             for layout in ("unpacked", "packed 4", "packed 30")]
  for key in trained + [("train", "xla", 8, "unpacked", "no_triton_gemm"),
                        ("seq2seq", None, 8, None, None)]:
    result = rows[key]
    assert result["tokens_per_second"] > 0 and result["compile_seconds"] >= 0, (key, result)
    assert 0 < result["mfu"] < 1 and result["step_flops"] > 0, (key, result)
    assert result["memory_bytes"] > 0, (key, result)
  for batch in (1, 16):
    assert rows[("decode", None, batch, None, None)]["tokens_per_second"] > 0
  for segments in (None, 4, 16, 64):
    assert rows[("attention", "xla", segments, None, None)]["step_seconds"] > 0
    assert "refused" in rows[("attention", "cudnn", segments, None, None)]
  cold, warm = summary["compile_seconds"]["cold"], summary["compile_seconds"]["warm"]
  assert 0 < warm < cold  # The fresh jit's program came from the persistent cache.
  for line in ["train xla B8 unpacked", "train xla B8 packed 4", "train xla B8 packed 30",
               "train xla B8 unpacked [no_triton_gemm]", "decode B1", "decode B16",
               "seq2seq B8", "Goals (issue 21)", "first-step compile, cold, s",
               "Top kernels of the best train row"]:
    assert line in table, line
  assert "train cudnn B8 unpacked                      refused: implementation='cudnn'" in table
  goals = {g["goal"]: g for g in summary["goals"]}
  assert goals["decode B16 tokens/s"]["status"] in ("met", "short")
  assert goals["decode B1 x torch compiled decode"]["status"] == "n/a"  # No baseline given.


@pytest.fixture
def counting_row():
  """A TrainRow over a step that counts its calls in its (donated) state."""
  from benchmarks import accelerator_rows
  from train.engine import parallel
  mesh = parallel.make_mesh()
  step = jax.jit(lambda state, batch: (state + 1, {"weight": batch["weights"].sum()}),
                 donate_argnums=0)
  exp = types.SimpleNamespace(mesh=mesh, config=accelerator_rows.gpt2_config(True, None))
  holder = types.SimpleNamespace(exp=exp, step=lambda capacity: step,
                                 state=jnp.zeros((), jnp.int32), shardings=None)
  batch = {"inputs": np.zeros((8, 4), np.int32), "weights": np.ones((8, 4), np.float32),
           "segment_ids": np.ones((8, 4), np.int32)}
  return accelerator_rows.TrainRow(holder, batch)


def test_a_train_row_times_its_steps_back_to_back_on_the_donated_state(counting_row):
  args = types.SimpleNamespace(warmup=2, steps=5)
  result, compiled = counting_row.measure(args)
  assert int(counting_row.holder.state) == 2 + 5 + 1  # warm-up, timed, and the count's step
  assert result["tokens_per_second"] == pytest.approx(32 / result["step_seconds"])
  assert compiled is not None and result["step_flops"] is None


def test_an_option_this_xla_lacks_refuses_its_row_only(counting_row):
  args = types.SimpleNamespace(warmup=1, steps=1)
  result, compiled = counting_row.measure(args, {"xla_no_such_option": True})
  assert compiled is None and "xla_no_such_option" in result["refused"]
  result, _ = counting_row.measure(args, {"xla_gpu_enable_command_buffer": ""})
  assert result["tokens_per_second"] > 0


def test_rows_are_laid_out_as_the_loop_lays_out_its_batches():
  from benchmarks import accelerator_rows
  from train.run import inputs
  config = accelerator_rows.gpt2_config(True, None)
  layout = inputs.BatchLayout(config.task, config.data)
  capacity, unpacked = layout(accelerator_rows.lm_batch(2, 16, 50, None))
  assert capacity == 1 and set(unpacked) == {"inputs", "targets", "weights"}
  packed = accelerator_rows.lm_batch(2, 16, 50, 4)
  capacity, laid_out = layout(packed)
  assert capacity == 4 and laid_out is packed
  assert [len(np.unique(row)) for row in packed["segment_ids"]] == [4, 4]


@pytest.mark.slow
def test_profile_step_sums_the_traced_kernels(tmp_path, capsys):
  from benchmarks import profile_step
  profile_step.main(["--tiny", "--steps=2", "--warmup=1", "--top=5", f"--trace_dir={tmp_path}"])
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0].startswith("gpt2 B8 on cpu (cpu), attention automatic: ") and (
      "TFLOP/s of matrix products" in lines[0]), lines[0]
  assert lines[1].split() == ["ms/step", "share", "kernel", "(XLA", "op)"]
  shares = [float(line.split()[1].rstrip("%")) for line in lines[2:-1]]
  assert len(shares) == 5 and shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100
  assert lines[-1] == f"trace: {tmp_path}"
  assert list(tmp_path.glob("plugins/profile/*/*.trace.json.gz"))


@pytest.mark.slow
def test_profile_step_refuses_a_kernel_the_device_lacks_in_one_line(tmp_path):
  from benchmarks import profile_step
  with pytest.raises(SystemExit) as exit_info:
    profile_step.main(["--tiny", "--implementation=cudnn", f"--trace_dir={tmp_path / 'trace'}"])
  assert str(exit_info.value).startswith("error: implementation='cudnn' cannot take this case")
  assert not (tmp_path / "trace").exists()
