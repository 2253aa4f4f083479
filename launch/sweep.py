"""Run an experiment's sweep: python -m launch.sweep --config=experiments/NAME.py[:VARIANT]
--workdir_root=DIR [--runner=local|slurm|tpu] [--dry_run] [runner flags]

The experiment file's `get_sweep()` lists the runs' config overrides (launch/sweeps.py has
helpers). Each run trains in DIR/NAME, NAME written from its overrides
(`model.d_model=64,optim.learning_rate=0.003`). Finished runs (a checkpoint at
train.num_steps) are skipped, unfinished ones resumed from their latest checkpoint: run the
same command again after a crash, a preemption or a time limit. On SLURM, runs whose job is
still queued or running (squeue, by job name) are not submitted again. DIR/sweep.json lists
the runs for `python -m launch.report DIR`. --dry_run prints what would run and starts nothing.

Runner flags:
  local: --gpus=N (0: CPU or every GPU for each run) --gpus_per_run=K (N/K runs at a time)
         --processes_per_run=P (P processes per run, joined by jax.distributed on localhost,
         coordinator port --coordinator_port + slot)
  slurm: --nodes --gpus_per_node (default 0: no GPUs asked for) --processes=per_gpu|per_node
         (with GPUs) --processes_per_node=N (without) --time --partition
         --sbatch_arg=--account=abc (repeatable) --repo_dir (default: here)
  tpu:   --tpu_name --zone [--project] --repo_dir (default: ~/tapete on the workers)
  all:   --python (default: this interpreter; python3 on TPU workers)
"""

import argparse
import json
import os
import sys

from etils import epath

from launch import experiment, runners, workdirs
from models.errors import InputError
from train.run import cli

USAGE = ("usage: python -m launch.sweep --config=experiments/NAME.py[:VARIANT] "
         "--workdir_root=DIR [--runner=local|slurm|tpu] [--dry_run] [runner flags]")
RUNNER_FLAGS = {
    "local": ("gpus", "gpus_per_run", "processes_per_run", "coordinator_port"),
    "slurm": ("nodes", "gpus_per_node", "processes", "processes_per_node", "time", "partition",
              "sbatch_arg", "repo_dir"),
    "tpu": ("tpu_name", "zone", "project", "repo_dir"),
}
MANIFEST = "sweep.json"


class _Parser(argparse.ArgumentParser):
  """argparse whose errors are InputErrors, so that main prints one line."""

  def error(self, message):
    raise InputError(message)


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = _Parser(prog="python -m launch.sweep", usage=USAGE[len("usage: "):], allow_abbrev=False,
              description=__doc__.split("\n\n", 1)[1],
              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True)
  p.add_argument("--workdir_root", required=True)
  p.add_argument("--runner", choices=sorted(RUNNER_FLAGS), default="local")
  p.add_argument("--dry_run", action="store_true")
  p.add_argument("--python")
  for name in ("gpus", "gpus_per_run", "processes_per_run", "coordinator_port", "nodes",
               "gpus_per_node", "processes_per_node"):
    p.add_argument(f"--{name}", type=int)
  p.add_argument("--processes", choices=("per_gpu", "per_node"))
  for name in ("time", "partition", "repo_dir", "tpu_name", "zone", "project"):
    p.add_argument(f"--{name}")
  p.add_argument("--sbatch_arg", action="append")
  args = p.parse_args(argv)
  misplaced = [f"--{name}" for runner, names in RUNNER_FLAGS.items() if runner != args.runner
               for name in names
               if name not in RUNNER_FLAGS[args.runner] and getattr(args, name) is not None]
  if misplaced:
    raise InputError(f"{', '.join(sorted(set(misplaced)))} do(es) not apply to "
                     f"--runner={args.runner}.")
  return args


def make_runner(args: argparse.Namespace):
  given = {name: getattr(args, name) for name in RUNNER_FLAGS[args.runner]
           if getattr(args, name) is not None}
  if args.python:
    given["python"] = args.python
  if args.runner == "local":
    return runners.Local(args.config, **given)
  if args.runner == "slurm":
    given["sbatch_args"] = tuple(given.pop("sbatch_arg", ()))
    return runners.Slurm(args.config, **given)
  return runners.Tpu(args.config, **given)


def check_manifest(root: str, config_arg: str) -> dict:
  """The runs already recorded in DIR/sweep.json; another experiment's sweep is an error."""
  path = epath.Path(root) / MANIFEST
  if not path.exists():
    return {}
  try:
    manifest = json.loads(path.read_text())
    problem = "" if isinstance(manifest, dict) else f"it holds a {type(manifest).__name__}"
  except ValueError as e:  # not JSON, or not even text
    problem = f"it is not JSON: {e}"
  if problem:
    raise InputError(f"{path} is not a sweep's manifest ({problem}). Move it away, and the sweep "
                     "writes it anew.")
  if manifest.get("config") != config_arg:
    raise InputError(f"{root} holds the sweep of --config={manifest.get('config')}; use "
                     f"another --workdir_root for --config={config_arg}.")
  return manifest


