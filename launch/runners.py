"""Where a sweep's runs go: this machine, a SLURM cluster, or a Cloud TPU VM pod.

Every run is the training CLI, `python -m train --config=... --workdir=... --config.KEY=...`;
a runner only decides where and how many processes start it. With several processes, JAX's
multi-controller runtime joins them: `train/` calls `jax.distributed.initialize()`, and
every process runs the same program over one global device mesh.

Multi-process settings, for any cluster. Each process needs the coordinator's address
(host:port of process 0, reachable from all), the number of processes and its own id:

  --config.distributed.coordinator_address=HOST:PORT   (or JAX_COORDINATOR_ADDRESS)
  --config.distributed.num_processes=N
  --config.distributed.process_id=I                     (0 .. N-1; 0 writes metrics)

and JAX_LOCAL_DEVICE_IDS=0,1 restricts a process to some of its machine's GPUs. On SLURM
(several tasks), Open MPI and Cloud TPU pods `jax.distributed.initialize()` reads them from
the environment instead: SLURM_STEP_NODELIST's first node and a port from SLURM_JOB_ID,
SLURM_NTASKS, SLURM_PROCID (and SLURM_LOCALID as the process's GPU); OMPI_COMM_WORLD_SIZE /
_RANK; the TPU VM's metadata. Every process reads its own shard of the data
(`process_index::process_count`), checkpoints go to the workdir, which must be a folder all
processes share (NFS, or gs:// on TPU pods), and only process 0 writes metrics.

Runners, each with `check(runs)` (bad settings raise InputError before anything starts),
`plan(runs)` (the exact shell lines that would run: what --dry_run prints) and
`launch(runs)` (returns the names of the runs that failed; FAILED and ADVICE say what that
means and what to do); Slurm also has `queued(runs)`, the runs already in the queue, which a
sweep does not submit again:

- Local: runs one after another, or several at a time with GPUs split between them
  (CUDA_VISIBLE_DEVICES); each run as one process or as several joined on localhost.
- Slurm: one sbatch script per run, written to its workdir and submitted with `sbatch`;
  `srun` starts one process per node, one per GPU, or N per node on CPU-only nodes. GPUs
  are asked for only when --gpus_per_node is given.
- Tpu: `gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command=...` per run,
  one after another: every worker of the pod starts the same command.
"""

import dataclasses
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time

from launch import workdirs
from launch.experiment import Run
from models.errors import InputError
from train.engine import parallel


def train_command(python: str, config_arg: str, run: Run) -> list[str]:
  """The training CLI's argv for a run."""
  return [python, "-m", "train", f"--config={config_arg}", f"--workdir={run.workdir}"] + [
      f"--config.{key}={workdirs.format_value(value)}"
      for key, value in sorted(run.overrides.items())]


def distributed_flags(coordinator_address: str, num_processes: int, process_id: int) -> list[str]:
  """The train CLI flags that make a process one of `num_processes` (see the module doc)."""
  return [f"--config.distributed.coordinator_address={coordinator_address}",
          f"--config.distributed.num_processes={num_processes}",
          f"--config.distributed.process_id={process_id}"]


def check_devices(run: Run, num_devices: int | None, num_processes: int, where: str) -> None:
  """The run's mesh must fit `num_devices` (None: unknown) and its batch split over processes."""
  if num_devices:
    try:
      parallel.mesh_shape(run.config.mesh, num_devices)
    except ValueError as e:
      raise InputError(f"run {run.name} on {where}: {e}") from None
  batch_size = run.config.train.batch_size
  if batch_size % num_processes:
    raise InputError(f"run {run.name} on {where}: train.batch_size={batch_size} does not "
                     f"split over {num_processes} processes; choose a multiple of "
                     f"{num_processes}.")


SQUEUE_TIMEOUT_S = SBATCH_TIMEOUT_S = 60
_SBATCH_SAFE = re.compile(r"[A-Za-z0-9_@%+=:,./-]*")
_SBATCH_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


