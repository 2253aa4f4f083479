"""tests/cli_runs.py ends each forked command as `python -m` ends it: the reference is the
interpreter itself, running the same module in a process of its own."""

import os
import subprocess
import sys

import cli_runs

MODULE = """
import sys
print("out", sys.argv[1:])
print("err", file=sys.stderr)
if sys.argv[1] == "exit":
  sys.exit(3)
if sys.argv[1] == "raise":
  raise ValueError("boom")
"""


def test_forked_commands_end_as_the_interpreter_ends_them(tmp_path):
  (tmp_path / "tiny_cli.py").write_text(MODULE)
  env = {**os.environ, "PYTHONPATH": str(tmp_path)}
  cases = [["exit"], ["raise"], ["ok", "--flag=1"]]
  finished = cli_runs.run_all([("tiny_cli", args) for args in cases], tmp_path / "runs", env,
                              extra_env=[{}, {}, {"UNUSED": "1"}])
  for args, done in zip(cases, finished):
    real = subprocess.run([sys.executable, "-m", "tiny_cli", *args], cwd=cli_runs.ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (real.returncode, real.stdout), args
    assert done.stderr.splitlines()[0] == real.stderr.splitlines()[0] == "err", args
    assert done.stderr.splitlines()[-1] == real.stderr.splitlines()[-1], args
  assert [done.returncode for done in finished] == [3, 1, 0]
  assert "Traceback" in finished[1].stderr
