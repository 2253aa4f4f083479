"""Bytes per device to fine-tune a 7B LLaMA with LoRA under FSDP, computed without allocating it.

  python -m benchmarks.memory [--devices=1,8,64] [--seq_len=2048] [--rank=8] [--tiny]

The run is the training loop's own (`loop.build` of an lm config: presets.llama, bf16 weights
and compute, layers scanned, remat policy "full", LoRA on the query and value kernels, AdamW),
on a mesh of N forced CPU devices along "fsdp", one row of `seq_len` tokens per device:

  state        `jax.eval_shape` of the loop's init (base weights, adapters, their Adam moments,
               step, rng), placed by the loop's FSDP rules: a device holds its shards' bytes
  activations  what the backward pass keeps: `jax.eval_shape` of `jax.vjp` of the loss, the
               residuals of two rows minus those of one (what one more row adds), per row

Not counted: the step's transient buffers (one layer's recomputation and all-gathered weights,
the full gradients of the adapted kernels before their projection onto the adapters, the
merged kernels). --tiny: a 2-layer model on 1 and 2 devices, for the test that runs it.
"""

import argparse
import os
import sys
import tempfile

if "jax" not in sys.modules:  # Run as a script: enough host devices for the largest mesh.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=64").strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from train.engine import loop, parallel  # noqa: E402
from train.engine.state import TrainState  # noqa: E402
from train.run import config as config_lib, validation  # noqa: E402

GIB = 2**30
TINY = dict(d_model=64, num_heads=4, d_ff=128, num_layers=2, vocab_size=512)


def lora_config(devices: int, seq_len: int, rank: int, tiny: bool):
  """The lm config of the run measured: LLaMA-2 7B (or TINY), bf16, LoRA, FSDP over `devices`."""
  c = config_lib.base_config()
  c.model.preset = "llama"
  for key, value in (TINY if tiny else {"vocab_size": 32_000}).items():
    c.model[key] = value
  c.model.param_dtype = c.model.dtype = "bfloat16"
  c.model.scan_layers, c.model.remat_policy = True, "full"
  c.lora.enabled, c.lora.rank = True, rank
  c.data.seq_len, c.train.batch_size = seq_len, devices
  c.mesh.data, c.mesh.fsdp = -1, devices  # -1: 1 on the mesh of `devices` devices measured
  return c


def state_bytes(exp) -> dict[str, int]:
  """Bytes of one device's shards of the train state, by part."""
  init = lambda rng: TrainState.create(params=exp.trainable.init(rng), tx=exp.tx,
                                       rng=jax.random.key(1))
  abstract, shardings = parallel.abstract_init(init, exp.mesh, parallel.DEFAULT_RULES,
                                               jax.random.key(0))
  parts = {"base weights": 0, "adapters + Adam": 0, "step, rng": 0}
  for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(abstract),
                                    jax.tree.leaves(shardings)):
    size = int(np.prod(sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
    name = jax.tree_util.keystr(path)
    part = ("base weights" if "params" in name and "'base'" in name
            else "adapters + Adam" if "'lora'" in name else "step, rng")
    parts[part] += size
  return parts


def activation_bytes_per_row(exp, seq_len: int) -> int:
  """Bytes the backward pass keeps for one more row of `seq_len` tokens."""
  params = jax.eval_shape(lambda rng: parallel.unbox(exp.trainable.init(rng)),
                          jax.random.key(0))

  def residual_bytes(rows: int) -> int:
    batch = {key: jax.ShapeDtypeStruct((rows, seq_len), jnp.float32 if key == "weights"
                                       else jnp.int32)
             for key in ("inputs", "targets", "segment_ids", "positions", "weights")}
    loss = lambda p, b: exp.task.loss(exp.trainable.model_params(p), b, jax.random.key(0),
                                      train=True)[0]
    residuals = jax.eval_shape(lambda p, b: jax.vjp(lambda q: loss(q, b), p)[1], params, batch)
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(residuals))

  return residual_bytes(2) - residual_bytes(1)


def measure(devices: int, seq_len: int, rank: int, tiny: bool) -> dict[str, int]:
  config = lora_config(devices, seq_len, rank, tiny)
  with tempfile.TemporaryDirectory() as workdir:
    validation.validate(config, workdir)
    exp = loop.build(config, workdir)
  exp.mesh = parallel.make_mesh(config.mesh, jax.devices()[:devices])
  row = {**state_bytes(exp), "activations": activation_bytes_per_row(exp, seq_len)}
  return {**row, "total": sum(row.values())}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", default="1,8,64", help="FSDP sizes, comma-separated")
  parser.add_argument("--seq_len", type=int, default=2048, help="tokens per row (one per device)")
  parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
  parser.add_argument("--tiny", action="store_true", help="a 2-layer model on 1 and 2 devices")
  args = parser.parse_args(argv)
  sizes = [1, 2] if args.tiny else [int(n) for n in args.devices.split(",")]
  if max(sizes) > jax.device_count():
    parser.error(f"--devices asks for {max(sizes)} devices; this process has "
                 f"{jax.device_count()} (run it as a script: it forces 64 host devices).")
  seq_len = 16 if args.tiny else args.seq_len
  print(f"| devices (FSDP) | base weights | adapters + Adam | step, rng | activations "
        f"(1 x {seq_len} tokens) | total per device |")
  print("|---:|---:|---:|---:|---:|---:|")
  unit, scale = ("KiB", 2**10) if args.tiny else ("GiB", GIB)
  for n in sizes:
    row = measure(n, seq_len, args.rank, args.tiny)
    print(f"| {n} | " + " | ".join(f"{row[k] / scale:.2f} {unit}" for k in (
        "base weights", "adapters + Adam", "step, rng", "activations", "total")) + " |")


if __name__ == "__main__":
  main()
