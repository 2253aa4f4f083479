"""Several `python -m MODULE ARGS` commands run one after another, each a process of its own.

A driver that imported the shared libraries once and forked a child per command saved about a
second of start-up a command, but a forked child of a process that imported jax can deadlock
in XLA's thread pools (seen in a full run: one child stuck compiling, one at exit), as JAX
warns. Each command therefore starts its own interpreter, as a user's does.
"""

import dataclasses
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Finished:
  returncode: int
  stdout: str
  stderr: str


def run_all(commands: list[tuple[str, list[str]]], folder: pathlib.Path, env: dict,
            extra_env: list[dict] | None = None) -> list[Finished]:
  """Runs each (module, args) as `python -m module *args` in ROOT with `env` (plus
  extra_env[i] for command i), one after another; their outputs are also kept in `folder`."""
  folder.mkdir(parents=True, exist_ok=True)
  finished = []
  for i, (module, args) in enumerate(commands):
    done = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT,
                          env={**env, **(extra_env or [{}] * len(commands))[i]},
                          capture_output=True, text=True, timeout=600)
    (folder / f"{i}.stdout").write_text(done.stdout)
    (folder / f"{i}.stderr").write_text(done.stderr)
    finished.append(Finished(done.returncode, done.stdout, done.stderr))
  return finished
