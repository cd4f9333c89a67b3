#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the quickstart: GRPO on the embedded SmolLM2-135M, on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/forkrl train configs/quickstart.yaml "$@"
