#!/usr/bin/env bash
# The worker's main job on the embedded demo model: sets up .venv (first run: a few
# minutes), builds the tiny random-weight Llama model, and runs the seed's request
# (./test_input.json) through the real handler and the real vLLM engine on the CPU.
# Extra arguments go to src/handler.py, e.g.: scripts/demo.sh --test_input '{"input": {...}}'
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

model_dir=.cache/tiny-llama
if [ ! -f "$model_dir/tiny_model.json" ]; then
    .venv/bin/python -m vllm_worker.tiny_model "$model_dir" >/dev/null
fi

# Settings for the tiny model on a CPU (see the README's settings table); any of them
# can be overridden from the calling environment.
export MODEL_NAME="${MODEL_NAME:-$PWD/$model_dir}"
export DTYPE="${DTYPE:-float32}"
export MAX_MODEL_LEN="${MAX_MODEL_LEN:-2048}"
export KV_CACHE_MEMORY_BYTES="${KV_CACHE_MEMORY_BYTES:-268435456}"
export ENFORCE_EAGER="${ENFORCE_EAGER:-true}"
export STREAM_MIN_INTERVAL_MS="${STREAM_MIN_INTERVAL_MS:-250}"
export RUNPOD_SKIP_AUTO_SYSTEM_CHECKS=true RUNPOD_SKIP_GPU_CHECK=true
exec .venv/bin/python src/handler.py "$@"
