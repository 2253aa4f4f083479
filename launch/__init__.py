"""Launching experiments: sweeps from `get_sweep()`, runners for this machine, SLURM and TPU
VMs, and a report of a sweep's results.

  python -m launch.sweep --config=experiments/NAME.py --workdir_root=DIR [--runner=...]
  python -m launch.report DIR

launch/ only builds configs and command lines; the training is `python -m train`.
"""
