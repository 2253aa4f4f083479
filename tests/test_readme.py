"""The README stays true: its `:tiny` commands, the commands over the quickstart's workdir and
the library examples run as written (with `/tmp/...` paths moved into a test folder).

A command that stops working, or a snippet that no longer runs, fails here.
"""

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def fenced(language: str) -> list[str]:
  """The README's fenced blocks in `language`."""
  return re.findall(rf"```{language}\n(.*?)```", README, re.DOTALL)


def commands() -> list[list[str]]:
  """Every `.venv/bin/python -m ...` command of the bash blocks, continuation lines joined."""
  lines = "\n".join(fenced("bash")).replace("\\\n", " ").splitlines()
  found = []
  for line in lines:
    match = re.search(r"\.venv/bin/python (-m .*?)(?:\s+#.*)?$", line)
    if match and "pip install" not in line:
      found.append(shlex.split(match.group(1)))
  return found


def run(args: list[str], tmp_path: pathlib.Path) -> subprocess.CompletedProcess:
  """`python ARGS` with /tmp/... paths under `tmp_path`, on one CPU device, as a user runs it."""
  args = [re.sub(r"/tmp/", f"{tmp_path}/", a) for a in args]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                            env.get("XLA_FLAGS", "")).strip()
  process = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
  assert process.returncode == 0, (args, process.stderr[-3000:])
  return process


@pytest.mark.slow
def test_readme_tiny_commands_run(tmp_path, monkeypatch):
  tiny = [c for c in commands() if any(":tiny" in a for a in c)]
  assert tiny, "the README shows no :tiny command"
  monkeypatch.chdir(ROOT)  # The snippet that writes the Parquet file the commands read.
  snippet = next(block for block in fenced("python") if "corpus.parquet" in block)
  exec(snippet.replace("/tmp/", f"{tmp_path}/"), {})  # pylint: disable=exec-used
  for args in tiny:
    run(args, tmp_path)
  trained = {a for args in tiny if args[1] == "train" for a in args if a.startswith("--workdir=")}
  over_them = [c for c in commands() if c[1] == "train.generate" and trained & set(c)]
  for args in over_them:  # e.g. the tiny chat run's answer: the assistant's text alone
    assert '"output"' in run(args, tmp_path).stdout


@pytest.mark.slow
def test_readme_commands_over_the_quickstart_workdir_run(quickstart_tiny_cli, tmp_path):
  """The generate and attention-map commands, over a copy of the quickstart the session trained
  by its tiny variant (conftest.quickstart_tiny_cli); the PNG read back by matplotlib's decoder
  (the one attention-map CLI run of the suite)."""
  shutil.copytree(quickstart_tiny_cli[0], tmp_path / "quickstart")
  over_it = [c for c in commands() if c[1] != "train" and "--workdir=/tmp/quickstart" in c]
  assert {c[1] for c in over_it} >= {"train.generate", "train.attention_maps"}, over_it
  for args in over_it:
    out = run(args, tmp_path).stdout
    if args[1] == "train.generate":
      assert "2026" in out and "987654" in out, out
  png = tmp_path / "att.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  height, width, _ = matplotlib.image.imread(png).shape
  assert height > 100 and width > 100


@pytest.mark.slow
def test_readme_library_example_runs():
  snippet = next(block for block in fenced("python") if "DecoderOnly(cfg)" in block)
  namespace = {}
  exec(compile(snippet, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["logits_BTV"].shape == (1, 4, 50257)
  assert namespace["out"].tokens_BN.shape == (1, 8)


@pytest.mark.slow
def test_readme_own_model_example_trains():
  snippet = next(block for block in fenced("python") if "class GatedCrossAttention" in block)
  namespace = {}
  exec(compile(snippet, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  losses = namespace["losses"]
  assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
  assert sorted(namespace["params"]) == [
      "DecoderLayer_0", "DecoderLayer_1", "DecoderLayer_2", "DecoderLayer_3", "Embed_0",
      "GatedCrossAttention_0", "GatedCrossAttention_1", "Norm_0"]
  assert set(namespace["params"]["DecoderLayer_0"]) == {
      "self_attention", "self_attention_norm", "mlp", "mlp_norm"}


@pytest.mark.parametrize("line", [0, 1])
def test_readme_starts_with_the_two_setup_commands(line):
  first = fenced("bash")[0].splitlines()
  assert first[line].startswith(("./setup.sh && .venv/bin/python -m train ",
                                 "./setup.sh --test && .venv/bin/python -m pytest"))
  ci = (ROOT / ".ci" / "run").read_text()
  assert "./setup.sh --test" in ci and ".venv/bin/python -m pytest" in ci
