#!/usr/bin/env bash
# Install (tools/setup.sh), then run the main job on a real default:
# SmolLM2-135M, LAMA relation P37 (official language): manual prompt vs P-tuning,
# export int8, predict with the torch-free runtime. See tools/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/python tools/demo.py "$@"
