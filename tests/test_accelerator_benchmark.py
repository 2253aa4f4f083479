"""benchmarks/accelerator.py --tiny runs end to end on CPU and prints every row, measured."""

import json
import os
import subprocess
import sys

import pytest

from conftest import one_device_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_tiny_benchmark_prints_every_row_with_measured_numbers():
  env = one_device_env()
  done = subprocess.run(
      [sys.executable, "-m", "benchmarks.accelerator", "--tiny", "--peak_flops=1e12",
       "--steps=2", "--warmup=1", "--implementations=xla,cudnn"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  lines = done.stdout.strip().splitlines()
  summary = json.loads(lines[-1])
  table = "\n".join(lines[:-1])
  assert lines[0].startswith("1 x cpu (cpu), jax "), lines[0]  # Nothing but the table.
  rows = {(r["kind"], r.get("implementation"), r["batch"], r.get("packed")): r["result"]
          for r in summary["rows"]}
  measured = [("train", "xla", 8, False), ("train", "xla", 8, True), ("decode", None, 1, None),
              ("decode", None, 16, None), ("seq2seq", None, 8, None)]
  for key in measured:
    result = rows[key]
    assert result["tokens_per_second"] > 0 and result["compile_seconds"] > 0, (key, result)
    if key[0] != "decode":
      assert 0 < result["mfu"] < 1 and result["step_flops"] > 0, (key, result)
  for line in ["train xla       B8   unpacked", "train xla       B8   packed", "decode          B1",
               "decode          B16", "seq2seq         B8"]:
    assert line in table
  assert "train cudnn     B8   packed      refused: implementation='cudnn'" in table


@pytest.mark.slow
def test_a_job_in_its_own_process_reports_its_rows_and_device():
  from benchmarks import accelerator
  args = accelerator.parse_args(["--tiny"])
  job = {"kind": "train", "implementation": "cudnn", "batch": 8}
  out = accelerator.run_child(job, args, timeout=120)
  assert [r["refused"] for r in out["results"]] == [
      "implementation='cudnn' cannot take this case: it needs a CUDA GPU, and the backend is "
      "'cpu'"] * 2
  assert out["device"].endswith("(cpu)") and out["peak_flops"] is None


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
