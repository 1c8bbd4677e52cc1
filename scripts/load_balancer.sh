#!/usr/bin/env bash
# The worker as a load-balancing endpoint's server on http://127.0.0.1:8000, serving the
# demo model (scripts/demo_env.sh): sets up .venv, builds the model once, starts the
# server (ENDPOINT_TYPE=load_balancer). /ping answers 204 until the engine serves, then
# 200. Ctrl-C (or SIGTERM) drains it and stops. PORT and any setting can be overridden.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/demo_env.sh
export ENDPOINT_TYPE=load_balancer HOST="${HOST:-127.0.0.1}" PORT="${PORT:-8000}"
exec .venv/bin/python -u src/handler.py
