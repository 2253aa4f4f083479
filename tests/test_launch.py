"""launch/: sweep helpers, workdir names, skip and resume, the runners' commands and scripts,
bad arguments, the report, and a real two-process training joined by jax.distributed.

References we did not write: itertools.product and zip for the sweep helpers; ml_collections'
config flags (what `python -m train` parses) reading back the generated overrides; bash
parsing the sbatch scripts and running them with a fake srun on PATH, their #SBATCH options
read as sbatch reads them; shlex for the TPU command; matplotlib's PNG reader. Multi-host:
two processes (4 CPU devices each, gloo collectives) must train like one process over 8
devices that is fed the global batch the two hosts form (host 0's rows, then host 1's).
"""

import dataclasses
import itertools
import json
import os
import pathlib
import re
import shlex
import socket
import subprocess
import sys
import textwrap
import threading

from absl import flags
import jax
import matplotlib.image
import numpy as np
import pytest
from ml_collections import config_flags

from conftest import OLDER_EMITTERS
from launch import experiment, report, runners, sweep, sweeps, workdirs
from train.data import pipeline as pipeline_lib
from train.engine import loop, records
from train.run import inputs as inputs_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = "experiments/quickstart.py:tiny"
# The quickstart sweep's runs, in get_sweep()'s order (learning rate slowest).
NAMES = ["model.d_ff=128,model.d_model=32,optim.learning_rate=0.001",
         "model.d_ff=256,model.d_model=64,optim.learning_rate=0.001",
         "model.d_ff=128,model.d_model=32,optim.learning_rate=0.003",
         "model.d_ff=256,model.d_model=64,optim.learning_rate=0.003"]
TINY_STEPS = 6


@pytest.fixture
def in_repo(monkeypatch):
  """The working directory of a user typing the documented commands."""
  monkeypatch.chdir(ROOT)


def run_sweep(capsys, *args) -> tuple[int, str, str]:
  try:
    code = sweep.main(list(args))
  except SystemExit as e:  # bad input: train/run/cli.py's one error path
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


def expected_command(root, name, python=sys.executable, config=TINY) -> list[str]:
  """The train CLI line of a quickstart sweep run, spelled out from its name."""
  overrides = [f"--config.{part}" for part in name.split(",")]
  return [python, "-m", "train", f"--config={config}", f"--workdir={root}/{name}", *overrides]


def fake_checkpoint(workdir: pathlib.Path, step: int, complete: bool = True,
                    evaluated: bool = True):
  """A checkpoint folder at `step`, and metrics.jsonl's eval record at that step."""
  folder = workdir / "checkpoints" / (str(step) if complete else f"{step}.orbax-checkpoint-tmp-1")
  (folder / "state").mkdir(parents=True)
  if evaluated:
    with open(workdir / "metrics.jsonl", "a") as f:
      f.write(json.dumps({"step": step, "split": "eval", "loss": 1.0}) + "\n")


# ------------------------------------------------------------------------------------------
# Sweep helpers and names.


def test_product_and_zip_follow_itertools():
  lr = sweeps.axis("optim.learning_rate", [1e-3, 3e-3, 1e-2])
  width = sweeps.axis("model.d_model", [32, 64])
  d_ff = sweeps.axis("model.d_ff", [128, 256])
  assert sweeps.product(lr, width) == [{**a, **b} for a, b in itertools.product(lr, width)]
  assert sweeps.zip(width, d_ff) == [{**a, **b} for a, b in zip(width, d_ff)]
  nested = sweeps.product(lr, sweeps.zip(width, d_ff))
  assert len(nested) == 6 and nested[1] == {"optim.learning_rate": 1e-3, "model.d_model": 64,
                                            "model.d_ff": 256}
  with pytest.raises(ValueError, match="equal length"):
    sweeps.zip(lr, width)
  with pytest.raises(ValueError, match="same key"):
    sweeps.product(width, width)
  with pytest.raises(ValueError, match="non-empty list"):
    sweeps.axis("model.d_model", [])


def test_random_search_is_seeded_and_follows_its_distributions():
  space = {"optim.learning_rate": sweeps.log_uniform(1e-4, 1e-2),
           "optim.b2": sweeps.uniform(0.9, 0.99), "model.d_model": [32, 64, 128]}
  runs = sweeps.random_search(space, num_runs=400, seed=0)
  assert runs == sweeps.random_search(space, num_runs=400, seed=0)
  assert runs != sweeps.random_search(space, num_runs=400, seed=1)
  lrs = np.array([run["optim.learning_rate"] for run in runs])
  b2s = np.array([run["optim.b2"] for run in runs])
  assert lrs.min() >= 1e-4 and lrs.max() <= 1e-2 and b2s.min() >= 0.9 and b2s.max() <= 0.99
  # Log-uniform: each decade holds half the draws; uniform: each half of the range does.
  assert 0.4 < np.mean(lrs < 1e-3) < 0.6 and 0.4 < np.mean(b2s < 0.945) < 0.6
  assert {run["model.d_model"] for run in runs} == {32, 64, 128}
  assert all(float(f"{lr:.3g}") == lr for lr in lrs)  # rounded: readable names
  with pytest.raises(ValueError, match="log_uniform"):
    sweeps.log_uniform(0, 1)


def test_run_names_are_stable_safe_and_distinct():
  name = workdirs.run_name({"optim.learning_rate": 0.003, "model.d_model": 64})
  assert name == "model.d_model=64,optim.learning_rate=0.003"
  assert workdirs.run_name({"model.d_model": 64, "optim.learning_rate": 0.003}) == name
  assert workdirs.run_name({}) == "default"
  odd = [workdirs.run_name({"data.source": source})
         for source in ("local:/a b/c", "local:/a_b/c", "local__a_b_c")]
  assert len(set(odd)) == 3
  long = workdirs.run_name({f"model.key_{i}": "x" * 30 for i in range(10)})
  for name in odd + [long]:
    assert re.fullmatch(r"[A-Za-z0-9._+=,-]+", name) and len(name) <= workdirs.MAX_NAME + 9
  assert odd[0].startswith("data.source=local__a_b_c-")


def test_override_flags_parse_back_to_the_same_config(tmp_path):
  """The generated --config.KEY=VALUE flags, read by ml_collections as `python -m train` does."""
  path = str(ROOT / "experiments" / "quickstart.py")
  overrides = {"optim.learning_rate": 1e-4, "model.d_model": 48, "data.pack": True,
               "data.source_options.language": "en", "label_smoothing": 0.1}
  base = experiment.get_config(experiment.load_module(path), "tiny")
  config = experiment.apply_overrides(base, overrides, path)
  run = experiment.Run("r", overrides, str(tmp_path / "r"), config)
  argv = runners.train_command("python", f"{path}:tiny", run)
  assert argv[:3] == ["python", "-m", "train"]
  flag_values = flags.FlagValues()
  parsed = config_flags.DEFINE_config_file("config", flag_values=flag_values,
                                           sys_argv=["train", *argv[3:]])
  flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
  flag_values(["train", *argv[3:]])
  assert flag_values.workdir == run.workdir
  assert parsed.value.to_dict() == config.to_dict()
  assert config.model.d_model == 48 and config.data.pack is True


def test_a_composed_variant_reaches_every_run_and_its_command_unchanged(tmp_path):
  config_arg = f"{ROOT / 'experiments' / 'quickstart.py'}:tiny,billions"
  runs = experiment.expand(config_arg, str(tmp_path))
  assert len(runs) == len(NAMES)
  for run in runs:
    assert run.config.data.source_options.max_number == 10**9  # billions
    assert run.config.train.num_steps == TINY_STEPS             # tiny, applied last
  argv = runners.train_command("python", config_arg, runs[0])
  assert f"--config={config_arg}" in argv
  flag_values = flags.FlagValues()
  parsed = config_flags.DEFINE_config_file("config", flag_values=flag_values,
                                           sys_argv=["train", *argv[3:]])
  flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
  flag_values(["train", *argv[3:]])
  assert parsed.value.to_dict() == runs[0].config.to_dict()


# ------------------------------------------------------------------------------------------
# Expansion, skip and resume, the local runner.


def test_dry_run_skips_finished_runs_and_resumes_unfinished(tmp_path, capsys, in_repo):
  root = tmp_path / "sweep"
  fake_checkpoint(root / NAMES[0], TINY_STEPS)           # finished
  fake_checkpoint(root / NAMES[1], 3)                    # stopped at step 3
  fake_checkpoint(root / NAMES[2], 3, complete=False)    # killed while saving step 3
  fake_checkpoint(root / NAMES[3], TINY_STEPS, evaluated=False)  # killed in its final eval
  code, out, err = run_sweep(capsys, f"--config={TINY}", f"--workdir_root={root}", "--dry_run")
  assert code == 0, err
  assert f"4 runs in {root} (1 finished, 2 to resume, 1 to start)" in out
  assert f"finished  {NAMES[0]}  (checkpoint at step 6 >= 6)" in out
  assert f"resume    {NAMES[1]}  (from step 3 of 6)" in out
  assert f"start     {NAMES[2]}  (6 steps)" in out
  assert f"resume    {NAMES[3]}  (its eval at step 6 is not recorded)" in out
  would_run = out.split("Would run (local):\n")[1].splitlines()
  assert would_run == [shlex.join(expected_command(root, name)) for name in NAMES[1:]]
  assert not (root / "sweep.json").exists()


