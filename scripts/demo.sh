#!/usr/bin/env bash
# The main job: set-up, then a short real training run that logs the engine's statistics to TensorBoard.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m lightning_gradflow.demo "$@"
