#!/usr/bin/env bash
# Install (tools/setup.sh) and run the whole test suite, real-backbone tests included.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -m "not slow"` for the fast part.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/python -m pytest -q "$@"
