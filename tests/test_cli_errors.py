"""The CLIs' one error path (train/run/cli.py): input the user can fix (models.errors.InputError) is
one `error:` line and exit status 2; any other exception, a ValueError or OSError from inside a
library included, is a bug and keeps its traceback.

Each case runs the train CLI in a fresh process, its flag parsing and main as a user runs them,
with the run replaced by a function that fails one way. The bugs are jax's and Python's own
errors (a shape error inside a jitted function, a file opened outside any check).
"""

import os
import pathlib
import subprocess
import sys

import pytest

from models.errors import InputError, MissingInputError, named_path

ROOT = pathlib.Path(__file__).resolve().parents[1]

CLI = """
import os, sys
failure = sys.argv[1]
sys.argv = ["train", "--config=experiments/quickstart.py:tiny", "--workdir=unused"]
import jax, jax.numpy as jnp
from models.errors import InputError, named_path
from train import __main__ as entry
from train.engine import loop

def fail(config, workdir):
  if failure == "jax":  # a bug: rows of two lengths stacked inside a jitted function
    jax.jit(lambda x: jnp.stack([x, x[1:]]))(jnp.ones(3))
  if failure == "library":  # a bug: a file that no input named, opened without a check
    open(os.path.join("missing", "folder", "file.txt"))
  if failure == "input":
    raise InputError("config.train.num_steps=0 must be positive: give 1 or more.")
  if failure == "named":
    with named_path("--input_file=missing.txt"):
      open("missing.txt")

loop.train_and_evaluate = fail
entry.parse_flags(sys.argv)
entry.main(["train"])
"""


def run_cli(failure: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", CLI, failure], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.slow
@pytest.mark.parametrize("failure, raised", [
    ("jax", "ValueError: All input arrays must have the same shape"),
    ("library", "FileNotFoundError: [Errno 2] No such file or directory"),
])
def test_a_bug_keeps_its_traceback(failure, raised):
  process = run_cli(failure)
  assert process.returncode == 1, process.stderr[-3000:]
  assert "Traceback (most recent call last)" in process.stderr, process.stderr[-3000:]
  assert any(line.startswith(raised) for line in process.stderr.splitlines()), process.stderr
  assert not [line for line in process.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
@pytest.mark.parametrize("failure, line", [
    ("input", "error: config.train.num_steps=0 must be positive: give 1 or more."),
    ("named", "error: --input_file=missing.txt: [Errno 2] No such file or directory: "
              "'missing.txt'; give a path that exists."),
])
def test_input_the_user_can_fix_is_one_line(failure, line):
  process = run_cli(failure)
  assert process.returncode == 2, process.stderr[-3000:]
  assert "Traceback" not in process.stderr, process.stderr[-3000:]
  assert process.stderr.splitlines() == [line], process.stderr[-3000:]


def test_named_path_turns_oserrors_inside_into_input_errors(tmp_path):
  with pytest.raises(MissingInputError, match=r"^--out=\S+: \[Errno 2\] No such file") as missing:
    with named_path(f"--out={tmp_path / 'no' / 'x.png'}"):
      open(tmp_path / "no" / "x.png", "w")
  assert isinstance(missing.value, FileNotFoundError)  # callers catching that still do
  with pytest.raises(InputError, match=r"^--out=\S+ cannot be used: \[Errno 21\] Is a directory"):
    with named_path(f"--out={tmp_path}"):
      open(tmp_path, "w")
  with pytest.raises(InputError, match=r"^--input_file=\S+ cannot be used: 'utf-8' codec"):
    (tmp_path / "latin1.txt").write_bytes("ação".encode("latin-1"))
    with named_path(f"--input_file={tmp_path / 'latin1.txt'}"):
      (tmp_path / "latin1.txt").read_text(encoding="utf-8")


def test_named_path_leaves_other_errors_alone():
  with pytest.raises(KeyError):
    with named_path("--out=x"):
      raise KeyError("a bug")
  error = InputError("already one line")
  with pytest.raises(InputError) as kept:
    with named_path("--out=x"):
      raise error
  assert kept.value is error


# A run refused right after its Checkpointer opened (init_from a run of another shape), with
# the clean-up of tmp folders that orbax's CheckpointManager starts in the background made slow.
EARLY_EXIT = """
import asyncio, sys
from orbax.checkpoint._src.path import async_path
exists = async_path.exists

async def slow_exists(path):
  await asyncio.sleep(1)
  return await exists(path)

async_path.exists = slow_exists
from train.engine import checkpoint
with checkpoint.Checkpointer(sys.argv[1]):
  print("error: refused", file=sys.stderr)
sys.exit(2)
"""


def test_a_run_refused_after_its_checkpointer_opened_ends_on_its_error_line(tmp_path):
  pytest.importorskip("orbax.checkpoint._src.path.async_path")
  process = subprocess.run([sys.executable, "-c", EARLY_EXIT, str(tmp_path / "checkpoints")],
                           cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert process.returncode == 2
  assert process.stderr == "error: refused\n", process.stderr[-3000:]