def sbatch_quote(option: str) -> str:
  """An sbatch option as an #SBATCH line carries it: its value in double quotes when needed.

  sbatch reads each word of an #SBATCH line itself (not bash): a space or an unquoted `#` ends
  it, '...' and "..." quote, and a backslash escapes the next character, inside quotes too.
  """
  if _SBATCH_SAFE.fullmatch(option):
    return option
  quote = lambda text: '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
  name, sep, value = option.partition("=")
  return f"{name}={quote(value)}" if sep and _SBATCH_SAFE.fullmatch(name) else quote(option)


def _need_program(name: str, runner: str) -> None:
  if shutil.which(name) is None:
    raise InputError(f"--runner={runner} needs `{name}`, which is not on PATH here; run on a "
                     f"machine that has it, or add --dry_run to see the commands.")


@dataclasses.dataclass
class Local:
  """This machine: `gpus // gpus_per_run` runs at a time, each as `processes_per_run` processes."""
  FAILED = "failed"
  ADVICE = "Rerun the same command to resume them."
  config_arg: str
  python: str = sys.executable
  gpus: int = 0                   # GPUs to use, ids 0..gpus-1; 0 = leave CUDA_VISIBLE_DEVICES
  gpus_per_run: int = 1
  processes_per_run: int = 1      # > 1: joined by jax.distributed through localhost
  coordinator_port: int = 29500   # slot s uses coordinator_port + s
  env: dict | None = None         # the processes' environment; None = this one's

  @property
  def slots(self) -> int:
    return self.gpus // self.gpus_per_run if self.gpus else 1

  def check(self, runs: list[Run], dry_run: bool = False) -> None:
    if self.gpus < 0 or self.gpus_per_run < 1 or self.processes_per_run < 1:
      raise InputError(f"--gpus={self.gpus}, --gpus_per_run={self.gpus_per_run} and "
                       f"--processes_per_run={self.processes_per_run}: use gpus >= 0 and the "
                       "others >= 1.")
    if self.gpus % self.gpus_per_run:
      raise InputError(f"--gpus={self.gpus} do not divide into runs of --gpus_per_run="
                       f"{self.gpus_per_run}; use a gpus_per_run that divides {self.gpus}.")
    if self.gpus and self.gpus_per_run % self.processes_per_run:
      raise InputError(f"--gpus_per_run={self.gpus_per_run} GPUs do not divide among "
                       f"--processes_per_run={self.processes_per_run}; use a number of "
                       f"processes that divides {self.gpus_per_run}.")
    for run in runs:
      check_devices(run, self.gpus_per_run if self.gpus else None, self.processes_per_run,
                    f"{self.gpus_per_run} GPU(s)" if self.gpus else "this machine")

  def processes(self, run: Run, slot: int) -> list[tuple[dict, list[str], str | None]]:
    """(extra environment, argv, log file or None = this terminal) of each process of a run."""
    count = self.processes_per_run
    base = train_command(self.python, self.config_arg, run)
    concurrent = self.slots > 1 or count > 1
    out = []
    for index in range(count):
      env, argv = {}, list(base)
      if self.gpus:
        per_process = self.gpus_per_run // count
        first = slot * self.gpus_per_run + index * per_process
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(first, first + per_process)))
      if count > 1:
        argv += distributed_flags(f"localhost:{self.coordinator_port + slot}", count, index)
      log = None
      if concurrent:
        log = f"{run.workdir}/train{f'.process{index}' if index else ''}.log"
      out.append((env, argv, log))
    return out

  def plan(self, runs: list[Run]) -> list[str]:
    """A shell script of the launch: with several slots, each a subshell in the background."""
    lines = []
    for slot in range(self.slots):
      mine = runs[slot::self.slots]
      indent = "  " if self.slots > 1 else ""
      if self.slots > 1 and mine:
        gpus = range(slot * self.gpus_per_run, (slot + 1) * self.gpus_per_run)
        lines.append(f"(  # slot {slot}: GPU(s) {','.join(map(str, gpus))}")
      for run in mine:
        procs = self.processes(run, slot)
        for env, argv, log in procs:
          line = "".join(f"{k}={v} " for k, v in env.items()) + shlex.join(argv)
          line += f" > {shlex.quote(log)} 2>&1" if log else ""
          lines.append(indent + line + (" &" if len(procs) > 1 else ""))
        if len(procs) > 1:
          lines.append(indent + "wait")
      if self.slots > 1 and mine:
        lines.append(") &")
    return lines + (["wait"] if self.slots > 1 else [])

  def launch(self, runs: list[Run]) -> list[str]:
    failed, lock = [], threading.Lock()

    def work(slot):
      for run in runs[slot::self.slots]:
        code = self._run(run, slot)
        with lock:
          print(f"{'done' if code == 0 else f'FAILED (exit {code})'}: {run.name}", flush=True)
          if code:
            failed.append(run.name)

    threads = [threading.Thread(target=work, args=(slot,), daemon=True)
               for slot in range(self.slots)]
    for thread in threads:
      thread.start()
    for thread in threads:
      while thread.is_alive():
        thread.join(0.2)
    return failed

  def _run(self, run: Run, slot: int) -> int:
    """Starts a run's processes and waits; one failing stops the others. The exit code."""
    os.makedirs(run.workdir, exist_ok=True)
    base_env = os.environ if self.env is None else self.env
    started, logs = [], []
    processes = self.processes(run, slot)
    gpus = " ".join(env["CUDA_VISIBLE_DEVICES"] for env, _, _ in processes if env)
    print(f"start: {run.name}" + (f" on GPUs {gpus}" if gpus else "") + (
        f", log in {processes[0][2]}" if processes[0][2] else ""), flush=True)
    for env, argv, log in processes:
      out = open(log, "a") if log else None
      logs.append(out)
      started.append(subprocess.Popen(argv, env={**base_env, **env}, stdout=out,
                                      stderr=subprocess.STDOUT if out else None))
    try:
      while True:
        codes = [p.poll() for p in started]
        failure = next((code for code in codes if code), 0)
        if failure or None not in codes:
          break
        time.sleep(0.2)
      for p in started:  # The others would wait for the failed one forever.
        if p.poll() is None:
          p.terminate()
          try:
            p.wait(timeout=60)
          except subprocess.TimeoutExpired:
            p.kill()
      return failure
    finally:
      for out in logs:
        if out:
          out.close()


