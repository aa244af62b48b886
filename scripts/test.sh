#!/usr/bin/env bash
# The whole test suite: set-up, lint, format check, type check, then every test (slow, DDP and Triton-interpreter
# tests included; GPU tests skip themselves without CUDA). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
"$PY" -m ruff check .
"$PY" -m ruff format --check .
"$PY" -m mypy
# pytest exits non-zero on any failure, and with 5 when it collects no test: both fail this script.
"$PY" -m pytest -p no:cacheprovider --timeout=900 "$@"
