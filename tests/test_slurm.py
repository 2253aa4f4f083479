"""launch/ on a real SLURM cluster: `python -m launch.sweep --runner=slurm` against Debian's
slurmctld, slurmd and munge, started by hand on this machine (tests/slurm_cluster.py).

References we did not write: sbatch reading the #SBATCH lines (a workdir root with a space,
a quote, a `#` and a `%`), squeue and scancel, srun's tasks joined by jax.distributed from
SLURM's environment, and an uninterrupted run for the preempted one. Every wait is bounded
and fails with the cluster's view (squeue, the jobs' output).

Without slurm these tests skip, saying why (`.ci/slurm.sh` installs it); under CI they fail.
"""

import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

import slurm_cluster
from conftest import OLDER_EMITTERS
from launch import workdirs
from train.engine import records

pytestmark = pytest.mark.slow  # a cluster started, jobs queued, tiny runs trained

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 40  # long enough for a scancel to land mid-run; a tiny step takes ~50 ms
SHORT_STEPS = 6
# Variants: "" the 2-run sweep; "one" its first run alone; "short" that run, SHORT_STEPS long,
# evaluated on all of a test split of 33 pairs (two processes read 17 and 16: 3 and 2 batches).
EXPERIMENT = f"""\
from experiments import quickstart

def get_config(variant=""):
  c = quickstart.get_config("tiny")
  c.train.num_steps = {SHORT_STEPS} if variant == "short" else {STEPS}
  c.train.log_every = 1
  c.train.checkpoint_every = 0        # the last step and SIGTERM only
  c.train.print_examples = 0
  if variant == "short":              # two processes: all of a split they share unevenly
    c.data.source_options.num_test = 33
  else:
    c.train.eval_batches = 1
  return c

def get_sweep(variant=""):
  return [{{"seed": 0}}] if variant else [{{"seed": 0}}, {{"seed": 1}}]
"""
JOB_TIMEOUT_S = 240  # a tiny run: ~10 s of CPU, plus a compile, on a busy 2-core machine
# Cheaper compiles, shared by every job (the test is about SLURM, not XLA's optimizations).
XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
             + OLDER_EMITTERS).strip()


def start_cluster(num_nodes: int) -> slurm_cluster.Cluster:
  """A cluster of `num_nodes` nodes, or a skip (a failure under CI) saying what is missing."""
  missing = slurm_cluster.missing_programs()
  names = slurm_cluster.loopback_names()
  if missing:
    reason = (f"SLURM is not installed here (no {', '.join(missing)}); bash .ci/slurm.sh "
              "installs Debian's slurmctld, slurmd, slurm-client and munge.")
  elif os.geteuid() != 0:
    reason = "the test cluster runs munged, slurmctld and slurmd as root; run as root."
  elif len(names) < num_nodes:
    reason = (f"{num_nodes} nodes need {num_nodes} names of this machine that resolve to "
              f"127.x (found {names}); add one to /etc/hosts.")
  else:
    cluster = slurm_cluster.Cluster(names[:num_nodes])
    try:
      return cluster.start()
    except Exception:
      cluster.stop()
      raise
  if os.environ.get("CI"):
    pytest.fail(f"CI must run the SLURM tests, but {reason}")
  pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster():
  cluster = start_cluster(1)
  yield cluster
  cluster.stop()


@pytest.fixture(scope="module")
def experiment_file(tmp_path_factory) -> str:
  """The experiment, beside the compilation cache that all the jobs share."""
  path = tmp_path_factory.mktemp("experiment") / "slurm_tiny.py"
  path.write_text(EXPERIMENT)
  return str(path)


