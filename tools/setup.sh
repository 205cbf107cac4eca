#!/usr/bin/env bash
# Create ./.venv (once) and install ptedge with its [train,dev,ray] extras into it, and
# Chromium (Debian's package; as root, when missing) for tests/test_web.py, whose fixture
# installs examples/web's npm packages. Idempotent: reinstalls Python packages only when
# pyproject.toml changed. Needs python3 >= 3.10 and PyPI (apt for Chromium).
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
  echo "setup: installing ptedge[train,dev,ray] (torch CPU build pinned; a few minutes once)" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[train,dev,ray]"
  echo "$want" > "$stamp"
fi
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "setup: installing chromium (Debian) for tests/test_web.py" >&2
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
