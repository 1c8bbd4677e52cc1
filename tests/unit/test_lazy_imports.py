"""Production mode imports the worker's modules before it needs the engine: none of them
may import vLLM, torch, transformers or runpod (a fast cold start, and input errors that
cost nothing). Checked in a fresh interpreter, as the cold-start benchmark measures it."""

from __future__ import annotations

import subprocess
import sys

from bench.cold_start import HEAVY_MODULES, WORKER_MODULES

# Load-balancing mode answers its health check before the engine: its server's modules
# import nothing heavy either.
LOAD_BALANCER_MODULES = ("vllm_worker.http_gate", "vllm_worker.http_server")


def test_the_worker_modules_import_nothing_heavy() -> None:
    modules = [*WORKER_MODULES, *LOAD_BALANCER_MODULES]
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"print(','.join(m for m in {list(HEAVY_MODULES)!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "", f"imported at once: {result.stdout.strip()}"
