"""Test set-up: 8 host devices on CPU, so that sharded code is tested for real."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the test session's processes (both xdist workers and the
# CLIs the tests start), so that a program compiled once (the quickstart's tiny step, say) is
# not compiled again in every test that trains it. It lives in the checkout (.jax_cache/).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def t5_config(tmp_path_factory):
  """The tiny T5 fine-tuning config; its random checkpoint built away from ~/.cache."""
  from experiments import finetune_t5
  from train import config as config_lib
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("TAPETE_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield config_lib.resolve_assets(finetune_t5.get_config("tiny"))