FAKE_TRAIN = textwrap.dedent("""\
    import json, os, sys, time
    # Stands in for `python -m train`: records its arguments and GPUs, waits (up to 20 s) until
    # another fake has started, so that runs said to go side by side must really do so.
    shared = os.environ["FAKE_TRAIN_DIR"]
    workdir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir="))
    open(os.path.join(shared, str(os.getpid())), "w").close()
    deadline = time.time() + 20
    while len(os.listdir(shared)) < 2 and time.time() < deadline:
      time.sleep(0.02)
    with open(os.path.join(workdir, "fake.json"), "w") as f:
      json.dump({"argv": sys.argv[1:], "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),
                 "others_started": len(os.listdir(shared)) >= 2}, f)
    sys.exit(3 if "learning_rate=0.003" in workdir and "d_model=64" in workdir else 0)
""")


def make_fake_python(tmp_path) -> str:
  fake = tmp_path / "fake_python"
  fake.write_text(f"#!{sys.executable}\n{FAKE_TRAIN}")
  fake.chmod(0o755)
  return str(fake)


def test_local_runner_runs_the_unfinished_runs_side_by_side(tmp_path, capsys, monkeypatch,
                                                             in_repo):
  root = tmp_path / "sweep"
  fake_checkpoint(root / NAMES[0], TINY_STEPS)
  (tmp_path / "started").mkdir()
  monkeypatch.setenv("FAKE_TRAIN_DIR", str(tmp_path / "started"))
  python = make_fake_python(tmp_path)
  code, out, err = run_sweep(capsys, f"--config={TINY}", f"--workdir_root={root}", "--gpus=4",
                             "--gpus_per_run=2", f"--python={python}")
  assert code == 1 and f"1 run(s) failed: {NAMES[3]}" in err
  assert f"FAILED (exit 3): {NAMES[3]}" in out and f"done: {NAMES[1]}" in out
  assert not (root / NAMES[0] / "fake.json").exists()  # finished: skipped
  records = {name: json.loads((root / name / "fake.json").read_text()) for name in NAMES[1:]}
  # Two slots of 2 GPUs; the runs left go to them in turn: slot 0 gets runs 1 and 3.
  assert {name: r["gpus"] for name, r in records.items()} == {
      NAMES[1]: "0,1", NAMES[2]: "2,3", NAMES[3]: "0,1"}
  for name, record in records.items():
    assert record["argv"] == expected_command(root, name)[1:]
  assert records[NAMES[1]]["others_started"] and records[NAMES[2]]["others_started"]
  assert (root / NAMES[1] / "train.log").exists()  # side by side: logs go to files
  manifest = json.loads((root / "sweep.json").read_text())
  assert manifest["config"] == TINY
  assert [run["name"] for run in manifest["runs"]] == NAMES
  assert manifest["runs"][1]["overrides"] == {"optim.learning_rate": 0.001,
                                              "model.d_model": 64, "model.d_ff": 256}


# ------------------------------------------------------------------------------------------
# SLURM and TPU.


FAKE_SRUN = textwrap.dedent("""\
    import json, os, sys
    # Stands in for SLURM's srun: records its arguments, working directory and environment.
    with open(os.environ["FAKE_SRUN_LOG"], "a") as f:
      f.write(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(),
                          "env": {k: v for k, v in os.environ.items() if k.startswith("JAX")}})
              + "\\n")
""")


def sbatch_directives(script: str) -> list[str]:
  """The options sbatch reads: #SBATCH lines before the first command (as `man sbatch`)."""
  options = []
  for line in script.splitlines()[1:]:
    if line.strip() and not line.startswith("#"):
      break
    if line.startswith("#SBATCH "):
      options.append(line.removeprefix("#SBATCH "))
  return options


