"""Forward+backward tokens/s of a GPT-2-small shaped DecoderOnly, per attention implementation.

  python -m benchmarks.model_throughput                      # CPU default: batch 4 x 128
  python -m benchmarks.model_throughput --batch=16 --length=1024 --dtype=bfloat16  # a GPU

Measures the jitted value-and-grad of the next-token loss (no optimizer), after one warm-up
call, and prints one line per implementation and a JSON line last.
"""

import argparse
import json
import time

import flax.linen as nn
import jax
import optax

from models import presets
from models.transformer import DecoderOnly


def measure(implementation, args) -> dict:
  cfg = presets.gpt2(vocab_size=50_304, dropout_rate=0.0, dtype=args.dtype,
                     attention_implementation=implementation, scan_layers=args.scan,
                     remat_policy=args.remat)
  model = DecoderOnly(cfg)
  tokens = jax.random.randint(jax.random.key(0), (args.batch, args.length + 1), 0, 50_257)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  params = nn.unbox(jax.jit(model.init)(jax.random.key(1), inputs))["params"]

  @jax.jit
  def step(params):
    def loss(p):
      logits = model.apply({"params": p}, inputs)
      return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    return jax.value_and_grad(loss)(params)

  start = time.perf_counter()
  jax.block_until_ready(step(params))
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(args.steps):
    out = step(params)
  jax.block_until_ready(out)
  seconds = (time.perf_counter() - start) / args.steps
  return {"implementation": implementation or "auto", "tokens_per_second":
          args.batch * args.length / seconds, "step_seconds": seconds,
          "compile_seconds": compile_s}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--scan", action="store_true")
  parser.add_argument("--remat", default="none")
  parser.add_argument("--implementations", default="",
                      help="comma-separated; default: reference,xla (+cudnn on GPU)")
  args = parser.parse_args()
  names = args.implementations.split(",") if args.implementations else (
      ["reference", "xla"] + (["cudnn"] if jax.default_backend() == "gpu" else []))
  device = jax.devices()[0]
  print(f"GPT-2 small (124M) forward+backward, batch {args.batch} x {args.length}, "
        f"{args.dtype}, on {jax.device_count()} x {device.device_kind} ({device.platform})")
  results = []
  for name in names:
    result = measure(name, args)
    results.append(result)
    print(f"  {result['implementation']:>9}: {result['tokens_per_second']:>10,.0f} tokens/s  "
          f"{result['step_seconds']:.3f} s/step  (compile {result['compile_seconds']:.1f} s)")
  print(json.dumps({"batch": args.batch, "length": args.length, "dtype": args.dtype,
                    "device": device.device_kind, "results": results}))


if __name__ == "__main__":
  main()
