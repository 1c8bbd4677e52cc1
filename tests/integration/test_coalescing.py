"""The default coalescing on the real engine: few chunks, growing gaps, nothing lost.

The session's handler sends a chunk per engine output (``TINY_ENGINE_ENV``); these tests
use the worker's default clock (``STREAM_MIN_INTERVAL_MS``, ``STREAM_INTERVAL_GROWTH``,
``STREAM_MAX_INTERVAL_MS``, ``STREAM_MAX_JOB_BYTES``). No assertion is timed: the chunk
count is bounded by the job's own measured duration.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from helpers import collect, handler_for
from vllm_worker.engine import Engine
from vllm_worker.settings import Settings

T = TypeVar("T")
Run = Callable[[Awaitable[T]], T]

CLOCK_FIELDS = (
    "stream_min_interval_ms",
    "stream_interval_growth",
    "stream_max_interval_ms",
    "stream_max_job_bytes",
)
JOB = {
    "prompt": "Tell me everything about the history of Paris.",
    "sampling_params": {"max_tokens": 300, "ignore_eos": True, "temperature": 0.0},
}


def default_clock(settings: Settings) -> Settings:
    defaults = Settings()
    return settings.model_copy(update={name: getattr(defaults, name) for name in CLOCK_FIELDS})


def max_chunks(duration_s: float, settings: Settings) -> int:
    """At most how many chunks, the final one included, a job of ``duration_s`` can send.

    After the first, each chunk waits at least the job's age x the growth, between the
    shortest and the longest interval: the fastest schedule allowed, counted up to the
    job's duration (every chunk but the final one goes within it).
    """
    shortest = settings.stream_min_interval_ms / 1000
    longest = settings.stream_max_interval_ms / 1000 or float("inf")
    age, chunks = 0.0, 1
    while age <= duration_s:
        age += min(max(settings.stream_interval_growth * age, shortest), longest)
        chunks += 1
    return chunks  # the last one counted went past the duration: the final chunk's place


def test_default_coalescing_sends_few_chunks_and_loses_nothing(
    engine: Engine, settings: Settings, run: Run[Any]
) -> None:
    clocked = default_clock(settings)
    assert clocked.stream_interval_growth > 0  # the default grows its gaps
    handler = handler_for(engine, clocked)
    every_output = handler_for(engine, settings)

    started = time.perf_counter()
    chunks = run(collect(handler, JOB))
    duration_s = time.perf_counter() - started
    reference = run(collect(every_output, JOB))

    assert len(chunks) <= max_chunks(duration_s, clocked), (len(chunks), duration_s)
    # Nothing is lost: greedy decoding, so the same text as a chunk per engine output.
    assert chunks[-1]["text"] == reference[-1]["text"]
    assert chunks[-1]["usage"]["completion_tokens"] == 300
    texts = [chunk["text"][0] for chunk in chunks]
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))


def test_default_coalescing_of_concurrent_delta_jobs_loses_nothing(
    engine: Engine, settings: Settings, run: Run[Any]
) -> None:
    handler = handler_for(engine, default_clock(settings))
    every_output = handler_for(engine, settings)
    job = {**JOB, "stream_mode": "delta"}

    async def concurrently() -> list[list[dict[str, Any]]]:
        return list(await asyncio.gather(*(collect(handler, job) for _ in range(8))))

    reference = run(collect(every_output, job))
    expected = "".join(chunk["text"][0] for chunk in reference)
    for chunks in run(concurrently()):
        assert "".join(chunk["text"][0] for chunk in chunks) == expected
        assert chunks[-1]["usage"]["completion_tokens"] == 300
