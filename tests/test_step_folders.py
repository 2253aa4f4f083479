"""One step-folder name for train.engine.checkpoint and launch.workdirs, without jax at launch."""

import os
import subprocess
import sys

import jax.numpy as jnp

from launch import workdirs
from train.engine.checkpoint import Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_launch_finds_the_steps_train_saved_and_nothing_else(tmp_path):
  with Checkpointer(tmp_path / "checkpoints", keep=None, async_save=False) as ckpt:
    for step in (0, 3, 10):
      ckpt.save(step, {"w": jnp.full((2,), step, jnp.float32)}, {"step": step}, force=True)
    saved = ckpt.all_steps()
  for name in ("007", "-1", "3.orbax-checkpoint-tmp-1", "best"):
    (tmp_path / "checkpoints" / name / "state").mkdir(parents=True)
  assert workdirs.checkpoint_steps(tmp_path) == saved == [0, 3, 10]


def test_launch_workdirs_imports_neither_jax_nor_orbax():
  code = ("import sys, launch.workdirs; "
          "print(sorted({'jax', 'orbax'} & {m.split('.')[0] for m in sys.modules}))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == "[]"
