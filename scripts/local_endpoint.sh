#!/usr/bin/env bash
# A local RunPod endpoint on http://127.0.0.1:8000/v2/local serving the demo model
# (scripts/demo_env.sh): sets up .venv, builds the model once, starts the endpoint and
# the worker behind it (in RunPod's production mode). Ctrl-C stops both. Extra arguments
# go to `python -m vllm_worker.local_endpoint` (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/demo_env.sh
exec .venv/bin/python -m vllm_worker.local_endpoint "$@"
