"""WORKDIR/metrics.jsonl, the run's record: one JSON object a line with `step` and `split`; and
STEP_NAME, the name of a checkpoint's step folder.

Read without jax, so that launch/ can tell from them whether a run is done.
"""

import json
import os
import re

from etils import epath

from models.errors import InputError

FILE = "metrics.jsonl"
# A run's checkpoints are WORKDIR/checkpoints/STEP, STEP in plain decimal: orbax's default step
# format, without prefix or zero padding.
STEP_NAME = re.compile(r"^(0|[1-9]\d*)$")


def read_metrics(workdir) -> list[dict]:
  """metrics.jsonl's records; a step logged twice (a run resumed behind its log) keeps the last."""
  path = epath.Path(workdir) / FILE
  if not path.exists():
    return []
  records = {}
  lines = path.read_text().splitlines()
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      if number == len(lines):
        continue  # A last line cut short by a killed run.
      raise InputError(f"{path}, line {number}, is not JSON: {line[:80]!r}.") from None
    records[(record.get("split"), record.get("step"))] = record
  return sorted(records.values(), key=lambda r: (r.get("step", 0), r.get("split", "")))


def recorded(workdir, step: int, split: str) -> dict | None:
  """The values logged for (`step`, `split`), or None if none were."""
  for record in read_metrics(workdir):
    if record.get("step") == step and record.get("split") == split:
      return {k: v for k, v in record.items() if k not in ("step", "split")}
  return None


def open_for_append(workdir: str):
  """metrics.jsonl opened to append, a last line cut short by a killed run removed first."""
  path = os.path.join(workdir, FILE)
  if os.path.exists(path):
    with open(path, "rb+") as f:
      data = f.read()
      if data and not data.endswith(b"\n"):
        f.truncate(data.rfind(b"\n") + 1)
  return open(path, "a")
