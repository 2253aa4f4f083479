"""The CLIs' persistent compilation cache (train/run/compilation_cache.py): where it writes, that a
fresh process reads back what an earlier one compiled, and that it can be turned off."""

import importlib.metadata
import json
import os
import subprocess
import sys

import jax
import pytest

from conftest import ROOT, one_device_env

# A process that sets the cache up as the CLIs do, compiles one program, and reports the
# folder and JAX's count of cache hits (jax.monitoring's event for a program read from disk).
COMPILE_ONCE = """
import json, sys
import jax, jax.numpy as jnp
from train.run import compilation_cache
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None)
folder = compilation_cache.use(sys.argv[1] == "on")
jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()
print(json.dumps({"folder": folder, "hits": len(hits),
                  "min_seconds": jax.config.jax_persistent_cache_min_compile_time_secs}))
"""


def compile_once(env: dict, enabled: bool = True) -> dict:
  done = subprocess.run([sys.executable, "-c", COMPILE_ONCE, "on" if enabled else "off"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def user_env(tmp_path) -> dict:
  """A user's environment: no cache folder or threshold named; $TAPETE_CACHE in tmp_path."""
  env = one_device_env()
  for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
               "JAX_ENABLE_COMPILATION_CACHE"):
    env.pop(name, None)
  return {**env, "TAPETE_CACHE": str(tmp_path), "HOME": str(tmp_path / "home")}


def files_under(folder) -> list[str]:
  return [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]


def test_a_second_process_reads_the_program_the_first_compiled(user_env, tmp_path):
  first = compile_once({**user_env, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
  folder = tmp_path / "jax" / f"jaxlib-{importlib.metadata.version('jaxlib')}"
  assert first == {"folder": str(folder), "hits": 0, "min_seconds": 0.0}
  assert files_under(folder) and not (tmp_path / "home").exists()
  second = compile_once({**user_env, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
  assert second["hits"] >= 1  # The program, and the eager ops that made its input.


def test_without_a_threshold_in_the_environment_it_sets_its_own(user_env):
  from train.run import compilation_cache
  assert compile_once(user_env)["min_seconds"] == compilation_cache.MIN_COMPILE_SECONDS > 0


def test_a_folder_named_in_the_environment_wins(user_env, tmp_path):
  named = tmp_path / "named"
  out = compile_once({**user_env, "JAX_COMPILATION_CACHE_DIR": str(named),
                      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
  assert out["folder"] == str(named) and files_under(named)
  assert not (tmp_path / "jax").exists()


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_turned_off_it_writes_nothing(user_env, tmp_path, how):
  env = {**user_env, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  if how == "environment":
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  out = compile_once(env, enabled=how != "argument")
  assert out["folder"] is None and not files_under(tmp_path)


def test_the_train_cli_sets_it_up_from_its_config_before_the_run(monkeypatch):
  from experiments import quickstart
  import train.__main__ as train_main
  seen = []
  monkeypatch.setattr(train_main.loop, "train_and_evaluate", lambda config, workdir: seen.append(
      (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)))
  config = quickstart.get_config("tiny")
  named = jax.config.jax_compilation_cache_dir  # conftest's .jax_cache/, kept
  try:
    train_main.train(config, "unused")
    config.train.compilation_cache = False
    train_main.train(config, "unused")
  finally:
    jax.config.update("jax_enable_compilation_cache", True)
  assert seen == [(True, named), (False, named)]
