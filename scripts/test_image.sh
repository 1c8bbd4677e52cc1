#!/usr/bin/env bash
# Builds the project's real Dockerfile on a local stand-in for vLLM's image and runs the
# image through its checks (tests/image/test_image.py): the baked and the Hub's default
# build, local test mode offline, production mode against the local endpoint, docker stop,
# secrets, the build cache. One line per check, then a summary and the figures.
#
# The Docker engine: the one `docker info` reaches; else, as root on a Debian-like machine,
# Debian's docker.io, started here on its own socket and stopped at the end
# (scripts/docker_engine.sh). No engine at all: it fails, or with --optional (as
# scripts/test.sh calls it) skips with a one-line reason.
# Usage: scripts/test_image.sh [--optional] [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
optional=0
if [ "${1:-}" = --optional ]; then
    optional=1
    shift
fi
# shellcheck source=scripts/docker_engine.sh
source scripts/docker_engine.sh
trap docker_engine_down EXIT
if ! docker_engine_up; then
    if [ "$optional" = 1 ]; then
        echo "image checks skipped: $DOCKER_ENGINE_WHY"
        exit 0
    fi
    echo "image checks cannot run: $DOCKER_ENGINE_WHY" >&2
    exit 1
fi
scripts/setup.sh
export VLLM_WORKER_IMAGE_CHECKS=1 VLLM_WORKER_DOCKER_CLI="$DOCKER_CLI"
export RUNPOD_SKIP_AUTO_SYSTEM_CHECKS=true RUNPOD_SKIP_GPU_CHECK=true
.venv/bin/python -m pytest tests/image -v -p no:cacheprovider "$@"
