"""config.train.xla_flags: extra XLA flags for a run, appended to XLA_FLAGS before JAX starts.

XLA reads XLA_FLAGS once, when JAX creates its backends (the first device use), so the train
CLI applies them first thing; after that they could no longer take effect, which is an error.
"""

import importlib.metadata
import importlib.util
import os
import re

from models.errors import InputError


def validate(flags: str) -> None:
  """Each whitespace-separated token is an XLA flag: `--xla_NAME` or `--xla_NAME=VALUE`."""
  if not isinstance(flags, str):
    raise InputError(f"config.train.xla_flags must be a string of flags, got {flags!r}.")
  bad = [token for token in flags.split() if not token.startswith("--xla_")]
  if bad:
    raise InputError(f"config.train.xla_flags holds {bad}, which are not XLA flags: give "
                     "space-separated --xla_NAME=VALUE tokens, e.g. "
                     "'--xla_gpu_enable_latency_hiding_scheduler=true'.")


def apply(flags: str) -> None:
  """Appends `flags` to os.environ["XLA_FLAGS"]; an error if JAX's backend already started."""
  validate(flags)
  if not flags.strip():
    return
  if _backend_started():
    raise InputError("config.train.xla_flags cannot take effect: JAX's backend has already "
                     "started in this process; set them before any device use, or in the "
                     "XLA_FLAGS environment variable.")
  os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *flags.split()]).strip()


def compile_quickly_on_cpu() -> None:
  """LLVM at -O1 instead of -O2 when JAX will run on the CPU, for a CLI that compiles one
  program per process and runs it briefly (train.generate): on 2 cores the quickstart's
  decoding program compiles in 1.4 s instead of 2.3 s, and 1,000 inputs decode as fast.
  Nothing changes where XLA_FLAGS sets a level, an accelerator plugin is installed (unless
  JAX_PLATFORMS=cpu), or the backend has started."""
  current = os.environ.get("XLA_FLAGS", "")
  if re.search(r"--xla_backend_optimization_level\b", current) or _backend_started():
    return
  if os.environ.get("JAX_PLATFORMS", "").strip().lower() != "cpu" and _accelerator_installed():
    return
  os.environ["XLA_FLAGS"] = f"{current} --xla_backend_optimization_level=1".strip()


def _accelerator_installed() -> bool:
  """Whether a GPU or TPU plugin for JAX is installed (JAX would then pick it over the CPU)."""
  return bool(importlib.metadata.entry_points(group="jax_plugins")) or any(
      importlib.util.find_spec(name) is not None for name in ("jax_plugins", "libtpu"))


def _backend_started() -> bool:
  # Private, as jax (0.10 to current) has no public way to ask without starting the backend.
  from jax._src import xla_bridge
  return xla_bridge.backends_are_initialized()
