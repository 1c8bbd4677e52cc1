"""The worker's life cycle: serving, draining after SIGTERM, dead after its engine died.

``Lifecycle.guard(handler)`` wraps the job handler. While the worker serves it passes
every chunk through. After SIGTERM (``begin_shutdown``) the job loop takes no more jobs
(``stop_taking``) and the jobs in flight get ``grace_s`` seconds to finish; then each is
aborted: its vLLM request is cancelled and the job ends FAILED with a message, which the
runpod SDK posts (a job whose task is merely cancelled would never be reported). When the
engine dies (``engine_died``, from ``watch_engine``), the same happens at once, every
later job fails at once, and the process is to exit with code 1 so that the platform
replaces it.

Nothing here imports vLLM or the runpod SDK: ``job_loop`` connects this to the SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from vllm_worker.engine_types import Handler
from vllm_worker.errors import (
    ENGINE_DEAD_MESSAGE,
    EngineError,
    WorkerError,
    job_error,
    openai_job_error,
)
from vllm_worker.openai_input import is_openai_job

log = logging.getLogger(__name__)

ENGINE_WATCH_INTERVAL_S = 0.5


class State(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"  # SIGTERM: no new jobs; those in flight may finish
    ABORTED = "aborted"  # the grace period is over: jobs in flight were aborted
    DEAD = "dead"  # the engine died: every job fails; exit 1


@dataclass
class _Job:
    id: str
    chunks: AsyncIterator[Any]
    openai: bool  # a job of the OpenAI routes: its error is an OpenAI error object
    in_handler: bool = False  # the job's task waits inside the handler (e.g. on vLLM)
    aborted: bool = False  # this object cancelled the job's task


class Lifecycle:
    def __init__(self, grace_s: float, is_engine_dead: Callable[[], bool]) -> None:
        self.grace_s = grace_s
        self._is_engine_dead = is_engine_dead
        self.state = State.SERVING
        self.stop_taking = asyncio.Event()
        # Set once the jobs in flight are aborted (the grace period ended, a second
        # signal, a dead engine): nothing is waited for any more.
        self.aborted = asyncio.Event()
        self._abort_error: WorkerError | None = None
        self._jobs: dict[asyncio.Task[Any], _Job] = {}
        self._timers: set[asyncio.Task[None]] = set()

    @property
    def exit_code(self) -> int:
        """The process's exit code once the job loop has ended."""
        return 1 if self.state is State.DEAD else 0

    @property
    def jobs_in_flight(self) -> int:
        return len(self._jobs)

    # --- what happens to the worker -----------------------------------------------------

    def begin_shutdown(self) -> None:
        """SIGTERM: take no more jobs; abort the jobs in flight after the grace period
        (at once on a second SIGTERM)."""
        if self.state is not State.SERVING:
            if self.state is State.DRAINING:
                log.warning("second stop signal: aborting %d jobs now", len(self._jobs))
                self._abort(State.ABORTED, _shutdown_error())
            return
        log.info(
            "stop signal: taking no more jobs; %d in flight get %g s to finish",
            len(self._jobs),
            self.grace_s,
        )
        self.state = State.DRAINING
        self.stop_taking.set()
        timer = asyncio.get_running_loop().create_task(self._abort_after_grace())
        self._timers.add(timer)
        timer.add_done_callback(self._timers.discard)

    def engine_died(self) -> None:
        if self.state is State.DEAD:
            return
        log.error(
            "the engine died: %d jobs in flight fail; taking no more jobs; exiting with code 1",
            len(self._jobs),
        )
        self._abort(State.DEAD, EngineError(ENGINE_DEAD_MESSAGE))

    async def watch_engine(self, interval_s: float = ENGINE_WATCH_INTERVAL_S) -> None:
        """Notice a dead engine even while no job runs (run as a task beside the job loop)."""
        while not self._is_engine_dead():
            await asyncio.sleep(interval_s)
        self.engine_died()

    async def _abort_after_grace(self) -> None:
        await asyncio.sleep(self.grace_s)
        if self.state is State.DRAINING:
            log.warning("grace period over: aborting %d jobs in flight", len(self._jobs))
            self._abort(State.ABORTED, _shutdown_error())

    def _abort(self, state: State, error: WorkerError) -> None:
        self.state = state
        self._abort_error = error
        self.stop_taking.set()
        self.aborted.set()
        for task, job in self._jobs.items():
            # A job waiting inside the handler is cancelled there (vLLM aborts its request
            # and the guard reports the error); one whose chunk is being posted notices
            # the error when it asks for its next chunk.
            if job.in_handler and not job.aborted:
                job.aborted = True
                task.cancel()

    # --- the handler --------------------------------------------------------------------

    def guard(self, handler: Handler) -> Handler:
        """``handler``, ended with a job error when the worker aborts its jobs."""

        async def guarded(job: dict[str, Any]) -> AsyncIterator[Any]:
            job_id = str(job.get("id", "-"))
            openai = is_openai_job(job.get("input"))
            if self._abort_error is None and self._is_engine_dead():
                self.engine_died()
            if self._abort_error is not None:
                yield _error(self._abort_error, job_id, openai)
                return
            task = asyncio.current_task()
            assert task is not None
            chunks = handler(job)
            state = self._jobs[task] = _Job(job_id, chunks, openai)
            # A job whose task RunPod cancels while its chunk is posted never resumes here.
            task.add_done_callback(self._forget)
            try:
                async for item in self._chunks_until_abort(task, state):
                    yield item
            finally:
                self._jobs.pop(task, None)
                await _close(chunks)

        return guarded

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._jobs.pop(task, None)

    async def _chunks_until_abort(self, task: asyncio.Task[Any], job: _Job) -> AsyncIterator[Any]:
        while True:
            if self._abort_error is not None:
                await _close(job.chunks)  # aborts the job's vLLM request
                yield _error(self._abort_error, job.id, job.openai)
                return
            job.in_handler = True
            try:
                item = await anext(job.chunks)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if not job.aborted or _cancelled_by_others(task):
                    raise  # RunPod stopped the job: nothing is to be posted
                assert self._abort_error is not None
                yield _error(self._abort_error, job.id, job.openai)
                return
            finally:
                job.in_handler = False
            yield item


def _error(error: WorkerError, job_id: str, openai: bool) -> dict[str, str]:
    return openai_job_error(error, job_id) if openai else job_error(error, job_id)


def _shutdown_error() -> EngineError:
    return EngineError(
        "the worker is shutting down (SIGTERM) and the job did not finish within "
        "SHUTDOWN_GRACE_SECONDS: retry the job"
    )


def _cancelled_by_others(task: asyncio.Task[Any]) -> bool:
    """Swallow our own cancel; True if someone else (RunPod's stop) cancelled it too."""
    uncancel = getattr(task, "uncancel", None)  # Python 3.11+
    return uncancel is not None and uncancel() > 0


async def _close(chunks: AsyncIterator[Any]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
