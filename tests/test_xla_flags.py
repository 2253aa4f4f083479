"""config.train.xla_flags: validated with the config; the train CLI hands them to XLA.

Reference: XLA itself, in a fresh process: with the CLI's flag --xla_dump_to=DIR it writes
its compiled modules there, which it does only if it read the flag.
"""

import os
import pathlib
import subprocess
import sys

import pytest

from experiments import gpt2_small
from train.run import validation, xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The CLI's own path: its flag parsing, then its main, with the run replaced by one compile.
CLI = """
import os, sys
flags, backend = sys.argv[1:]
sys.argv = ["train", "--config=experiments/gpt2_small.py:tiny", "--workdir=unused",
            "--config.train.xla_flags=" + flags]
import jax, jax.numpy as jnp
from train import __main__ as entry
from train.engine import loop

def one_compile(config, workdir):
  jax.jit(lambda x: x + 1)(jnp.ones(3))
  print("XLA_FLAGS=" + os.environ["XLA_FLAGS"])

loop.train_and_evaluate = one_compile
entry.parse_flags(sys.argv)
if backend == "started":
  jax.devices()
entry.main(["train"])
"""


def run_cli(flags: str, backend: str = "fresh") -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", CLI, flags, backend], cwd=ROOT,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("flags, bad", [
    ("--xla_gpu_enable_triton_gemm=false xla_gpu_autotune_level=0", "xla_gpu_autotune_level=0"),
    ("-xla_dump_to=/tmp", "-xla_dump_to=/tmp"),
    ("--jax_enable_x64", "--jax_enable_x64"),
])
def test_a_token_that_is_not_an_xla_flag_is_one_clear_error(flags, bad):
  config = gpt2_small.get_config("tiny")
  config.train.xla_flags = flags
  with pytest.raises(ValueError, match="config.train.xla_flags holds") as info:
    validation.validate(config)
  assert repr([bad]) in str(info.value) and "--xla_NAME=VALUE" in str(info.value)


def test_good_flags_pass_validation():
  config = gpt2_small.get_config()
  config.train.xla_flags = ("--xla_gpu_enable_latency_hiding_scheduler=true "
                            "--xla_gpu_enable_command_buffer=")
  validation.validate(config)


@pytest.mark.slow
def test_the_cli_hands_the_flags_to_xla_before_it_starts(tmp_path):
  dump = tmp_path / "dump"
  result = run_cli(f"--xla_dump_to={dump}")
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"--xla_dump_to={dump}" in result.stdout.split("XLA_FLAGS=", 1)[1].split()
  assert any(dump.iterdir()), "XLA wrote no dump: it did not read the flag"


@pytest.mark.slow
def test_flags_after_the_backend_started_are_one_error_line(tmp_path):
  result = run_cli(f"--xla_dump_to={tmp_path / 'dump'}", backend="started")
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.startswith("error: config.train.xla_flags cannot take effect"), result.stderr
  assert not (tmp_path / "dump").exists()


@pytest.mark.parametrize("platforms, accelerator, before, after", [
    ("cpu", True, "--xla_foo=1", "--xla_foo=1 --xla_backend_optimization_level=1"),
    ("", False, "", "--xla_backend_optimization_level=1"),
    ("", True, "", ""),  # JAX would pick the GPU or TPU: its codegen is left alone.
    ("cpu", False, "--xla_backend_optimization_level=0", "--xla_backend_optimization_level=0"),
])
def test_generate_compiles_at_o1_only_on_the_cpu_and_only_unless_told(
    monkeypatch, platforms, accelerator, before, after):
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  monkeypatch.setenv("XLA_FLAGS", before)
  monkeypatch.setattr(xla_flags, "_backend_started", lambda: False)
  monkeypatch.setattr(xla_flags, "_accelerator_installed", lambda: accelerator)
  xla_flags.compile_quickly_on_cpu()
  assert os.environ["XLA_FLAGS"] == after
