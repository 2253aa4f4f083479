"""Test set-up: 8 host devices on CPU, so that sharded code is tested for real."""

import fcntl
import importlib.metadata
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

# LLVM at -O0: three quarters of the suite's CPU time is XLA compiling tiny programs, mostly in
# LLVM; -O0 cuts a test file's CPU time by 30-45% (test_transformer 183 -> 119 s) and changes no
# result a test checks. The CLIs the tests start inherit it; users' runs keep XLA's default.
_LEVEL = ("" if "--xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", "")
          else " --xla_backend_optimization_level=0")  # unless the caller's XLA_FLAGS sets one
# jaxlib 0.10's XLA generates CPU code through its new MLIR fusion emitters unless told not
# to; its older emitters compile the tests' programs in about half the CPU time
# (test_decoding_loops 25 -> 15 CPU-s) and change no result a test checks. From jaxlib 0.11 the
# new emitters are the only ones and the flag is unknown, which XLA refuses.
OLDER_EMITTERS = ("--xla_cpu_use_fusion_emitters=false"
                  if tuple(map(int, importlib.metadata.version("jaxlib").split(".")[:2])) < (0, 11)
                  else "")  # Also for the programs tests start with XLA_FLAGS of their own.
_EMITTERS = (f" {OLDER_EMITTERS}" if OLDER_EMITTERS
             and "--xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", "") else "")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + _LEVEL + _EMITTERS
    + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the test session's processes (both xdist workers and the
# CLIs the tests start), so that a program compiled once (the quickstart's tiny step, say) is
# not compiled again in every test that trains it. It lives in the checkout (.jax_cache/).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def t5_config(tmp_path_factory):
  """The tiny T5 fine-tuning config; its random checkpoint built away from ~/.cache."""
  from experiments import finetune_t5
  from train.run import config as config_lib
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("TAPETE_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield config_lib.resolve_assets(finetune_t5.get_config("tiny"))


QUICKSTART_TINY_CLI = ["-m", "train", "--config=experiments/quickstart.py:tiny",
                       "--config.train.num_steps=4", "--config.optim.learning_rate=1e-5"]


def one_device_env() -> dict:
  """The environment of a CLI as a user runs it: CPU with one device."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                            env.get("XLA_FLAGS", "")).strip()
  return env


@pytest.fixture(scope="session")
def quickstart_tiny_cli(tmp_path_factory) -> tuple[pathlib.Path, str]:
  """(workdir, stdout) of `python -m train QUICKSTART_TINY_CLI`, trained once for the whole
  session: the first xdist worker to ask trains it, under a lock the others wait on.

  A small learning rate keeps the model near its random start, whose answers differ from
  input to input (a few steps at the real one answer "e e e ..." to everything)."""
  shared = tmp_path_factory.getbasetemp()
  if "PYTEST_XDIST_WORKER" in os.environ:
    shared = shared.parent  # the session's folder, above every worker's own
  workdir, stdout = shared / "quickstart_tiny_cli", shared / "quickstart_tiny_cli.stdout"
  with open(shared / "quickstart_tiny_cli.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not stdout.exists():
      process = subprocess.run([sys.executable, *QUICKSTART_TINY_CLI, f"--workdir={workdir}"],
                               cwd=ROOT, env=one_device_env(), capture_output=True, text=True,
                               timeout=300)
      assert process.returncode == 0, process.stderr[-3000:]
      stdout.write_text(process.stdout)
  return workdir, stdout.read_text()


def pytest_collection_modifyitems(items):
  """Tests marked `pretrained` skip where the pretrained extra's torch and transformers are not
  installed: CI's Python 3.12 run leaves them out (torch 2.13.0 for 3.12 is a CUDA build of
  GBs); the main run has them."""
  missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
  if missing:
    skip = pytest.mark.skip(reason=f"needs the pretrained extra: no {' or '.join(missing)} here")
    for item in items:
      if item.get_closest_marker("pretrained"):
        item.add_marker(skip)
