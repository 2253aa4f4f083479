"""A sweep's workdirs: their names, whether a run finished, and their metrics (no jax needed).

Names. A run's workdir is WORKDIR_ROOT/NAME, NAME its overrides as `key=value` joined by
commas, keys sorted: `model.d_model=64,optim.learning_rate=0.003`. The same overrides always
give the same name (whatever their order or the rest of the sweep), so a rerun finds its
runs again. Characters other than letters, digits and `.` `_` `+` `-` become `_`; then, or
when the name would pass 120 characters, an 8-digit hash of the overrides is appended so
that names stay distinct. A run without overrides is `default`.

Finished. A run is finished when its workdir holds a complete checkpoint at a step >= the
run's `train.num_steps` and metrics.jsonl records the eval at that step: rerunning it would
train no further step and evaluate nothing. (train/ always saves at the last step, then
evaluates; orbax writes a step to a temporary folder and renames it to `checkpoints/STEP`
once complete, on GCS it marks it with commit_success.txt.) Anything less is resumed:
running the same command on the same workdir continues from its latest checkpoint (and runs
an eval a kill interrupted).
"""

import hashlib
import json
import re

from etils import epath

from train.engine import records

MAX_NAME = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


def format_value(value) -> str:
  """A value as the train CLI's `--config.KEY=VALUE` flag takes it."""
  return value if isinstance(value, str) else repr(value)


def run_name(overrides: dict) -> str:
  """The workdir name of a run: stable, filesystem-safe, readable (see the module doc)."""
  if not overrides:
    return "default"
  pairs = [(key, format_value(value)) for key, value in sorted(overrides.items())]
  parts = [f"{key}={value}" for key, value in pairs]
  safe = [f"{_UNSAFE.sub('_', key)}={_UNSAFE.sub('_', value)}" for key, value in pairs]
  name = ",".join(safe)
  if safe != parts or len(name) > MAX_NAME:
    digest = hashlib.sha1(json.dumps(sorted(parts)).encode()).hexdigest()[:8]
    name = f"{name[:MAX_NAME]}-{digest}"
  return name


def checkpoint_steps(workdir) -> list[int]:
  """The steps of the complete checkpoints in WORKDIR/checkpoints, ascending."""
  folder = epath.Path(workdir) / "checkpoints"
  if not folder.is_dir():
    return []
  on_gcs = str(folder).startswith("gs://")
  return sorted(int(p.name) for p in folder.iterdir()
                if records.STEP_NAME.match(p.name) and p.is_dir()
                and (not on_gcs or (p / "commit_success.txt").exists()))


def status(workdir, num_steps: int) -> tuple[str, int | None]:
  """("finished" | "resume" | "start", latest checkpoint step or None)."""
  steps = checkpoint_steps(workdir)
  if not steps:
    return "start", None
  done = steps[-1] >= num_steps and records.recorded(workdir, steps[-1], "eval") is not None
  return ("finished" if done else "resume"), steps[-1]
