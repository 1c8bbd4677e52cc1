#!/usr/bin/env bash
# Sets up .venv (first run: a few minutes) and runs the linters, the type checker and
# every test layer (unit, integration and e2e, on the real vLLM engine's CPU build).
# Extra arguments go to pytest, e.g.: scripts/test.sh tests/unit -q
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export RUNPOD_SKIP_AUTO_SYSTEM_CHECKS=true RUNPOD_SKIP_GPU_CHECK=true
.venv/bin/ruff check src tests builder bench
.venv/bin/ruff format --check src tests builder bench
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