def job_env(cluster: slurm_cluster.Cluster, experiment_file: str) -> dict:
  """The sweep's environment, which sbatch hands to its jobs: CPU, 1 device a process."""
  return {**cluster.env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": XLA_FLAGS,
          "JAX_COMPILATION_CACHE_DIR": f"{os.path.dirname(experiment_file)}/jax_cache",
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def sweep(cluster, experiment_file: str, root: pathlib.Path, *flags: str, variant: str = "",
          exit_status: int = 0) -> tuple[str, list[str]]:
  """`python -m launch.sweep --runner=slurm` as a user types it: its output (stdout, then
  stderr) and the job ids it submitted."""
  config_arg = f"{experiment_file}:{variant}" if variant else experiment_file
  result = subprocess.run([sys.executable, "-m", "launch.sweep", f"--config={config_arg}",
                           f"--workdir_root={root}", "--runner=slurm", *flags],
                          cwd=ROOT, env=job_env(cluster, experiment_file), capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == exit_status, result.stdout + result.stderr
  return (result.stdout + result.stderr,
          re.findall(r": Submitted batch job (\d+)$", result.stdout, re.M))


def queue(cluster) -> dict[str, str]:
  """{job id: state} of every job in the queue."""
  out = cluster.run("squeue", "--noheader", "--format=%i %T").stdout
  return dict(line.split() for line in out.splitlines())


def job_logs(root: pathlib.Path) -> str:
  return "\n".join(f"--- {path}\n{path.read_text()[-4000:]}"
                   for path in sorted(root.glob("*/slurm-*.out")))


def wait_for(condition, what: str, cluster, root: pathlib.Path, timeout: float):
  deadline = time.monotonic() + timeout
  while not (value := condition()):
    if time.monotonic() > deadline:
      pytest.fail(f"{what}: not within {timeout} s. squeue: {queue(cluster)}\n{job_logs(root)}"
                  f"\n{cluster.logs()}")
    time.sleep(0.2)
  return value


def wait_until_ended(cluster, job_ids: list[str], root: pathlib.Path) -> None:
  wait_for(lambda: not set(job_ids) & set(queue(cluster)), f"jobs {job_ids} to end", cluster,
           root, JOB_TIMEOUT_S)


def losses(workdir: pathlib.Path) -> dict:
  return {(r["step"], r["split"]): r["loss"] for r in records.read_metrics(workdir)}


@pytest.fixture(scope="module")
def finished_sweep(cluster, experiment_file, tmp_path_factory) -> pathlib.Path:
  """The 2-run sweep, run to completion, in a root that sbatch must read quoted."""
  root = tmp_path_factory.mktemp("sweeps") / "it's sweep #1, 100% done"
  out, job_ids = sweep(cluster, experiment_file, root)
  assert len(job_ids) == 2, out
  wait_until_ended(cluster, job_ids, root)
  return root


def test_a_sweep_runs_to_completion_and_the_report_lists_it(cluster, finished_sweep):
  for name in ("seed=0", "seed=1"):
    workdir = finished_sweep / name
    assert workdirs.status(workdir, STEPS) == ("finished", STEPS), job_logs(finished_sweep)
    # sbatch read --output quoted: the job's log is in the workdir, under its own name.
    assert len(list(workdir.glob("slurm-*.out"))) == 1
  result = subprocess.run([sys.executable, "-m", "launch.report", str(finished_sweep)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  rows = [line.split() for line in result.stdout.splitlines()[2:4]]
  assert sorted(row[:3] for row in rows) == [["0", "finished", str(STEPS)],
                                             ["1", "finished", str(STEPS)]]


def test_a_rerun_of_a_finished_sweep_submits_nothing(cluster, experiment_file, finished_sweep):
  out, job_ids = sweep(cluster, experiment_file, finished_sweep)
  assert job_ids == [] and "(2 finished, 0 to resume, 0 to start)" in out
  assert "Nothing to run." in out and queue(cluster) == {}


def test_an_sbatch_error_shows_sbatchs_words_and_the_script(cluster, experiment_file,
                                                            tmp_path):
  root = tmp_path / "sweep"
  out, job_ids = sweep(cluster, experiment_file, root, "--partition=nope", exit_status=1)
  assert job_ids == [] and queue(cluster) == {}
  for name in ("seed=0", "seed=1"):
    assert (f"{name}: sbatch {root / name / 'slurm.sbatch'} failed: sbatch: error: invalid "
            "partition specified: nope") in out
  assert "2 run(s) were not submitted: seed=0, seed=1. Fix what sbatch said" in out
  assert "resume them" not in out


def test_queued_runs_are_not_submitted_twice_and_a_cancelled_run_resumes_exactly(
    cluster, experiment_file, finished_sweep, tmp_path):
  root = tmp_path / "sweep"
  _, job_ids = sweep(cluster, experiment_file, root, "--sbatch_arg=--hold", variant="one")
  assert len(job_ids) == 1 and queue(cluster) == {job_ids[0]: "PENDING"}
  out, again = sweep(cluster, experiment_file, root, "--sbatch_arg=--hold", variant="one")
  assert again == [] and f"(job {job_ids[0]} pending: not submitted again)" in out
  assert queue(cluster) == {job_ids[0]: "PENDING"}

  # Released, it trains; scancel sends SIGTERM once the first steps are logged.
  assert cluster.run("scontrol", "release", job_ids[0]).returncode == 0
  wait_for(lambda: losses(root / "seed=0"), "the first train step to be logged", cluster, root,
           JOB_TIMEOUT_S)
  assert cluster.run("scancel", job_ids[0]).returncode == 0
  wait_until_ended(cluster, job_ids, root)
  state, step = workdirs.status(root / "seed=0", STEPS)
  assert state == "resume" and step < STEPS, (
      f"the run was not stopped mid-run ({state} at step {step}):\n{job_logs(root)}")
  assert f"Stopped by a signal at step {step}; checkpoint saved" in job_logs(root)

  out, resumed = sweep(cluster, experiment_file, root, variant="one")
  assert f"resume    seed=0  (from step {step} of {STEPS})" in out and len(resumed) == 1
  wait_until_ended(cluster, resumed, root)
  assert f"Resumed from step {step}" in job_logs(root)
  assert losses(root / "seed=0") == losses(finished_sweep / "seed=0")


def test_two_processes_per_run_join_through_slurms_environment(cluster, experiment_file,
                                                               tmp_path):
  root = tmp_path / "sweep"
  _, job_ids = sweep(cluster, experiment_file, root, "--processes_per_node=2",
                     variant="short")
  wait_until_ended(cluster, job_ids, root)
  assert workdirs.status(root / "seed=0", SHORT_STEPS)[0] == "finished", job_logs(root)
  assert "on 2 cpu device(s), mesh {'data': 2, 'fsdp': 1, 'tensor': 1}" in job_logs(root)


def test_two_nodes_run_one_process_each(experiment_file, tmp_path):
  two_nodes = start_cluster(2)
  try:
    root = tmp_path / "sweep"
    _, job_ids = sweep(two_nodes, experiment_file, root, "--nodes=2", variant="short")
    wait_until_ended(two_nodes, job_ids, root)
    job = two_nodes.run("scontrol", "show", "job", job_ids[0]).stdout
    node_list = re.search(r"^ *NodeList=(\S+)$", job, re.M)
    assert node_list and set(node_list[1].split(",")) == set(two_nodes.nodes), job
    assert workdirs.status(root / "seed=0", SHORT_STEPS)[0] == "finished", job_logs(root)
    assert "on 2 cpu device(s), mesh {'data': 2, 'fsdp': 1, 'tensor': 1}" in job_logs(root)
  finally:
    two_nodes.stop()
