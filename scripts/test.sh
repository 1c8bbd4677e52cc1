#!/usr/bin/env bash
# Sets up .venv (first run: a few minutes) and runs the linters, the type checker, every
# test layer (unit, integration and e2e, on the real vLLM engine's CPU build), then the
# image checks (scripts/test_image.sh: the Docker image built and run for real), which are
# skipped with a one-line reason where no Docker engine can be had.
# Extra arguments go to pytest, e.g.: scripts/test.sh tests/unit -q (a selection of tests
# runs no image checks). SKIP_IMAGE_CHECKS=1 leaves them out (.ci/run runs them itself).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export RUNPOD_SKIP_AUTO_SYSTEM_CHECKS=true RUNPOD_SKIP_GPU_CHECK=true
.venv/bin/ruff check src tests builder bench
.venv/bin/ruff format --check src tests builder bench
.venv/bin/mypy
.venv/bin/lint-imports --no-cache  # the import contracts in pyproject.toml
# Two test modules at a time (a module's tests stay together, in order, on one worker; the
# integration modules all on one, sharing its engine: tests/conftest.py): most of a
# module's time is an engine starting, which uses one core. TEST_WORKERS=0: one at a time.
workers=(-n "${TEST_WORKERS:-2}" --dist loadfile)
[ "${TEST_WORKERS:-2}" = 0 ] && workers=(-p no:xdist)
.venv/bin/python -m pytest "${workers[@]}" "$@"
selection=0
for argument in "$@"; do
    case "$argument" in -*) ;; *) selection=1 ;; esac
done
if [ "${SKIP_IMAGE_CHECKS:-0}" = 1 ]; then
    echo "image checks: left to the caller (SKIP_IMAGE_CHECKS=1)"
elif [ "$selection" = 1 ]; then
    echo "image checks: not run (a selection of tests was given)"
else
    scripts/test_image.sh --optional
fi