def execute_sbatch(path: pathlib.Path, bin_dir: pathlib.Path, log: pathlib.Path) -> dict:
  """Runs the script's body as a job would, with the fake srun; what srun was given."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX")}
  env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_SRUN_LOG=str(log))
  log.unlink(missing_ok=True)
  subprocess.run(["bash", str(path)], check=True, env=env, cwd="/")
  calls = [json.loads(line) for line in log.read_text().splitlines()]
  assert len(calls) == 1, calls
  return calls[0]


@pytest.mark.parametrize("processes, tasks_per_node, device_ids", [
    ("per_gpu", 4, None), ("per_node", 1, "0,1,2,3")])
def test_slurm_scripts(tmp_path, capsys, monkeypatch, in_repo, processes, tasks_per_node,
                       device_ids):
  root, repo = tmp_path / "sweep", tmp_path / "cluster" / "tapete"
  repo.mkdir(parents=True)
  flags_ = [f"--config={TINY}", f"--workdir_root={root}", "--runner=slurm", "--nodes=2",
            "--gpus_per_node=4", f"--processes={processes}", "--time=02:00:00",
            "--partition=gpu", "--sbatch_arg=--account=proj", f"--repo_dir={repo}",
            "--python=python"]
  code, out, err = run_sweep(capsys, *flags_, "--dry_run")
  assert code == 0, err
  planned = out.split("Would run (slurm):\n")[1].splitlines()
  assert not root.exists()
  # Submitted: the scripts are written to the workdirs and given to sbatch (a fake here).
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/sbatch.calls\n"
                                  "echo Submitted batch job 42\n")
  (bin_dir / "srun").write_text(f"#!{sys.executable}\n{FAKE_SRUN}")
  (bin_dir / "squeue").write_text("#!/bin/sh\n")  # nothing queued
  for program in ("sbatch", "srun", "squeue"):
    (bin_dir / program).chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
  code, out, err = run_sweep(capsys, *flags_)
  assert code == 0, err
  assert (tmp_path / "sbatch.calls").read_text().splitlines() == [
      f"{root}/{name}/slurm.sbatch" for name in NAMES]
  dry_run = []
  for name in NAMES:
    path = root / name / "slurm.sbatch"
    script = path.read_text()
    dry_run += [f"# {path}:", *script.rstrip("\n").splitlines(),
                f"sbatch {shlex.quote(str(path))}"]
    assert f"{name}: Submitted batch job 42" in out
    subprocess.run(["bash", "-n", str(path)], check=True)  # bash parses it
    assert script.startswith("#!/bin/bash\n")
    options = sbatch_directives(script)
    assert len(options) == script.count("#SBATCH ")  # none after the first command
    job_name = options[0].removeprefix("--job-name=")
    assert job_name.startswith("quickstart-") and job_name.endswith(f"-{name}")
    assert options[1:6] == ["--nodes=2", f"--ntasks-per-node={tasks_per_node}",
                            "--gpus-per-node=4", "--time=02:00:00", "--partition=gpu"]
    assert "--account=proj" in options and "--open-mode=append" in options
    output = next(o.removeprefix("--output=") for o in options if o.startswith("--output="))
    assert pathlib.Path(output).parent == root / name and "%j" in output
    # The job's body, with a fake srun: one srun of the run's training command, in the repo.
    call = execute_sbatch(path, bin_dir, tmp_path / "srun.json")
    assert call["argv"] == ["--kill-on-bad-exit=1", *expected_command(root, name, "python")]
    assert call["cwd"] == str(repo)
    assert call["env"].get("JAX_LOCAL_DEVICE_IDS") == device_ids
  assert planned == dry_run  # --dry_run showed exactly what was submitted


def test_slurm_one_process_per_node(tmp_path, capsys, in_repo):
  code, out, _ = run_sweep(capsys, f"--config={TINY}", f"--workdir_root={tmp_path}",
                           "--runner=slurm", "--nodes=2", "--gpus_per_node=8",
                           "--processes=per_node", "--dry_run")
  assert code == 0
  script = out.split("Would run (slurm):\n")[1]
  assert "#SBATCH --ntasks-per-node=1\n#SBATCH --gpus-per-node=8\n" in script
  assert "\nexport JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7\nsrun " in script
  assert "#SBATCH --time" not in script and "#SBATCH --partition" not in script
  assert f"\ncd {ROOT}\n" in script


@pytest.mark.parametrize("flags_, tasks_per_node", [([], 1), (["--gpus_per_node=0"], 1),
                                                    (["--processes_per_node=2"], 2)])
def test_slurm_cpu_only_nodes_ask_for_no_gpus(tmp_path, capsys, in_repo, flags_,
                                              tasks_per_node):
  code, out, err = run_sweep(capsys, f"--config={TINY}", f"--workdir_root={tmp_path}",
                             "--runner=slurm", "--nodes=2", *flags_, "--dry_run")
  assert code == 0, err
  scripts = out.split("Would run (slurm):\n")[1].split("\nsbatch ")
  for name, script in zip(NAMES, scripts):
    options = sbatch_directives(script.split(":\n", 1)[1])
    assert options[1:3] == ["--nodes=2", f"--ntasks-per-node={tasks_per_node}"]
    assert not [o for o in options if "gpu" in o or "gres" in o], options
    assert "JAX_LOCAL_DEVICE_IDS" not in script and "CUDA" not in script


def job_names(out: str) -> dict[str, str]:
  """{run name: job name} from a --dry_run's sbatch scripts."""
  scripts = out.split("Would run (slurm):\n")[1].split("\nsbatch ")
  return {name: sbatch_directives(script.split(":\n", 1)[1])[0].removeprefix("--job-name=")
          for name, script in zip(NAMES, scripts)}