@dataclasses.dataclass
class Slurm:
  """One sbatch script per run; srun starts one process per node, per GPU, or N per node."""
  FAILED = "were not submitted"
  ADVICE = "Fix what sbatch said about each script (above), then rerun the same command."
  config_arg: str
  python: str = sys.executable
  repo_dir: str = ""              # the checkout on the cluster; "" = this directory
  nodes: int = 1
  gpus_per_node: int = 0          # 0: no GPUs asked for (CPU-only nodes)
  processes: str = ""             # per_gpu | per_node; "" = per_gpu with GPUs, else per_node
  processes_per_node: int = 0     # without GPUs: N processes per node; 0 = one
  time: str = ""                  # --time, e.g. 04:00:00; "" = the partition's default
  partition: str = ""
  sbatch_args: tuple = ()         # more #SBATCH options, e.g. "--account=abc"

  @property
  def tasks_per_node(self) -> int:
    if not self.gpus_per_node:
      return self.processes_per_node or 1
    return self.gpus_per_node if self.processes in ("", "per_gpu") else 1

  def check(self, runs: list[Run], dry_run: bool = False) -> None:
    if self.processes not in ("", "per_gpu", "per_node"):
      raise InputError(f"--processes={self.processes!r}: use per_gpu or per_node.")
    if self.nodes < 1 or self.gpus_per_node < 0 or self.processes_per_node < 0:
      raise InputError(f"--nodes={self.nodes}, --gpus_per_node={self.gpus_per_node} and "
                       f"--processes_per_node={self.processes_per_node}: use nodes >= 1 and "
                       "the others >= 0.")
    if self.gpus_per_node and self.processes_per_node:
      raise InputError(f"--processes_per_node is for nodes without GPUs; with --gpus_per_node="
                       f"{self.gpus_per_node} use --processes=per_gpu ({self.gpus_per_node} "
                       "per node) or --processes=per_node (1 per node).")
    if not self.gpus_per_node and self.processes == "per_gpu":
      raise InputError("--processes=per_gpu needs --gpus_per_node >= 1; without GPUs use "
                       "--processes_per_node=N.")
    where = (f"{self.nodes} node(s) x {self.gpus_per_node} GPU(s)" if self.gpus_per_node else
             f"{self.nodes} node(s) x {self.tasks_per_node} process(es)")
    for run in runs:
      if any(c in run.workdir for c in "\n\r"):
        raise InputError(f"the workdir {run.workdir!r} holds a line break, which an sbatch "
                         "script cannot carry; choose another --workdir_root.")
      check_devices(run, self.nodes * self.gpus_per_node or None,
                    self.nodes * self.tasks_per_node, where)
    if not dry_run:
      _need_program("sbatch", "slurm")
      _need_program("squeue", "slurm")

  def script_path(self, run: Run) -> str:
    return f"{run.workdir}/slurm.sbatch"

  def queued(self, runs: list[Run]) -> dict[str, str]:
    """{name: "job ID STATE"} of the runs this user has in the queue (pending or running).

    squeue is asked once for all of this user's jobs; a run's job is the one of its job
    name, which names the sweep root and the run. Without squeue here (a dry run off the
    cluster) none are known.
    """
    if shutil.which("squeue") is None:
      return {}
    argv = ["squeue", "--me", "--noheader", "--format=%i %T %j"]
    try:
      result = subprocess.run(argv, capture_output=True, text=True, timeout=SQUEUE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
      result = subprocess.CompletedProcess(argv, 1, "", f"no answer in {SQUEUE_TIMEOUT_S} s")
    if result.returncode:
      raise InputError(f"`{shlex.join(argv)}` failed ({' '.join(result.stderr.split())}); "
                       "the sweep asks it which runs are already queued, so that none is "
                       "submitted twice: rerun once squeue answers.")
    jobs = {}
    for line in result.stdout.splitlines():
      job_id, state, name = line.split(" ", 2)
      jobs.setdefault(name, f"job {job_id} {state.lower()}")
    return {run.name: jobs[self.job_name(run)] for run in runs if self.job_name(run) in jobs}

  def job_name(self, run: Run) -> str:
    """EXPERIMENT-ROOTHASH-RUN: names the sweep root and the run, so squeue can find it."""
    experiment = os.path.splitext(os.path.basename(self.config_arg.split(":")[0]))[0]
    root = hashlib.sha1(os.path.dirname(run.workdir).encode()).hexdigest()[:8]
    return f"{_SBATCH_UNSAFE.sub('_', experiment)}-{root}-{run.name}"

  def script(self, run: Run) -> str:
    directives = [f"--job-name={self.job_name(run)}", f"--nodes={self.nodes}",
                  f"--ntasks-per-node={self.tasks_per_node}"]
    directives += [f"--gpus-per-node={self.gpus_per_node}"] if self.gpus_per_node else []
    directives += [f"--time={self.time}"] if self.time else []
    directives += [f"--partition={self.partition}"] if self.partition else []
    directives += list(self.sbatch_args)
    directives += [f"--output={run.workdir.replace('%', '%%')}/slurm-%j.out",
                   "--open-mode=append"]
    lines = ["#!/bin/bash",
             f"# tapete sweep run {run.name}: sbatch {shlex.quote(self.script_path(run))}"]
    lines += [f"#SBATCH {sbatch_quote(d)}" for d in directives]
    lines += ["set -euo pipefail", f"cd {shlex.quote(self.repo_dir or os.getcwd())}",
              "# jax.distributed.initialize() reads SLURM's environment: coordinator = the first",
              "# node of SLURM_STEP_NODELIST, processes = SLURM_NTASKS, id = SLURM_PROCID."]
    if not self.gpus_per_node:
      lines.append(f"# {self.tasks_per_node} process(es) per node, on CPUs.")
    elif self.tasks_per_node > 1:
      lines.append("# One process per GPU: each uses GPU SLURM_LOCALID of its node.")
    else:
      devices = ",".join(map(str, range(self.gpus_per_node)))
      lines += ["# One process per node, using all of the node's GPUs.",
                f"export JAX_LOCAL_DEVICE_IDS={devices}"]
    argv = train_command(self.python, self.config_arg, run)
    lines.append(f"srun --kill-on-bad-exit=1 {shlex.join(argv)}")
    return "\n".join(lines) + "\n"

  def plan(self, runs: list[Run]) -> list[str]:
    lines = []
    for run in runs:
      path = self.script_path(run)
      lines += [f"# {path}:", *self.script(run).rstrip("\n").splitlines(),
                f"sbatch {shlex.quote(path)}"]
    return lines

  def launch(self, runs: list[Run]) -> list[str]:
    failed = []
    for run in runs:
      os.makedirs(run.workdir, exist_ok=True)
      path = self.script_path(run)
      with open(path, "w") as f:
        f.write(self.script(run))
      try:
        result = subprocess.run(["sbatch", path], capture_output=True, text=True,
                                timeout=SBATCH_TIMEOUT_S)
      except subprocess.TimeoutExpired:
        result = subprocess.CompletedProcess([], 1, "", f"no answer in {SBATCH_TIMEOUT_S} s")
      if result.returncode:
        failed.append(run.name)
        said = "; ".join(line.strip() for line in result.stderr.splitlines() if line.strip())
        said = said or f"exit status {result.returncode}"
        print(f"{run.name}: sbatch {shlex.quote(path)} failed: {said}", file=sys.stderr,
              flush=True)
      else:
        print(f"{run.name}: {result.stdout.strip()}", flush=True)
    return failed


@dataclasses.dataclass
class Tpu:
  """The runs one after another on every worker of a Cloud TPU VM (pod)."""
  FAILED = "failed"
  ADVICE = "Rerun the same command to resume them."
  config_arg: str
  tpu_name: str = ""
  zone: str = ""
  project: str = ""
  python: str = "python3"
  repo_dir: str = "tapete"        # the checkout on the workers, relative to the home folder

  def check(self, runs: list[Run], dry_run: bool = False) -> None:
    missing = [flag for flag, value in (("--tpu_name", self.tpu_name), ("--zone", self.zone))
               if not value]
    if missing:
      raise InputError(f"--runner=tpu needs {' and '.join(missing)} (the TPU VM and its zone, "
                       "as in `gcloud compute tpus tpu-vm list --zone=ZONE`).")
    if not dry_run:
      _need_program("gcloud", "tpu")

  def command(self, run: Run) -> list[str]:
    remote = f"cd {shlex.quote(self.repo_dir)} && " + shlex.join(
        train_command(self.python, self.config_arg, run))
    return (["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.tpu_name, f"--zone={self.zone}"]
            + ([f"--project={self.project}"] if self.project else [])
            + ["--worker=all", f"--command={remote}"])

  def plan(self, runs: list[Run]) -> list[str]:
    return [shlex.join(self.command(run)) for run in runs]

  def launch(self, runs: list[Run]) -> list[str]:
    failed = []
    for run in runs:
      print(f"start: {run.name} on {self.tpu_name}", flush=True)
      code = subprocess.run(self.command(run)).returncode
      print(f"{'done' if code == 0 else f'FAILED (exit {code})'}: {run.name}", flush=True)
      if code:
        failed.append(run.name)
    return failed
