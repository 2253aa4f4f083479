"""Pretrained + fine-tuned vs pretrained + LoRA vs from scratch: MiniLM on Shakespeare's genres.

  python -m benchmarks.finetune_classify [--steps=150] [--batch_size=16] [--seq_len=48]

The three arms of experiments/finetune_classify.py ('', ':lora', ':scratch') on the same data
and budget (steps x batch x tokens; each arm the peak learning rate usual for its kind, higher
than the experiment's since the budget is a tenth of an epoch), trained through the
CLI in fresh workdirs; accuracy on the test split (three plays no arm trained on: As You Like
It, Richard II, Othello) at the end, against always answering its most frequent genre. Wall time
per arm includes start-up, compile and the eval; the dataset is prepared once beforehand.
"""

import argparse
import collections
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

from train import assets
from train.data import local

# (name, variant, peak learning rate for this short budget: the experiment's are for 600 steps)
ARMS = (("pretrained + fine-tuned", "", 2e-4), ("pretrained + LoRA", ":lora", 3e-3),
        ("from scratch", ":scratch", 1e-3))


def run(variant: str, learning_rate: float, data_dir: str, steps: int, batch_size: int,
        seq_len: int) -> dict:
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "train", f"--config=experiments/finetune_classify.py{variant}",
         f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
         "--config.data.eval_split=test", f"--config.train.num_steps={steps}",
         f"--config.train.batch_size={batch_size}", f"--config.data.seq_len={seq_len}",
         f"--config.optim.learning_rate={learning_rate}", f"--config.optim.warmup_steps={steps // 10}",
         f"--config.train.log_every={steps}", f"--config.train.eval_every={steps}",
         f"--config.train.checkpoint_every={steps}"],
        check=True, capture_output=True, text=True).stdout
    seconds = time.perf_counter() - start
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  trained = re.search(r"([\d.]+)M parameters(?: \(([\d,]+) trained\))?", out)
  timed = [line for line in lines if line["split"] == "train"]
  return {"seconds": seconds, "eval": [line for line in lines if line["split"] == "eval"][-1],
          "params": float(trained.group(1)) * 1e6,
          "trained": int(trained.group(2).replace(",", "")) if trained.group(2) else None,
          "step_seconds": timed[-1].get("step_seconds", timed[-1].get("step_seconds_with_compile"))}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--seq_len", type=int, default=48)
  args = parser.parse_args()
  folder = assets.folder("shakespeare_genres")
  labels = [line.split("\t", 1)[0] for line in
            (pathlib.Path(folder) / "test.tsv").read_text(encoding="utf-8").splitlines()]
  genre, count = collections.Counter(labels).most_common(1)[0]
  with tempfile.TemporaryDirectory() as data_dir:
    local.prepare(folder, task="classification", data_dir=data_dir)
    print(f"{os.cpu_count()} CPU cores; Shakespeare genres: {args.steps} steps of "
          f"{args.batch_size} speeches ({args.seq_len} tokens) each arm; test: {len(labels)} "
          "speeches of 3 held-out plays")
    print(f"  {'always ' + genre:<26} accuracy {count / len(labels):.3f}")
    for name, variant, learning_rate in ARMS:
      r = run(variant, learning_rate, data_dir, args.steps, args.batch_size, args.seq_len)
      trained = r["trained"] or r["params"]
      print(f"  {name:<26} accuracy {r['eval']['accuracy']:.3f}  loss {r['eval']['loss']:.3f}  "
            f"{r['seconds']:6.1f} s wall ({r['step_seconds']:.2f} s/step), "
            f"{trained / 1e6:.2f}M of {r['params'] / 1e6:.2f}M parameters trained", flush=True)


if __name__ == "__main__":
  main()
