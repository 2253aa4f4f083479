#!/usr/bin/env bash
# The command for one GPU host run of benchmarks/accelerator.py (at most 8 minutes, one process
# for every JAX row, the PyTorch baseline's runs first):
#   bash benchmarks/accelerator.sh [TORCH_BASELINE] [BENCHMARK_FLAG ...]
# run from anywhere in a checkout on a host whose image holds jax (CUDA), flax, optax and
# torch but nothing else we need, and no internet. The rest comes as wheels in the checkout's
# .whl/ (built elsewhere by ../shared/gpu/fetch-wheels.sh .whl), installed here, as that
# script's header says, into a temporary folder put on PYTHONPATH. TORCH_BASELINE is the path
# of a copy of ../shared/bench/torch_gpt2_baseline.py placed in the checkout (../shared does
# not travel to the host); without it the table has no PyTorch rows.
set -euo pipefail
cd "$(dirname "$0")/.."
baseline=()
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then
  [ -f "$1" ] || { echo "error: no torch baseline at $1; pass the path of its copy" >&2; exit 2; }
  baseline=("--torch_baseline=$1"); shift
fi
site=$(mktemp -d); trap 'rm -rf "$site"' EXIT
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl
fi
export PYTHONPATH=$site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m benchmarks.accelerator "${baseline[@]}" "$@"
