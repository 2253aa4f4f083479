"""A real SLURM cluster on this machine, started by hand (as root, no systemd) for the tests.

One new folder in the temp folder holds everything, its path short (slurmd's sockets live in
it): a munge key, munged's socket, slurm.conf, the controller's state, each node's spool and
the logs. munged, slurmctld and one slurmd per node run in the foreground as children of this
process; several slurmd on one host stand for several nodes, named by names of this machine
that resolve to 127.x (jax.distributed's coordinator is the first node's name). They talk over
127.0.0.1. `stop()` cancels the jobs left, ends only the processes `start()` began and
removes the folder; a daemon whose parent dies gets SIGTERM. Commands reach the cluster
through SLURM_CONF (`env`).

To try the SLURM path by hand: `.venv/bin/python tests/slurm_cluster.py [NODES]` starts one,
prints its SLURM_CONF and stops it on Ctrl-C or SIGTERM. Debian's packages: slurmctld,
slurmd, slurm-client and munge (`.ci/slurm.sh` installs them).
"""

import ctypes
import dataclasses
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scancel",
            "scontrol", "sinfo", "srun")
START_TIMEOUT_S = STOP_TIMEOUT_S = 30
# CPUs a node declares, whatever the machine has (SlurmdParameters=config_overrides): a 2-run
# sweep or a 2-process run fits on one node of a 1-core machine.
NODE_CPUS = 4
PR_SET_PDEATHSIG = 1  # prctl(2)

SLURM_CONF = """\
ClusterName=tapete
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={controller_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder}/munge.socket
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool/%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.%n.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
FirstJobId={first_job_id}
KillWait=30
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
NODE = "NodeName={name} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} State=UNKNOWN"


def missing_programs() -> list[str]:
  return [name for name in PROGRAMS if shutil.which(name) is None]


def loopback_names() -> list[str]:
  """Names of this machine that resolve to a loopback address, its host name first."""
  names = []
  for name in dict.fromkeys((socket.gethostname(), "localhost")):
    try:
      if socket.gethostbyname(name).startswith("127."):
        names.append(name)
    except OSError:
      pass
  return names


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _end_with_parent() -> None:
  """Run in a daemon before it starts: SIGTERM when this process dies, however it dies."""
  ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclasses.dataclass
class Cluster:
  nodes: list[str]
  folder: pathlib.Path = dataclasses.field(
      default_factory=lambda: pathlib.Path(tempfile.mkdtemp(prefix="slurm-")))
  processes: list[subprocess.Popen] = dataclasses.field(default_factory=list)

  @property
  def env(self) -> dict:
    return {**os.environ, "SLURM_CONF": str(self.folder / "slurm.conf")}

  def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """A SLURM command against this cluster; its output as text."""
    return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)

  def start(self) -> "Cluster":
    """munged, slurmctld, one slurmd per node; returns once every node is idle."""
    folder = self.folder
    folder.chmod(0o755)  # munged's socket: reachable by every user
    for sub in ("state", *(f"spool/{name}" for name in self.nodes)):
      (folder / sub).mkdir(parents=True)
    subprocess.run(["mungekey", "--create", f"--keyfile={folder}/munge.key"], check=True,
                   capture_output=True, timeout=START_TIMEOUT_S)
    nodes = [NODE.format(name=name, port=free_port(), cpus=NODE_CPUS) for name in self.nodes]
    (folder / "slurm.conf").write_text(SLURM_CONF.format(
        host=socket.gethostname(), controller_port=free_port(), folder=folder,
        nodes="\n".join(nodes), first_job_id=random.randrange(1, 10**6)))
    self._start("munged", ["munged", "--foreground", "--force",
                           f"--socket={folder}/munge.socket", f"--key-file={folder}/munge.key",
                           f"--log-file={folder}/munged.log", f"--pid-file={folder}/munged.pid",
                           f"--seed-file={folder}/munged.seed"])
    self._wait(lambda: (folder / "munge.socket").exists(), "munged to open its socket")
    self._start("slurmctld", ["slurmctld", "-D", "-i", "-f", f"{folder}/slurm.conf"])
    for name in self.nodes:
      self._start(f"slurmd.{name}", ["slurmd", "-D", "-N", name, "-f", f"{folder}/slurm.conf"])
    self._wait(self._all_idle, f"nodes {self.nodes} to be idle in sinfo")
    return self

  def stop(self) -> None:
    """Cancels the jobs left in the queue, then ends the daemons; removes the folder."""
    try:
      self._cancel_jobs()
    finally:
      self._end_daemons()
      shutil.rmtree(self.folder, ignore_errors=True)

  def _cancel_jobs(self) -> None:
    if not self.processes or any(p.poll() is not None for p in self.processes):
      return  # a daemon is gone: SLURM's commands would wait for it
    deadline = time.monotonic() + STOP_TIMEOUT_S
    self.run("scancel", "--me", timeout=STOP_TIMEOUT_S)
    while (self.run("squeue", "--noheader", timeout=STOP_TIMEOUT_S).stdout.strip()
           and time.monotonic() < deadline):
      time.sleep(0.2)

  def _end_daemons(self) -> None:
    for process in reversed(self.processes):
      if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    for process in reversed(self.processes):
      try:
        process.wait(timeout=STOP_TIMEOUT_S)
      except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)

  def logs(self) -> str:
    """The tail of each daemon's output and log."""
    paths = sorted(self.folder.glob("*.out")) + sorted(self.folder.glob("*.log"))
    return "\n".join(f"--- {path.name}\n{path.read_text()[-3000:]}" for path in paths)

  def _start(self, name: str, argv: list[str]) -> None:
    with open(self.folder / f"{name}.out", "w") as log:
      self.processes.append(subprocess.Popen(
          argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
          preexec_fn=_end_with_parent))

  def _all_idle(self) -> bool:
    out = self.run("sinfo", "--noheader", "--Node", "--format=%N %t").stdout.split()
    return sorted(out[0::2]) == sorted(self.nodes) and set(out[1::2]) == {"idle"}

  def _wait(self, ready, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
      exited = [p.args[0] for p in self.processes if p.poll() is not None]
      if exited or time.monotonic() > deadline:
        problem = f"{', '.join(exited)} exited" if exited else f"not within {START_TIMEOUT_S} s"
        raise RuntimeError(f"waiting for {what}: {problem}.\n{self.logs()}")
      time.sleep(0.1)


def main(argv: list[str]) -> int:
  nodes = int(argv[1]) if len(argv) > 1 else 1
  names = loopback_names()
  if missing_programs() or len(names) < nodes:
    print(f"error: a {nodes}-node cluster needs {', '.join(PROGRAMS)} (.ci/slurm.sh installs "
          f"them) and {nodes} names of this machine that resolve to 127.x (found {names}).",
          file=sys.stderr)
    return 2
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
  cluster = Cluster(names[:nodes])
  try:
    cluster.start()
    print(f"export SLURM_CONF={cluster.folder}/slurm.conf  # nodes {', '.join(names[:nodes])}; "
          "Ctrl-C stops the cluster", flush=True)
    signal.pause()
  except KeyboardInterrupt:
    pass
  finally:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cluster.stop()
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
