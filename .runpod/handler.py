"""The RunPod Hub's ``handler.py``: the worker's one entry point, ``vllm_worker.main``.

The Hub's publishing guide asks for a ``handler.py`` in the repository's root or in
``.runpod/``; this worker's entry script is ``src/handler.py`` (the image runs that one).
This file is the same two lines, so that ``python .runpod/handler.py`` behaves exactly as
``python src/handler.py`` (run modes in the README) and no logic lives here.
"""

import sys

from vllm_worker.main import run

# vLLM starts its engine processes with `spawn`, which re-imports this script in each
# child: everything must stay behind this guard.
if __name__ == "__main__":
    run(sys.argv[1:])
