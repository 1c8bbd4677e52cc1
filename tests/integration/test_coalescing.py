"""The default coalescing on the real engine: few chunks, growing gaps, nothing lost.

The session's handler sends a chunk per engine output (``TINY_ENGINE_ENV``); these tests
use the worker's default clock (``STREAM_MIN_INTERVAL_MS``, ``STREAM_INTERVAL_GROWTH``,
``STREAM_DELTA_MAX_INTERVAL_MS``). No assertion is timed: the chunk count is bounded by
the job's own measured duration.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from helpers import collect, handler_for
from vllm_worker.engine import Engine
from vllm_worker.settings import Settings

T = TypeVar("T")
Run = Callable[[Awaitable[T]], T]

CLOCK_FIELDS = ("stream_min_interval_ms", "stream_interval_growth", "stream_delta_max_interval_ms")
JOB = {
    "prompt": "Tell me everything about the history of Paris.",
    "sampling_params": {"max_tokens": 300, "ignore_eos": True, "temperature": 0.0},
}


def default_clock(settings: Settings) -> Settings:
    defaults = Settings()
    return settings.model_copy(update={name: getattr(defaults, name) for name in CLOCK_FIELDS})


def max_chunks(duration_s: float, min_interval_s: float, growth: float) -> float:
    """At most how many chunks, the final one included, a job of ``duration_s`` can send.

    The k-th chunk after the first (k >= 1) goes at an age of at least
    ``min_interval_s * (1 + growth) ** (k - 1)``, and every chunk but the final one goes
    within the job's duration.
    """
    if duration_s <= min_interval_s:
        return 2 + 1
    return 3 + math.log(duration_s / min_interval_s, 1 + growth)


def test_default_coalescing_sends_logarithmically_many_chunks(
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

    bound = max_chunks(
        duration_s, clocked.stream_min_interval_ms / 1000, clocked.stream_interval_growth
    )
    assert len(chunks) <= bound, (len(chunks), duration_s)
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
