#!/usr/bin/env bash
# Create/update the virtual environment at .venv and install steerx-lens with every extra, at the
# exact versions of constraints.txt. Re-installs only when pyproject.toml, constraints.txt or
# this script changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv" >&2
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.steerx-installed
want=$(cat pyproject.toml constraints.txt scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[bootstrap] installing steerx-lens and its pinned dependencies (a few minutes, once)" >&2
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
  # For the interop parity tests: both declare pins (transformers<5, numpy<2) that the parts
  # steerx_lens uses do not need, so they are installed without their dependencies.
  .venv/bin/python -m pip install --quiet --no-deps steering-vectors==0.12.2 repeng==0.4.0
  echo "$want" > "$stamp"
fi
