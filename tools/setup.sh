#!/usr/bin/env bash
# Create ./.venv (once) and install ptedge with its [train,dev] extras into it.
# Idempotent: reinstalls only when pyproject.toml changed. Needs python3 >= 3.10 and PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.ptedge-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing ptedge[train,dev] (torch CPU build pinned; a few minutes once)" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[train,dev]"
  echo "$want" > "$stamp"
fi
