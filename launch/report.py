"""A sweep's results: python -m launch.report DIR [--metric=loss] [--split=eval] [--out=PNG]

Prints one row per run of DIR (the runs of DIR/sweep.json, else every folder of DIR with a
metrics.jsonl): its overrides, status (finished / step S of N / not started), the final
train loss, and the final and best value of the chosen metric, best run first. Writes a
plot of every run's curves (train loss and the metric, against the step) to DIR/report.png.

The metric defaults to the eval loss (the train loss when no run has evaluated yet); higher
is better for accuracy, exact_match and bleu, lower for the rest (or say --mode=max).
"""

import argparse
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from launch import workdirs  # noqa: E402
from models.errors import InputError, named_path  # noqa: E402
from train.engine.records import read_metrics  # noqa: E402
from train.run import cli  # noqa: E402

HIGHER_IS_BETTER = ("accuracy", "exact_match", "bleu")


def load_runs(root: str) -> list[dict]:
  """[{name, overrides, records, status}] of the sweep in `root`."""
  manifest_path = os.path.join(root, "sweep.json")
  if os.path.exists(manifest_path):
    listed = read_manifest(manifest_path)
  elif os.path.isdir(root):
    listed = [(name, None) for name in sorted(os.listdir(root))
              if os.path.exists(os.path.join(root, name, "metrics.jsonl"))]
  else:
    raise InputError(f"{root} does not exist: pass the --workdir_root of a sweep.")
  if not listed:
    raise InputError(f"{root} holds no sweep.json and no run folder with a metrics.jsonl: pass "
                     "the --workdir_root of a sweep, once its runs have started.")
  return [{"name": name, "overrides": overrides if overrides is not None else parse_name(name),
           "records": read_metrics(os.path.join(root, name)),
           "status": run_status(os.path.join(root, name))} for name, overrides in listed]


def read_manifest(path: str) -> list[tuple[str, dict]]:
  """(name, overrides) of each run a sweep.json lists; a file that is not one is an error."""
  try:
    with open(path, encoding="utf-8") as f:
      runs = json.load(f)["runs"]
    return [(run["name"], run["overrides"]) for run in runs]
  except ValueError as e:  # not JSON, or not even text
    problem = f"it is not JSON: {e}"
  except (KeyError, TypeError):
    problem = 'it holds no "runs" list of {"name", "overrides"}'
  raise InputError(f"{path} is not a sweep's manifest ({problem}). Move it away: the report then "
                   "lists every run folder beside it, and the next launch.sweep writes it anew.")


def parse_name(name: str) -> dict:
  """The overrides spelled by a run's folder name (`a.b=1,c=x`); {"run": name} otherwise."""
  parts = [part.partition("=") for part in name.split(",")]
  if all(sep for _, sep, _ in parts):
    return {key: value for key, _, value in parts}
  return {"run": name}


def run_status(workdir: str) -> str:
  if not os.path.isdir(workdir):
    return "not started"
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      num_steps = json.load(f)["train"]["num_steps"]
  except (OSError, KeyError, ValueError):
    return "starting"
  state, step = workdirs.status(workdir, num_steps)
  return "finished" if state == "finished" else f"step {step or 0} of {num_steps}"


def curve(records: list[dict], split: str, metric: str) -> list[tuple[int, float]]:
  return [(r["step"], r[metric]) for r in records
          if r.get("split") == split and isinstance(r.get(metric), (int, float))]


def summarize(runs: list[dict], split: str, metric: str, higher_is_better: bool) -> list[dict]:
  """Rows with final/best values, best run first (runs without the metric last)."""
  rows = []
  for run in runs:
    points = curve(run["records"], split, metric)
    train = curve(run["records"], "train", "loss")
    best = (max if higher_is_better else min)(points, key=lambda p: p[1]) if points else None
    rows.append({**run, "final_train_loss": train[-1][1] if train else None,
                 "step": max((r["step"] for r in run["records"]), default=None),
                 "final": points[-1][1] if points else None, "best": best})
  sign = -1 if higher_is_better else 1
  return sorted(rows, key=lambda r: (r["best"] is None,
                                     sign * r["best"][1] if r["best"] else 0))


def _number(value) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  return f"{value:.4g}"


def table(rows: list[dict], split: str, metric: str) -> str:
  keys = list(dict.fromkeys(key for row in rows for key in row["overrides"]))
  header = keys + ["status", "step", "train loss", f"{split} {metric}", f"best {split} {metric}"]
  body = [[workdirs.format_value(row["overrides"].get(key, "")) for key in keys]
          + [row["status"], _number(row["step"]), _number(row["final_train_loss"]),
             _number(row["final"]),
             f"{_number(row['best'][1])} @ {row['best'][0]}" if row["best"] else "-"]
          for row in rows]
  widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
  lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
           for line in [header] + body]
  return "\n".join(lines[:1] + ["  ".join("-" * width for width in widths)] + lines[1:])


def plot(rows: list[dict], split: str, metric: str, out: str) -> None:
  panels = [("train", "loss")] + ([(split, metric)] if (split, metric) != ("train", "loss") else [])
  height = 4 + 0.2 * len(rows)  # room for the legend below
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), height), squeeze=False)
  for ax, (panel_split, panel_metric) in zip(axes[0], panels):
    for row in rows:
      points = curve(row["records"], panel_split, panel_metric)
      if points:
        ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=row["name"])
    ax.set_xlabel("step")
    ax.set_title(f"{panel_split} {panel_metric}")
    ax.grid(alpha=0.3)
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", fontsize="small", frameon=False)
  fig.tight_layout(rect=(0, 0.2 * (len(labels) + 1) / height, 1, 1))
  fig.savefig(out, dpi=100)
  plt.close(fig)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m launch.report", description=__doc__.split(
      "\n")[0])
  parser.add_argument("root", metavar="DIR", help="the sweep's --workdir_root")
  parser.add_argument("--metric", default="loss")
  parser.add_argument("--split", default="", help="eval (default when evaluated) or train")
  parser.add_argument("--mode", choices=("min", "max"), default=None)
  parser.add_argument("--out", default="", help="the plot; default DIR/report.png")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  cli.guarded(report)(args)
  return 0


def report(args: argparse.Namespace) -> None:
  """Prints the table of the sweep in args.root and writes the plot."""
  runs = load_runs(args.root)
  split = args.split or ("eval" if any(r.get("split") == "eval" for run in runs
                                       for r in run["records"]) else "train")
  mode = args.mode or ("max" if args.metric in HIGHER_IS_BETTER else "min")
  rows = summarize(runs, split, args.metric, mode == "max")
  print(table(rows, split, args.metric))
  out = args.out or os.path.join(args.root, "report.png")
  with named_path(f"--out={out}"):
    plot(rows, split, args.metric, out)
  print(f"Curves: {out}")


if __name__ == "__main__":
  sys.exit(main())