def test_slurm_does_not_submit_runs_already_queued(tmp_path, capsys, monkeypatch, in_repo):
  root, bin_dir = tmp_path / "sweep", tmp_path / "bin"
  bin_dir.mkdir()
  queue = tmp_path / "squeue.out"  # what the fake squeue prints
  (bin_dir / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/sbatch.calls\n"
                                  "echo Submitted batch job 42\n")
  (bin_dir / "squeue").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/squeue.calls\n"
                                  f"cat {queue}\n")
  for program in ("sbatch", "squeue"):
    (bin_dir / program).chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
  flags_ = [f"--config={TINY}", "--runner=slurm"]
  queue.write_text("")
  ours = job_names(run_sweep(capsys, *flags_, f"--workdir_root={root}", "--dry_run")[1])
  others = job_names(run_sweep(capsys, *flags_, f"--workdir_root={tmp_path}/other",
                               "--dry_run")[1])
  # Runs 0 and 1 of this sweep are in the queue, and run 2 of another sweep (another root).
  queue.write_text(f"7 PENDING {ours[NAMES[0]]}\n8 RUNNING {ours[NAMES[1]]}\n"
                   f"9 RUNNING {others[NAMES[2]]}\n")
  code, out, err = run_sweep(capsys, *flags_, f"--workdir_root={root}")
  assert code == 0, err
  assert "(0 finished, 0 to resume, 2 to start, 2 already queued or running)" in out
  assert f"queued    {NAMES[0]}  (job 7 pending: not submitted again)" in out
  assert f"queued    {NAMES[1]}  (job 8 running: not submitted again)" in out
  assert (tmp_path / "sbatch.calls").read_text().splitlines() == [
      f"{root}/{name}/slurm.sbatch" for name in NAMES[2:]]
  assert "--me" in (tmp_path / "squeue.calls").read_text().split()  # this user's jobs
  queue.write_text("".join(f"{i} PENDING {ours[name]}\n" for i, name in enumerate(NAMES)))
  code, out, err = run_sweep(capsys, *flags_, f"--workdir_root={root}")
  assert code == 0 and "Nothing to submit: rerun the sweep once the queued jobs have ended" in out
  assert len((tmp_path / "sbatch.calls").read_text().splitlines()) == 2
  (bin_dir / "squeue").write_text("#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact "
                                  "slurm controller' >&2\nexit 1\n")
  code, out, err = run_sweep(capsys, *flags_, f"--workdir_root={root}")
  assert code == 2 and out == "" and "Unable to contact slurm controller" in err
  assert len((tmp_path / "sbatch.calls").read_text().splitlines()) == 2


