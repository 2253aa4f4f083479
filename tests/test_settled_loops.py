"""train/engine/event_loops.py's settled_loops: a read that fails first leaves no other read to land
in a closed loop.

Reference: the way orbax reads a checkpoint (a fresh event loop, an asyncio.gather of
tensorstore futures, the loop closed as soon as the gather raises), with a real tensorstore
future resolved from another thread as a slow read is; without settled loops it prints
"Event loop is closed" after the error, as `python -m train` did on a damaged checkpoint.
"""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = """
import asyncio, contextlib, sys, threading, time
import tensorstore as ts
from train.engine.event_loops import settled_loops

def read_as_orbax_does():
  promise, slow_read = ts.Promise.new()
  threading.Timer(0.3, promise.set_result, [b"bytes"]).start()  # still in flight at the error
  async def damaged_read():
    raise ValueError("DATA_LOSS: a damaged file")
  async def reads():
    return await asyncio.gather(damaged_read(), slow_read)
  loop = asyncio.new_event_loop()
  try:
    return loop.run_until_complete(reads())
  finally:
    loop.close()

with settled_loops() if sys.argv[1] == "settled" else contextlib.nullcontext():
  try:
    read_as_orbax_does()
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
time.sleep(0.6)  # the slow read has landed by now
"""


@pytest.mark.parametrize("loops", ["plain", "settled"])
def test_a_failed_read_leaves_nothing_to_land_in_a_closed_loop(loops):
  process = subprocess.run([sys.executable, "-c", SCRIPT, loops], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
  assert process.returncode == 0, process.stderr
  assert process.stderr.startswith("error: DATA_LOSS: a damaged file\n")
  if loops == "plain":  # the reference: what orbax's loops print without settling
    assert "RuntimeError: Event loop is closed" in process.stderr
  else:
    assert process.stderr == "error: DATA_LOSS: a damaged file\n"
