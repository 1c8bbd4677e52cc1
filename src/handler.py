"""RunPod entry point: ``python -u src/handler.py`` (see the README for the run modes)."""

import sys

from vllm_worker.main import run

# vLLM starts its engine processes with `spawn`, which re-imports this script in each
# child: everything must stay behind this guard.
if __name__ == "__main__":
    run(sys.argv[1:])