def fake_slurm(tmp_path, failing: str = "") -> pathlib.Path:
  """A bin folder with a fake squeue (nothing queued) and a fake sbatch that logs its calls to
  sbatch.calls and refuses the scripts whose path holds `failing` as sbatch does."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "squeue").write_text("#!/bin/sh\n")
  (bin_dir / "sbatch").write_text(textwrap.dedent(f"""\
      #!/bin/sh
      echo "$@" >> {tmp_path}/sbatch.calls
      case "$1" in *{failing or "NEVER"}*)
        echo "sbatch: error: Batch job submission failed: Invalid account or account/partition \\
      combination specified" >&2; exit 1 ;;
      esac
      echo Submitted batch job 42
      """))
  for program in ("sbatch", "squeue"):
    (bin_dir / program).chmod(0o755)
  return bin_dir


def test_slurm_sbatch_errors_say_what_to_fix(tmp_path, capsys, monkeypatch, in_repo):
  root = tmp_path / "sweep"
  monkeypatch.setenv("PATH", f"{fake_slurm(tmp_path, failing=NAMES[1])}:{os.environ['PATH']}")
  code, out, err = run_sweep(capsys, f"--config={TINY}", f"--workdir_root={root}",
                             "--runner=slurm")
  assert code == 1
  assert len((tmp_path / "sbatch.calls").read_text().splitlines()) == 4  # the others went in
  assert all(f"{name}: Submitted batch job 42" in out for name in NAMES if name != NAMES[1])
  script = shlex.quote(str(root / NAMES[1] / "slurm.sbatch"))
  assert err.splitlines() == [
      f"{NAMES[1]}: sbatch {script} failed: sbatch: error: Batch job submission failed: "
      "Invalid account or account/partition combination specified",
      f"1 run(s) were not submitted: {NAMES[1]}. Fix what sbatch said about each script "
      "(above), then rerun the same command."]


def test_a_closed_pipe_does_not_stop_the_submission(tmp_path, in_repo):
  """`python -m launch.sweep ... | head -1`, with the reader gone before the first line."""
  bin_dir = fake_slurm(tmp_path)
  read_end, write_end = os.pipe()
  os.close(read_end)
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
  result = subprocess.run([sys.executable, "-m", "launch.sweep", f"--config={TINY}",
                           f"--workdir_root={tmp_path / 'sweep'}", "--runner=slurm"],
                          stdout=write_end, stderr=subprocess.PIPE, text=True, env=env,
                          timeout=120)
  os.close(write_end)
  assert result.returncode == 0 and result.stderr == "", result.stderr
  assert (tmp_path / "sbatch.calls").read_text().splitlines() == [
      f"{tmp_path}/sweep/{name}/slurm.sbatch" for name in NAMES]


def test_tpu_commands(tmp_path, capsys, monkeypatch, in_repo):
  root = tmp_path / "sweep"
  fake_checkpoint(root / NAMES[0], TINY_STEPS)
  flags_ = [f"--config={TINY}", f"--workdir_root={root}", "--runner=tpu", "--tpu_name=pod",
            "--zone=us-central2-b", "--project=proj"]
  code, out, err = run_sweep(capsys, *flags_, "--dry_run")
  assert code == 0, err
  lines = out.split("Would run (tpu):\n")[1].splitlines()
  assert len(lines) == 3
  for name, line in zip(NAMES[1:], lines):
    argv = shlex.split(line)
    assert argv[:-1] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod",
                         "--zone=us-central2-b", "--project=proj", "--worker=all"]
    remote = argv[-1].removeprefix("--command=")
    assert shlex.split(remote) == ["cd", "tapete", "&&",
                                   *expected_command(root, name, python="python3")]
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(f"#!{sys.executable}\nimport json, sys\n"
                                  f"open({str(tmp_path / 'gcloud.calls')!r}, 'a').write("
                                  "json.dumps(sys.argv[1:]) + '\\n')\n")
  (bin_dir / "gcloud").chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
  code, out, err = run_sweep(capsys, *flags_)
  assert code == 0, err
  calls = [json.loads(line) for line in (tmp_path / "gcloud.calls").read_text().splitlines()]
  assert [["gcloud", *call] for call in calls] == [shlex.split(line) for line in lines]


# ------------------------------------------------------------------------------------------
# Bad arguments: one error line, nothing started.


def write_experiment(tmp_path, sweep_source: str) -> str:
  path = tmp_path / "experiment.py"
  path.write_text("from experiments import quickstart\n\n"
                  "def get_config():\n  return quickstart.get_config('tiny')\n\n"
                  f"def get_sweep():\n  return {sweep_source}\n")
  return str(path)


@pytest.mark.parametrize("args, message", [
    (["--runner=k8s"], "argument --runner: invalid choice: 'k8s'"),
    (["--gpus=4", "--gpus_per_run=3"], "--gpus=4 do not divide into runs of --gpus_per_run=3"),
    (["--gpus=4", "--gpus_per_run=2", "--processes_per_run=4"],
     "--gpus_per_run=2 GPUs do not divide among --processes_per_run=4"),
    (["--runner=slurm", "--nodes=1", "--gpus_per_node=3"],
     "train.batch_size=16 does not split over 3 processes"),
    (["--runner=slurm", "--gpus_per_node=4", "--processes_per_node=2"],
     "--processes_per_node is for nodes without GPUs; with --gpus_per_node=4 use"),
    (["--runner=slurm", "--processes=per_gpu"], "--processes=per_gpu needs --gpus_per_node"),
    (["--nodes=2"], r"--nodes do\(es\) not apply to --runner=local"),
    (["--runner=tpu", "--tpu_name=pod"], "--runner=tpu needs --zone"),
    (["--runner=slurm"], "--runner=slurm needs `sbatch`, which is not on PATH"),
    (["--config=experiments/gpt2_small.py"], r"experiments/gpt2_small.py has no get_sweep\(\)"),
    (["--config=experiments/nope.py"], "--config=experiments/nope.py: no such file"),
    (["SWEEP=[{'optim.learning_rat': 1e-3}]"],
     "'optim.learning_rat', which is not a key of .*: did you mean 'optim.learning_rate'"),
    (["SWEEP=[{'model.d_model': 'wide'}]"], "sets model.d_model='wide', but .* is a int"),
    (["SWEEP=[{'train.batch_size': 0}]"],
     "run train.batch_size=0: config.train.batch_size must be positive"),
    (["SWEEP=[{'seed': 1}, {'seed': 1}]"], r"lists the overrides \{'seed': 1\} twice"),
    (["SWEEP={'seed': 1}"], "get_sweep\\(\\) must return a non-empty list of dicts"),
])
def test_bad_arguments_stop_before_anything_starts(args, message, tmp_path, capsys,
                                                   monkeypatch, in_repo):
  monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch or gcloud here
  root = tmp_path / "sweep"
  config = f"--config={TINY}"
  if args[0].startswith("SWEEP="):
    config, args = f"--config={write_experiment(tmp_path, args[0][6:])}", args[1:]
  elif args[0].startswith("--config="):
    config, args = args[0], args[1:]
  dry_run = [] if "sbatch" in message else ["--dry_run"]  # a failing test starts nothing
  code, out, err = run_sweep(capsys, config, f"--workdir_root={root}", *args, *dry_run)
  assert code == 2 and out == ""
  problem, usage = err.splitlines()
  assert problem.startswith("error: ") and re.search(message, problem), problem
  assert usage.startswith("usage: python -m launch.sweep")
  assert not root.exists()


def test_a_root_holding_another_sweep_is_refused(tmp_path, capsys, in_repo):
  root = tmp_path / "sweep"
  root.mkdir()
  (root / "sweep.json").write_text(json.dumps({"config": "experiments/quickstart.py",
                                               "runs": []}))
  code, _, err = run_sweep(capsys, f"--config={TINY}", f"--workdir_root={root}", "--dry_run")
  assert code == 2
  assert "holds the sweep of --config=experiments/quickstart.py; use another" in err


# ------------------------------------------------------------------------------------------
# Report.


def write_run(root: pathlib.Path, name: str, records: list[dict], num_steps: int,
              checkpoints: list[int], tail: str = ""):
  workdir = root / name
  workdir.mkdir(parents=True)
  (workdir / "config.json").write_text(json.dumps({"train": {"num_steps": num_steps}}))
  (workdir / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in records) + tail)
  for step in checkpoints:
    fake_checkpoint(workdir, step, evaluated=False)


def test_report_table_and_plot(tmp_path, capsys):
  root = tmp_path / "sweep"
  runs = {"a": {"optim.learning_rate": 0.001}, "b": {"optim.learning_rate": 0.003},
          "c": {"optim.learning_rate": 0.01}, "d": {"optim.learning_rate": 0.03}}
  root.mkdir()
  (root / "sweep.json").write_text(json.dumps(
      {"config": TINY, "runs": [{"name": n, "overrides": o} for n, o in runs.items()]}))
  train = lambda losses: [{"step": s, "split": "train", "loss": l}
                          for s, l in zip((2, 4, 6, 8), losses)]
  evals = lambda losses: [{"step": s, "split": "eval", "loss": l, "accuracy": 1 - l / 10}
                          for s, l in zip((4, 8), losses)]
  write_run(root, "a", train([5, 4, 3, 2.5]) + evals([3.5, 2.75]), 8, [4, 8])
  # b was resumed from step 4 after logging step 6 once: the second step-6 line counts.
  write_run(root, "b", train([5, 3, 9, 2]) + evals([2.5, 2.25]) + [
      {"step": 6, "split": "train", "loss": 2.1}], 8, [4, 8])
  write_run(root, "c", train([5, 4.5]) + evals([4]), 8, [4], tail='{"step": 5, "spl')
  # In-process: tests/test_slurm.py runs `python -m launch.report` end to end.
  code = report.main([str(root)])
  out, err = capsys.readouterr()
  assert code == 0, err
  lines = out.splitlines()
  header = lines[0].split()
  assert header == ["optim.learning_rate", "status", "step", "train", "loss", "eval", "loss",
                    "best", "eval", "loss"]
  rows = [line.split() for line in lines[2:6]]
  # Best (lowest) eval loss first; the run that never started last.
  assert rows[0] == ["0.003", "finished", "8", "2", "2.25", "2.25", "@", "8"]
  assert rows[1] == ["0.001", "finished", "8", "2.5", "2.75", "2.75", "@", "8"]
  assert rows[2] == ["0.01", "step", "4", "of", "8", "4", "4.5", "4", "4", "@", "4"]
  assert rows[3] == ["0.03", "not", "started", "-", "-", "-", "-"]
  assert [r["loss"] for r in records.read_metrics(root / "b") if r["split"] == "train"] == [
      5, 3, 2.1, 2]
  assert lines[-1] == f"Curves: {root / 'report.png'}"
  image = matplotlib.image.imread(root / "report.png")
  assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600
  assert image[..., :3].std() > 0.05  # curves, not a blank page
  best_accuracy = report.summarize(report.load_runs(str(root)), "eval", "accuracy", True)
  assert [row["name"] for row in best_accuracy] == ["b", "a", "c", "d"]


# ------------------------------------------------------------------------------------------
# Multi-host for real: two processes on localhost, 4 CPU devices each, one mesh of 8.


class TwoHostPipelines:
  """train.data.pipeline as two hosts call it, in one process: each batch is host 0's rows
  then host 1's, as `make_array_from_process_local_data` lays out the global batch. A finite
  pipeline (eval) is one process's: the reference for the hosts' eval is the whole split."""

  def __getattr__(self, name):
    make = getattr(pipeline_lib, name)

    def two_hosts(*args, batch_size, num_epochs, **kwargs):
      if num_epochs is not None:
        return make(*args, batch_size=batch_size, num_epochs=num_epochs, **kwargs)
      return TwoHostPipeline([make(*args, batch_size=batch_size // 2, process_index=index,
                                   process_count=2, num_epochs=num_epochs, **kwargs)
                              for index in (0, 1)])
    return two_hosts


@dataclasses.dataclass
class TwoHostPipeline:
  pipelines: list

  def __iter__(self):
    return TwoHostIterator([iter(p) for p in self.pipelines])


@dataclasses.dataclass
class TwoHostIterator:
  iterators: list

  def __iter__(self):
    return self

  def __next__(self):
    batches = [next(iterator) for iterator in self.iterators]
    return jax.tree.map(lambda *rows: np.concatenate(rows), *batches)

  def get_state(self):
    return {"hosts": [iterator.get_state() for iterator in self.iterators]}

  @property
  def counts(self):
    return {k: sum(i.counts[k] for i in self.iterators) for k in self.iterators[0].counts}


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


# A few steps with a constant learning rate after warmup, so that the schedule does not
# depend on num_steps and a run of 3 steps resumed to 5 matches a run of 5. The eval reads all
# of a test split that the hosts share unevenly: 17 and 16 pairs, 3 and 2 batches of 8 rows.
SHORT = {"train.num_steps": 3, "train.checkpoint_every": 0, "train.log_every": 1,
         "data.source_options.num_test": 33, "optim.schedule": "constant"}
# float32 everywhere; the order of the cross-device sums (gloo vs in-process) and XLA's
# optimization level differ. Observed: relative differences of about 1e-7.
RTOL = 1e-5


def losses(records, split="train"):
  return {r["step"]: r["loss"] for r in records if r["split"] == split}


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume(tmp_path, monkeypatch):
  path = str(ROOT / "experiments" / "quickstart.py")
  module = experiment.load_module(path)
  configs = {steps: experiment.apply_overrides(experiment.get_config(module, "tiny"),
                                               {**SHORT, "train.num_steps": steps}, path)
             for steps in (3, 5)}
  workdir = tmp_path / "two_hosts"
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
         # Cheaper compiles (the test is about the processes, not XLA's optimizations).
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4 "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                      + OLDER_EMITTERS,
         "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo", "JAX_DEFAULT_MATMUL_PRECISION": "highest",
         # The resumed run reuses the first one's compiled programs.
         "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}

  logs = lambda: [(workdir / name).read_text() for name in ("train.log", "train.process1.log")]

  def start(steps):
    """Both processes of the run, to `steps` steps, in the background."""
    overrides = {**SHORT, "train.num_steps": steps}
    run = experiment.Run("two_hosts", overrides, str(workdir), configs[steps])
    runner = runners.Local(f"{path}:tiny", processes_per_run=2, coordinator_port=free_port(),
                           env=env)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("failed", runner.launch([run])),
                              daemon=True)
    thread.start()
    return thread, result

  def finish(thread, result):
    thread.join(timeout=300)
    assert not thread.is_alive() and result["failed"] == [], logs()

  first = start(3)
  # Meanwhile, the reference: one process, 8 devices, the two hosts' global batches, 5 steps.
  for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(inputs_lib, "pipeline", TwoHostPipelines())
  assert jax.device_count() == 8
  reference_eval = loop.train_and_evaluate(configs[5], str(tmp_path / "reference"))
  reference = records.read_metrics(tmp_path / "reference")
  finish(*first)

  log0, log1 = logs()
  assert "on 8 cpu device(s), mesh {'data': 8, 'fsdp': 1, 'tensor': 1}" in log0
  assert "parameters on" not in log1 and "Done:" not in log1  # process 0 speaks, alone
  assert workdirs.checkpoint_steps(workdir) == [3]  # one checkpoint, shared by both
  finish(*start(5))
  log0, _ = logs()
  assert "Resumed from step 3 of" in log0
  assert workdirs.checkpoint_steps(workdir) == [3, 5]
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["split"]) for r in lines] == [  # each once: only process 0 writes
      (1, "train"), (2, "train"), (3, "train"), (3, "eval"), (4, "train"), (5, "train"),
      (5, "eval")]
  two_hosts = losses(lines)
  one_process = losses(reference)
  assert list(one_process) == [1, 2, 3, 4, 5] and one_process[5] < one_process[1]
  np.testing.assert_allclose([two_hosts[s] for s in range(1, 6)],
                             [one_process[s] for s in range(1, 6)], rtol=RTOL)
  final_eval = [r for r in lines if r["split"] == "eval"][-1]
  assert final_eval["decoded"] == final_eval["data_examples"] == 33
  for key in ("loss", "accuracy", "exact_match", "bleu", "decoded"):
    np.testing.assert_allclose(final_eval[key], reference_eval[key], rtol=RTOL)
