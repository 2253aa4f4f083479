"""Wall time of train.generate on a quickstart workdir: one input, and 1,000 in batches.

  python -m benchmarks.generate [--workdir=DIR] [--tiny]

Without --workdir it first trains the quickstart in a temporary workdir (about 1.5 minutes on
2 cores; --tiny: its tiny variant, and 20 inputs instead of 1,000). Every measurement is a
fresh `python -m train.generate` process timed from start to finish, as a user runs it:

  one input, cold   the compilation cache empty (the first question after training)
  one input, warm   the cache filled by an earlier run (every later question; median of 3)
  N inputs          numbers below one million from a file, --batch_size=64, to a JSONL file

Targets of issue 13 on a quiet 2-core machine: one input <= 3 s, 1,000 inputs <= 20 s.
"""

import argparse
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def cpu_seconds() -> float:
  """CPU time (user + system) of the finished child processes so far."""
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def timed(*args: str, cache: str) -> tuple[float, float, str]:
  """(wall seconds, CPU seconds, stderr) of `python -m train.generate ARGS`, TAPETE_CACHE=cache.

  On a busy machine the wall time grows with the load; the CPU time much less."""
  env = {**os.environ, "TAPETE_CACHE": cache}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # It would take the place of TAPETE_CACHE's.
  start, cpu = time.perf_counter(), cpu_seconds()
  done = subprocess.run([sys.executable, "-m", "train.generate", *args], check=True, env=env,
                        text=True,
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  return time.perf_counter() - start, cpu_seconds() - cpu, done.stderr


def train(workdir: str, tiny: bool):
  config = "experiments/quickstart.py" + (":tiny" if tiny else "")
  subprocess.run([sys.executable, "-m", "train", f"--config={config}", f"--workdir={workdir}"],
                 check=True, stdout=subprocess.DEVNULL)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", help="a trained quickstart workdir (default: train one)")
  parser.add_argument("--tiny", action="store_true", help="the tiny variant, 20 inputs")
  args = parser.parse_args()
  count = 20 if args.tiny else 1000
  print(f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}")
  with tempfile.TemporaryDirectory() as scratch:
    workdir = args.workdir or os.path.join(scratch, "quickstart")
    if not args.workdir:
      train(workdir, args.tiny)
    cache = os.path.join(scratch, "cache")
    one = (f"--workdir={workdir}", "--input=2026")
    cold, cold_cpu, _ = timed(*one, cache=cache)
    warm = [timed(*one, cache=cache) for _ in range(3)]
    print(f"one input, cold compilation cache: {cold:.2f} s wall, {cold_cpu:.2f} s CPU")
    print(f"one input, warm compilation cache: {statistics.median(w[0] for w in warm):.2f} s "
          f"wall, {statistics.median(w[1] for w in warm):.2f} s CPU (medians of 3)")
    inputs = os.path.join(scratch, "inputs.txt")
    rng = random.Random(0)
    with open(inputs, "w") as f:
      f.write("".join(f"{rng.randrange(10**6)}\n" for _ in range(count)))
    outputs = os.path.join(scratch, "answers.jsonl")
    seconds, cpu, stderr = timed(f"--workdir={workdir}", f"--input_file={inputs}",
                                 f"--output_file={outputs}", "--batch_size=64", cache=cache)
    with open(outputs) as f:
      answered = sum(1 for _ in f)
    assert answered == count, f"{answered} answers to {count} inputs"
    print(f"{count:,} inputs, batches of 64: {seconds:.2f} s wall, {cpu:.2f} s CPU; "
          f"train.generate says: {stderr.strip().splitlines()[-1]}")


if __name__ == "__main__":
  main()
