#!/usr/bin/env bash
# Installs what tests/test_slurm.py needs to start a SLURM cluster on this machine: Debian's
# slurmctld, slurmd, slurm-client and munge (root; nothing to do when they are there). The
# tests start and stop the daemons themselves (tests/slurm_cluster.py); nothing starts here.
set -euo pipefail
programs=(munged mungekey slurmctld slurmd sbatch squeue scancel scontrol sinfo srun)
missing=0
for program in "${programs[@]}"; do
  command -v "$program" > /dev/null || missing=1
done
[ "$missing" = 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get > /dev/null; then
  echo "error: .ci/slurm.sh installs Debian's slurm packages with apt-get, as root." >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge
