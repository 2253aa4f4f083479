"""Two processes of one jax.distributed job on this machine, each running a worker script."""

import json
import os
import pathlib
import socket
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(worker: str, timeout: float = 120) -> list:
  """Runs `python -c worker PORT PROCESS_ID` as processes 0 and 1 (the coordinator on a free
  port); each must exit 0 and print its result as JSON on its last line: those, by process."""
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    port = str(sock.getsockname()[1])
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  workers = [subprocess.Popen([sys.executable, "-c", worker, port, str(pid)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for pid in (0, 1)]
  outputs = [worker.communicate(timeout=timeout) for worker in workers]
  assert all(worker.returncode == 0 for worker in workers), outputs
  return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
