"""``python -m vllm_worker``: the same entry as ``src/handler.py``, for installs without the
source tree (the local endpoint starts the worker this way inside the image)."""

import sys

from vllm_worker.main import run

# vLLM's spawned engine processes re-import this module: nothing may run outside the guard.
if __name__ == "__main__":
    run(sys.argv[1:])