def read_workdirs(root: str, config_arg: str, runs: list) -> tuple[dict, list]:
  """DIR/sweep.json and every run's status; an unreadable root is an error."""
  try:
    return check_manifest(root, config_arg), [workdirs.status(run.workdir, run.num_steps)
                                              for run in runs]
  except (ImportError, OSError) as e:
    raise InputError(f"cannot read --workdir_root={root} ({e}); launch reads the workdirs "
                     "to skip finished runs (for gs:// install gcsfs).") from None


def write_manifest(root: str, config_arg: str, runs: list, manifest: dict) -> None:
  recorded = {run["name"]: run for run in manifest.get("runs", [])}
  recorded.update({run.name: {"name": run.name, "overrides": run.overrides} for run in runs})
  path = epath.Path(root) / MANIFEST
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({"config": config_arg, "runs": list(recorded.values())},
                             indent=2, default=repr) + "\n")


def find_queued(runner, runs: list, dry_run: bool) -> dict[str, str]:
  """The runs already in SLURM's queue; a dry run goes on without them when squeue fails."""
  if not isinstance(runner, runners.Slurm):
    return {}
  try:
    return runner.queued(runs)
  except ValueError as e:
    if not dry_run:
      raise
    print(f"warning: {e}", file=sys.stderr)
    return {}


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    args = parse_args(argv)
    runs = experiment.expand(args.config, args.workdir_root)
    runner = make_runner(args)
    runner.check(runs, dry_run=args.dry_run)
    # Asked before the workdirs are read: a job that ends in between is then seen finished.
    queued = find_queued(runner, runs, args.dry_run)
    manifest, statuses = read_workdirs(args.workdir_root, args.config, runs)
  except cli.EXPECTED as e:
    cli.fail(e, USAGE)
  todo, counts, lines = [], {"finished": 0, "resume": 0, "start": 0, "queued": 0}, []
  for run, (state, step) in zip(runs, statuses):
    if run.name in queued and state != "finished":
      state = "queued"
    counts[state] += 1
    if state == "queued":
      detail = f"{queued[run.name]}: not submitted again"
    elif state == "start":
      detail = f"{run.num_steps} steps"
    elif state == "finished":
      detail = f"checkpoint at step {step} >= {run.num_steps}"
    elif step < run.num_steps:
      detail = f"from step {step} of {run.num_steps}"
    else:
      detail = f"its eval at step {step} is not recorded"
    lines.append(f"  {state:8s}  {run.name}  ({detail})")
    if state in ("resume", "start"):
      todo.append(run)
  waiting = f", {counts['queued']} already queued or running" if counts["queued"] else ""
  print(f"Sweep of {args.config}: {len(runs)} runs in {args.workdir_root} ({counts['finished']} "
        f"finished, {counts['resume']} to resume, {counts['start']} to start{waiting}).")
  print("\n".join(lines))
  if not todo:
    report = f"python -m launch.report {args.workdir_root}"
    print(f"Nothing to submit: rerun the sweep once the queued jobs have ended (squeue --me). "
          f"Results so far: {report}" if waiting else f"Nothing to run. Results: {report}")
    return 0
  if args.dry_run:
    print(f"Would run ({args.runner}):\n" + "\n".join(runner.plan(todo)))
    return 0
  write_manifest(args.workdir_root, args.config, runs, manifest)
  failed = runner.launch(todo)
  if failed:
    print(f"{len(failed)} run(s) {runner.FAILED}: {', '.join(failed)}. {runner.ADVICE}",
          file=sys.stderr)
    return 1
  print(f"Results: python -m launch.report {args.workdir_root}")
  return 0


class DropWhenClosed:
  """A text stream that, once its reader has gone (`| head`), sends the rest to /dev/null:
  output into a closed pipe must not stop the runs being started or submitted."""

  def __init__(self, stream):
    self._stream = stream

  def write(self, text: str) -> int:
    try:
      return self._stream.write(text)
    except BrokenPipeError:
      self._to_devnull()
      return len(text)

  def flush(self) -> None:
    try:
      self._stream.flush()
    except BrokenPipeError:
      self._to_devnull()

  def _to_devnull(self) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, self._stream.fileno())
    os.close(devnull)

  def __getattr__(self, name):
    return getattr(self._stream, name)


if __name__ == "__main__":
  sys.stdout, sys.stderr = DropWhenClosed(sys.stdout), DropWhenClosed(sys.stderr)
  sys.exit(main())
