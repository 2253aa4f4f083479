"""The memory of fine-tuning a 7B LLaMA with LoRA under FSDP, computed without allocating it.

The loop's FSDP rules split every weight of an abstract LLaMA-2 7B state over the 8 forced CPU
devices; benchmarks/memory.py (--tiny) prints its table of bytes per device.
"""

import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from train.engine import loop, parallel
from train.engine.state import TrainState
from train.run import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_an_abstract_7b_lora_state_shards_over_8_devices(tmp_path):
  config = config_lib.base_config()
  config.model.preset, config.model.vocab_size = "llama", 32_000
  config.model.param_dtype, config.model.scan_layers = "bfloat16", True
  config.lora.enabled = True
  config.mesh.fsdp = 8
  exp = loop.build(config, str(tmp_path))
  init = lambda rng: TrainState.create(params=exp.trainable.init(rng), tx=exp.tx, rng=rng)
  abstract, shardings = parallel.abstract_init(init, exp.mesh, parallel.DEFAULT_RULES,
                                               jax.random.key(0))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
  base = list(zip(jax.tree.leaves(abstract.params["base"]),
                  jax.tree.leaves(shardings.params["base"])))
  assert sum(x.size for x, _ in base) == 6_738_415_616  # LLaMA-2 7B
  for x, sharding in base:  # Every weight, norms included, is split 8 ways.
    assert np.prod(sharding.shard_shape(x.shape)) * 8 == x.size, x.shape
  assert {x.dtype for x, _ in base} == {np.dtype(jax.numpy.bfloat16)}


@pytest.mark.slow
def test_memory_benchmark_tiny_prints_the_table():
  """Per device: weights halve on 2 devices; a row keeps at least its layers' inputs (bf16)
  and its float32 logits for the backward pass."""
  out = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--tiny"], cwd=ROOT,
                       check=True, capture_output=True, text=True).stdout
  rows = {int(m[0]): [float(v) for v in m[1:]] for m in re.findall(
      r"^\| (\d) \| " + r" \| ".join([r"([\d.]+) KiB"] * 5) + r" \|$", out, re.M)}
  assert sorted(rows) == [1, 2], out
  (base_1, _, _, act_1, total_1), (base_2, _, _, act_2, _) = rows[1], rows[2]
  assert abs(base_2 - base_1 / 2) < 0.01 and act_1 == act_2
  assert abs(total_1 - sum(rows[1][:4])) < 0.02
  layers, tokens, width, vocab = 2, 16, 64, 512  # benchmarks/memory.py's TINY, --tiny rows
  kept = (layers * tokens * width * 2 + tokens * vocab * 4) / 1024
  assert kept <= act_1 < 2 * kept
