"""Many `python -m MODULE ARGS` commands for the price of one interpreter start-up.

A driver process imports the libraries the CLIs share (jax, flax, orbax, grain, ...) once,
then forks a child per command that runs MODULE as `__main__` through runpy, as `python -m`
does, with its own argv, environment additions, stdout and stderr. A child ends as the
interpreter ends a `python -m` run: its exit status, an uncaught exception's traceback on its
stderr, then the normal shutdown. The CLI modules themselves are not imported by the driver,
so each child executes its module's code afresh.
"""

import dataclasses
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Imported by the driver before it forks; only libraries, never a CLI's own module.
SHARED_IMPORTS = ("train.loop", "train.workdir", "train.workdir_cli", "train.cli",
                  "train.experiment_file", "train.xla_flags", "train.figures",
                  "train.export_tokenizer", "models.pretrained_export", "launch.experiment")

DRIVER = """
import importlib, json, os, runpy, sys
jobs = json.load(sys.stdin)
for name in jobs["imports"]:
  importlib.import_module(name)
codes = []
for job in jobs["commands"]:
  pid = os.fork()
  if pid == 0:
    os.environ.update(job["env"])
    for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
      os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = [job["module"], *job["args"]]
    runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
    sys.exit(0)
  codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print(json.dumps(codes))
"""


@dataclasses.dataclass
class Finished:
  returncode: int
  stdout: str
  stderr: str


def run_all(commands: list[tuple[str, list[str]]], folder: pathlib.Path, env: dict,
            extra_env: list[dict] | None = None) -> list[Finished]:
  """Runs each (module, args) as `python -m module *args` in ROOT with `env` (plus
  extra_env[i] for command i), one after another; their outputs are kept in `folder`."""
  folder.mkdir(parents=True, exist_ok=True)
  jobs = []
  for i, (module, args) in enumerate(commands):
    jobs.append({"module": module, "args": [str(a) for a in args],
                 "env": (extra_env or [{}] * len(commands))[i],
                 "stdout": str(folder / f"{i}.stdout"), "stderr": str(folder / f"{i}.stderr")})
  driver = subprocess.run([sys.executable, "-c", DRIVER], cwd=ROOT, env=env, text=True,
                          input=json.dumps({"imports": SHARED_IMPORTS, "commands": jobs}),
                          capture_output=True, timeout=600)
  assert driver.returncode == 0, driver.stderr[-3000:]
  codes = json.loads(driver.stdout.splitlines()[-1])
  return [Finished(code, pathlib.Path(job["stdout"]).read_text(),
                   pathlib.Path(job["stderr"]).read_text()) for code, job in zip(codes, jobs)]
