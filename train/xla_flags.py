"""config.train.xla_flags: extra XLA flags for a run, appended to XLA_FLAGS before JAX starts.

XLA reads XLA_FLAGS once, when JAX creates its backends (the first device use), so the train
CLI applies them first thing; after that they could no longer take effect, which is an error.
"""

import os


def validate(flags: str) -> None:
  """Each whitespace-separated token is an XLA flag: `--xla_NAME` or `--xla_NAME=VALUE`."""
  if not isinstance(flags, str):
    raise ValueError(f"config.train.xla_flags must be a string of flags, got {flags!r}.")
  bad = [token for token in flags.split() if not token.startswith("--xla_")]
  if bad:
    raise ValueError(f"config.train.xla_flags holds {bad}, which are not XLA flags: give "
                     "space-separated --xla_NAME=VALUE tokens, e.g. "
                     "'--xla_gpu_enable_latency_hiding_scheduler=true'.")


def apply(flags: str) -> None:
  """Appends `flags` to os.environ["XLA_FLAGS"]; an error if JAX's backend already started."""
  validate(flags)
  if not flags.strip():
    return
  if _backend_started():
    raise ValueError("config.train.xla_flags cannot take effect: JAX's backend has already "
                     "started in this process; set them before any device use, or in the "
                     "XLA_FLAGS environment variable.")
  os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *flags.split()]).strip()


def _backend_started() -> bool:
  # Private, as jax (0.10 to current) has no public way to ask without starting the backend.
  from jax._src import xla_bridge
  return xla_bridge.backends_are_initialized()
