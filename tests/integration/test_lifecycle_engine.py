"""The engine side of the life cycle, on the real engine: aborts and the load admission reads."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest

from helpers import until_no_request
from vllm_worker.admission import allowed_concurrency
from vllm_worker.engine import Engine
from vllm_worker.engine_types import EngineLoad, Handler
from vllm_worker.streaming import Chunk

Run = Callable[..., Any]


def test_a_job_cancelled_while_its_chunk_is_posted_is_aborted_at_once(
    run: Run, handler: Handler, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """RunPod's SDK awaits the post of each chunk outside the handler: a stop that comes
    then leaves the handler suspended at a yield. Its vLLM request must still end now,
    not when the garbage collector closes the suspended generator."""
    job = {
        "id": "cancelled-while-posting",
        "input": {
            "prompt": "A long one:",
            "sampling_params": {"max_tokens": 400, "ignore_eos": True},
        },
    }
    kept: list[Any] = []  # the handler's generator, alive: nothing may close it
    received: list[Chunk] = []
    posting = asyncio.Event()

    async def sdk_job() -> None:
        chunks = handler(job)
        kept.append(chunks)
        async for chunk in chunks:
            received.append(chunk)
            posting.set()
            await asyncio.Event().wait()  # a post that never ends

    async def scenario() -> int:
        task = asyncio.ensure_future(sdk_job())
        await posting.wait()
        assert engine.client.get_num_unfinished_requests() == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await until_no_request(engine)

    caplog.set_level(logging.INFO, logger="vllm_worker.engine")
    assert run(scenario()) == 0
    # Aborted, not finished (400 tokens could also end in the time allowed above).
    assert any(
        "(its job's task ended)" in record.getMessage()
        and "cancelled-while-posting" in record.getMessage()
        for record in caplog.records
    ), [record.getMessage() for record in caplog.records]
    assert len(received) == 1
    assert kept[0].ag_running is False  # still suspended at its yield, never closed


def test_the_engine_load_moves_under_load(run: Run, engine: Engine) -> None:
    """What admission reads: running and waiting requests and KV-cache use, per step."""
    from vllm_worker.engine_types import GenerationRequest
    from vllm_worker.schema import SamplingParamsInput

    seen: list[EngineLoad] = []

    async def one(number: int) -> None:
        request = GenerationRequest(
            request_id=f"load-{number}",
            prompt_token_ids=engine.tokenize(f"Request {number} of many, a longer prompt here"),
            sampling=SamplingParamsInput(ignore_eos=True),
            max_tokens=16,
            stream=True,
        )
        async for _update in engine.generate(request):
            if (load := engine.load()) is not None:
                seen.append(load)

    async def many() -> None:
        # More prompt tokens than one engine step takes: some requests must wait.
        await asyncio.gather(*(one(number) for number in range(300)))

    run(many(), timeout=300)
    assert max(load.running for load in seen) > 1
    assert max(load.waiting for load in seen) > 0
    assert max(load.kv_cache_usage for load in seen) > 0.0
    busiest = max(seen, key=lambda load: load.waiting)
    # Admission would have taken no new job then; it takes them again once all are done.
    assert allowed_concurrency(busiest, held=10, max_concurrency=64) == 10
    assert allowed_concurrency(engine.load(), held=0, max_concurrency=64) == 64
    print(
        f"engine load under 300 requests: running up to {max(load.running for load in seen)}, "
        f"waiting up to {busiest.waiting}, KV cache up to "
        f"{max(load.kv_cache_usage for load in seen):.1%}"
    )
