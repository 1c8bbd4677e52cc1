"""Run one job locally, for real: ``python src/handler.py --test_input '<json>'``.

Reads the job from ``--test_input`` or, failing that, ``./test_input.json`` (both are
``{"input": {...}}`` as RunPod sends it), checks the input before loading the model (a
bad input fails in a second, not after the engine's start-up), runs the job through the
same handler as production, prints every chunk as it is produced and then the final
output. Exit code 0 when the job succeeded, 1 when it failed. An OpenAI-route input
(``{"openai_route": ..., "openai_input": ...}``) runs through the OpenAI routes; a
streamed one prints each output's server-sent-event text.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vllm_worker.engine_types import Handler
from vllm_worker.errors import InvalidInputError, WorkerError
from vllm_worker.openai_input import is_openai_job, parse_openai_job
from vllm_worker.schema import parse_job_input
from vllm_worker.settings import Settings

TEST_INPUT_FILE = Path("test_input.json")
LOCAL_JOB_ID = "local-test"


def run(argv: Sequence[str], settings: Settings) -> int:
    try:
        job = _read_job(argv)
        if is_openai_job(job["input"]):
            parse_openai_job(job["input"], max_n=settings.max_n)
        else:
            parse_job_input(job["input"], max_n=settings.max_n)
    except WorkerError as error:
        print(f"Job failed: {error.kind}: {error.message}", file=sys.stderr)
        return 1

    from vllm_worker.startup import serving

    with serving(settings) as worker:
        final = asyncio.run(_print_chunks(worker.handler, job))
    if isinstance(final, dict) and "error" in final:
        print(f"Job failed: {final['error']}", file=sys.stderr)
        return 1
    print(f"Job result: {json.dumps({'output': final}, ensure_ascii=False)}", flush=True)
    return 0


def _read_job(argv: Sequence[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--test_input", default=None)
    args, _ = parser.parse_known_args(argv)
    if args.test_input is not None:
        source, text = "--test_input", args.test_input
    elif TEST_INPUT_FILE.is_file():
        source, text = str(TEST_INPUT_FILE), TEST_INPUT_FILE.read_text()
    else:
        raise InvalidInputError(
            "no job to run: pass --test_input '{\"input\": {...}}' or put a test_input.json "
            "in the working directory (or set RUNPOD_WEBHOOK_GET_JOB to serve jobs)"
        )
    try:
        job = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidInputError(f"{source} is not valid JSON: {error}") from None
    if not isinstance(job, dict) or "input" not in job:
        raise InvalidInputError(f'{source} must be a JSON object {{"input": {{...}}}}')
    return {"id": LOCAL_JOB_ID, "input": job["input"]}


async def _print_chunks(handler: Handler, job: dict[str, Any]) -> Any:
    """Print each output as it comes (a chunk; for an OpenAI route a response object or
    server-sent-event text); return the last one (the final output or the error)."""
    last: Any = {}
    number = 0
    async for chunk in handler(job):
        if isinstance(chunk, dict) and "error" in chunk:
            return dict(chunk)
        number += 1
        print(f"chunk {number}: {json.dumps(chunk, ensure_ascii=False)}", flush=True)
        last = chunk
    return last
