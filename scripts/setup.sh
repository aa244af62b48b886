#!/usr/bin/env bash
# Creates .venv (if needed) and installs the package with its test and Triton extras.
# torch is pinned to the CPU build through constraints-cpu.txt so a fresh machine does not pull the CUDA wheels.
# Re-runs are cheap: the install is skipped while pyproject.toml and the constraints are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.lightning_gradflow-installed"
want="$(cat pyproject.toml constraints-cpu.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -c constraints-cpu.txt "torch==2.13.0"
  "$VENV/bin/python" -m pip install --quiet -c constraints-cpu.txt -e ".[dev,triton]"
  echo "$want" > "$stamp"
fi
