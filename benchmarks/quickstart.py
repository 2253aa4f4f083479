"""Wall time and exact match of the quickstart, and step time of gpt2_small's tiny variant.

  python -m benchmarks.quickstart

Runs each through the CLI in a fresh workdir (set-up excluded, data, compile and eval
included), and reads the results back from metrics.jsonl.
"""

import json
import os
import subprocess
import sys
import tempfile
import time


def run(config: str, *overrides: str) -> tuple[float, list[dict]]:
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "train", f"--config={config}", f"--workdir={workdir}",
                    *overrides], check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return seconds, [json.loads(line) for line in f]


def main():
  print(f"{os.cpu_count()} CPU cores")
  seconds, lines = run("experiments/quickstart.py")
  final = [line for line in lines if line["split"] == "eval"][-1]
  print(f"quickstart: {seconds:.1f} s wall, exact match {final['exact_match']:.4f} on "
        f"{final['decoded']:.0f} held-out numbers, BLEU {final['bleu']:.2f}")
  seconds, lines = run("experiments/gpt2_small.py:tiny", "--config.train.num_steps=40",
                       "--config.train.log_every=10", "--config.train.checkpoint_every=40")
  timed = [line for line in lines if line["split"] == "train" and "step_seconds" in line]
  step = sum(line["step_seconds"] for line in timed) / len(timed)
  tokens = sum(line["tokens_per_second"] for line in timed) / len(timed)
  print(f"gpt2_small:tiny: {step * 1000:.1f} ms/step, {tokens:,.0f} tokens/s "
        f"(batch 8 x 64, after compile), {seconds:.1f} s wall for 40 steps")


if __name__ == "__main__":
  main()
