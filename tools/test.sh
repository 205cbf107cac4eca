#!/usr/bin/env bash
# Install (tools/setup.sh) and run the test suite, real-backbone tests included
# (benchmark smoke tests, marked `bench`, are left to `bash tools/test.sh -m bench`).
# Extra arguments go to pytest and replace the default marker selection, e.g.
# `bash tools/test.sh -m "not slow"` for the fast part.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
if [ $# -eq 0 ]; then set -- -m "not bench"; fi
exec .venv/bin/python -m pytest -q "$@"
