"""The life cycle's guard around the handler, with a stand-in handler (no engine).

The real engine and the runpod SDK are in tests/e2e/test_lifecycle.py; these pin down the
guard's own rules: what a job sees when the worker drains, aborts or loses its engine.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from vllm_worker.errors import ENGINE_DEAD_MESSAGE
from vllm_worker.lifecycle import Lifecycle, State


class StandIn:
    """A handler that yields one chunk, then waits inside itself until ``finish`` is set."""

    def __init__(self) -> None:
        self.finish = asyncio.Event()
        self.calls = 0
        self.cancelled = 0
        self.closed = 0

    async def __call__(self, job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        self.calls += 1
        try:
            yield {"text": [f"{job['id']}: first"]}
            try:
                await self.finish.wait()  # as the handler waits on vLLM
            except asyncio.CancelledError:
                self.cancelled += 1  # where vLLM aborts the request
                raise
            yield {"text": ["done"], "finish_reason": ["stop"]}
        finally:
            self.closed += 1


async def run_job(lifecycle: Lifecycle, handler: StandIn, job_id: str) -> list[Any]:
    return [chunk async for chunk in lifecycle.guard(handler)({"id": job_id, "input": {}})]


async def until(predicate: Any) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never met")


def test_serving_passes_every_chunk_through() -> None:
    async def scenario() -> None:
        lifecycle, handler = Lifecycle(1.0, lambda: False), StandIn()
        handler.finish.set()
        chunks = await run_job(lifecycle, handler, "a")
        assert chunks == [{"text": ["a: first"]}, {"text": ["done"], "finish_reason": ["stop"]}]
        assert (lifecycle.state, lifecycle.exit_code, lifecycle.jobs_in_flight) == (
            State.SERVING,
            0,
            0,
        )

    asyncio.run(scenario())


def test_sigterm_lets_a_job_finish_within_the_grace_period() -> None:
    async def scenario() -> None:
        lifecycle, handler = Lifecycle(30.0, lambda: False), StandIn()
        job = asyncio.create_task(run_job(lifecycle, handler, "a"))
        await until(lambda: lifecycle.jobs_in_flight == 1)
        lifecycle.begin_shutdown()
        assert lifecycle.stop_taking.is_set()
        assert lifecycle.state is State.DRAINING
        handler.finish.set()
        assert (await job)[-1] == {"text": ["done"], "finish_reason": ["stop"]}
        assert handler.cancelled == 0
        assert lifecycle.exit_code == 0

    asyncio.run(scenario())


def test_after_the_grace_period_a_job_waiting_on_the_engine_is_aborted_and_fails() -> None:
    async def scenario() -> None:
        lifecycle, handler = Lifecycle(0.01, lambda: False), StandIn()
        job = asyncio.create_task(run_job(lifecycle, handler, "a"))
        await until(lambda: lifecycle.jobs_in_flight == 1)
        lifecycle.begin_shutdown()
        chunks = await job  # never finished by the handler itself
        assert chunks[0] == {"text": ["a: first"]}
        error = chunks[-1]["error"]
        assert error.startswith("engine_error: the worker is shutting down (SIGTERM)")
        assert "SHUTDOWN_GRACE_SECONDS" in error
        assert (handler.cancelled, handler.closed) == (1, 1)  # its request was aborted
        assert lifecycle.state is State.ABORTED
        assert lifecycle.exit_code == 0
        # A job that arrives after that fails at once, without reaching the handler.
        late = await run_job(lifecycle, handler, "late")
        assert late == [{"error": error}]
        assert handler.calls == 1

    asyncio.run(scenario())


def test_an_abort_while_the_sdk_posts_a_chunk_fails_the_job_at_its_next_chunk() -> None:
    async def scenario() -> None:
        lifecycle, handler = Lifecycle(0.0, lambda: False), StandIn()
        chunks = lifecycle.guard(handler)({"id": "a", "input": {}})
        first = await anext(chunks)  # the SDK now posts it: the job waits outside
        lifecycle.begin_shutdown()
        await asyncio.sleep(0.01)  # the grace period (0 s) ends
        assert lifecycle.state is State.ABORTED
        nxt = await anext(chunks)
        assert first == {"text": ["a: first"]}
        assert nxt["error"].startswith("engine_error: the worker is shutting down")
        assert handler.closed == 1  # closed: vLLM aborts on GeneratorExit
        with pytest.raises(StopAsyncIteration):
            await anext(chunks)

    asyncio.run(scenario())


def test_a_second_stop_signal_aborts_at_once() -> None:
    async def scenario() -> None:
        lifecycle, handler = Lifecycle(3600.0, lambda: False), StandIn()
        job = asyncio.create_task(run_job(lifecycle, handler, "a"))
        await until(lambda: lifecycle.jobs_in_flight == 1)
        lifecycle.begin_shutdown()
        lifecycle.begin_shutdown()
        assert "error" in (await job)[-1]
        assert handler.cancelled == 1

    asyncio.run(scenario())


def test_runpods_own_cancel_is_not_turned_into_an_error() -> None:
    """A job RunPod stops (cancel, timeout) must end CANCELLED: nothing may be posted."""

    async def scenario() -> None:
        lifecycle, handler = Lifecycle(1.0, lambda: False), StandIn()
        job = asyncio.create_task(run_job(lifecycle, handler, "a"))
        await until(lambda: lifecycle.jobs_in_flight == 1)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        assert handler.cancelled == 1
        assert lifecycle.jobs_in_flight == 0

    asyncio.run(scenario())


def test_a_dead_engine_fails_the_jobs_in_flight_and_every_later_job() -> None:
    async def scenario() -> None:
        dead = [False]
        lifecycle, handler = Lifecycle(3600.0, lambda: dead[0]), StandIn()
        watcher = asyncio.create_task(lifecycle.watch_engine(interval_s=0.001))
        job = asyncio.create_task(run_job(lifecycle, handler, "a"))
        await until(lambda: lifecycle.jobs_in_flight == 1)
        dead[0] = True
        await watcher
        assert (await job)[-1] == {"error": f"engine_error: {ENGINE_DEAD_MESSAGE}"}
        assert lifecycle.stop_taking.is_set()
        assert (lifecycle.state, lifecycle.exit_code) == (State.DEAD, 1)
        assert await run_job(lifecycle, handler, "b") == [
            {"error": f"engine_error: {ENGINE_DEAD_MESSAGE}"}
        ]
        assert handler.calls == 1
        # A stop signal after that changes nothing: the exit code stays 1.
        lifecycle.begin_shutdown()
        assert lifecycle.exit_code == 1

    asyncio.run(scenario())


def test_a_job_that_finds_the_engine_dead_notices_it_without_the_watcher() -> None:
    async def scenario() -> None:
        lifecycle, handler = Lifecycle(1.0, lambda: True), StandIn()
        assert await run_job(lifecycle, handler, "a") == [
            {"error": f"engine_error: {ENGINE_DEAD_MESSAGE}"}
        ]
        assert (handler.calls, lifecycle.exit_code) == (0, 1)

    asyncio.run(scenario())


def test_an_openai_job_fails_with_an_openai_error_object() -> None:
    async def scenario() -> None:
        lifecycle, handler = Lifecycle(1.0, lambda: True), StandIn()
        job = {"id": "o", "input": {"openai_route": "/v1/completions", "openai_input": {}}}
        (chunk,) = [chunk async for chunk in lifecycle.guard(handler)(job)]
        body = json.loads(chunk["error"])["error"]
        assert body["message"] == f"engine_error: {ENGINE_DEAD_MESSAGE}"
        assert body["code"] == 500

    asyncio.run(scenario())
