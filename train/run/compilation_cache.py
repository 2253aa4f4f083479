"""JAX's persistent compilation cache for the CLIs (train, generate, evaluate): a program
compiled once, the train step say, is read back from disk at the next start, and on GPUs
XLA's autotuning results (which GEMM and fusion configs won) come back with it.

On by default, in $TAPETE_CACHE/jax/jaxlib-VERSION (default ~/.cache/tapete/jax/...; one folder
per jaxlib, as XLA's autotune files carry no version of their own). A folder named by
JAX_COMPILATION_CACHE_DIR (the tests' .jax_cache/, say) is used instead. Off with
JAX_ENABLE_COMPILATION_CACHE=false (every CLI) or config.train.compilation_cache=False.
"""

import importlib.metadata
import os

import jax

# Programs that compile faster than this are not written: an eager one-op program (a few ms)
# would cost a file and a lookup for nothing, while a CLI's own programs (train and eval
# steps, init, decoding loops: 0.1 s on a CPU to tens of seconds on a GPU) are all kept.
MIN_COMPILE_SECONDS = 0.05
# JAX's names for the XLA caches kept beside its own; the kernel cache (all) needs more.
XLA_CACHES = "xla_gpu_per_fusion_autotune_cache_dir"


def default_dir() -> str:
  from train.assets import cache
  return str(cache.cache_dir() / "jax" / f"jaxlib-{importlib.metadata.version('jaxlib')}")


def use(enabled: bool = True) -> str | None:
  """Turns the persistent cache on (the folder it uses) or, with enabled=False, off (None).

  Call before anything compiles: JAX opens the cache at the first compilation. Settings given
  in the environment (JAX_COMPILATION_CACHE_DIR, JAX_ENABLE_COMPILATION_CACHE,
  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS) are kept.
  """
  if not enabled or not jax.config.jax_enable_compilation_cache:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", default_dir())
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  if ("JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES" not in os.environ
      and hasattr(jax.config, "jax_persistent_cache_enable_xla_caches")):  # jax 0.4.36 on
    jax.config.update("jax_persistent_cache_enable_xla_caches", XLA_CACHES)
  return jax.config.jax_compilation_cache_dir
