"""The runpod SDK's production job loop, with the worker's life cycle and admission.

``serve`` runs what ``runpod.serverless.start`` runs in production (runpod 1.12.0's
``worker.run_worker``: the fitness checks, the heartbeat, a ``JobScaler``), with a
``JobScaler`` subclass that changes three things and keeps the SDK's job handling,
streaming, posting and per-job cancellation as they are:

- Signals: SIGTERM/SIGINT start ``Lifecycle.begin_shutdown`` (the SDK's own handler
  waits for jobs in flight without a deadline).
- Stopping: once the life cycle stops taking jobs, the take loop polls no more; it waits
  until the jobs it holds are done and then ends the loop. A take poll already under way
  is never cut off (the platform may have handed it a job), so no job is lost: what it
  brings still runs, or fails at once when the engine is dead. The job-stop poll, which
  would hold the exit for up to 90 s, ends with the loop.
- Admission: the SDK replaces its job queue whenever ``concurrency_modifier`` returns a
  new value, and waits for every job in flight to finish first, so a value that follows
  the engine's load would stall the take loop. Here the queue is made once, for
  ``MAX_CONCURRENCY`` jobs, and the modifier's value only bounds how many are taken.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from runpod.serverless.modules import rp_job
from runpod.serverless.modules.rp_scale import JobScaler
from runpod.serverless.modules.worker_state import JobsProgress

from vllm_worker.admission import allowed_concurrency
from vllm_worker.lifecycle import Handler, Lifecycle
from vllm_worker.settings import Settings

if TYPE_CHECKING:
    from runpod.http_client import ClientSession

    from vllm_worker.engine import Engine

log = logging.getLogger(__name__)

# The runpod SDK's names for log levels.
_SDK_LOG_LEVELS = {"CRITICAL": "ERROR", "WARNING": "WARN"}

DRAIN_POLL_S = 0.2  # how often the stopped take loop checks whether its jobs are done


def serve(engine: Engine, settings: Settings, handler: Handler) -> int:
    """Run the job loop until SIGTERM or the engine's death; the process's exit code."""
    from runpod.serverless import worker as sdk_worker
    from runpod.serverless.modules.rp_fitness import run_fitness_checks
    from runpod.serverless.modules.rp_logger import RunPodLogger
    from runpod.serverless.modules.worker_state import PingJobMirror

    RunPodLogger().set_level(
        settings.runpod_log_level or _SDK_LOG_LEVELS.get(settings.log_level, settings.log_level)
    )
    lifecycle = Lifecycle(settings.shutdown_grace_seconds, engine.is_dead)
    progress = JobsProgress()
    config: dict[str, Any] = {
        "handler": lifecycle.guard(handler),
        "return_aggregate_stream": True,
        "concurrency_modifier": _admission(engine, progress, settings.max_concurrency),
        "rp_args": {},
    }
    # As runpod.serverless.worker.run_worker does (runpod 1.12.0), with our scaler.
    asyncio.run(run_fitness_checks())
    mirror = PingJobMirror()
    progress.set_mirror(mirror)
    sdk_worker.heartbeat.start_ping(mirror)
    LifecycleScaler(config, lifecycle, settings.max_concurrency).start()
    log.info("job loop ended (%s); exit code %d", lifecycle.state.value, lifecycle.exit_code)
    return lifecycle.exit_code


def _admission(engine: Engine, progress: Any, max_concurrency: int) -> Callable[[int], int]:
    """The ``concurrency_modifier``: ``allowed_concurrency`` of the engine's load and of
    the jobs the SDK holds; logs when the engine becomes full and when it has room again."""
    full = False

    def concurrency_modifier(_current: int) -> int:
        nonlocal full
        load, held = engine.load(), progress.get_job_count()
        allowed = allowed_concurrency(load, held, max_concurrency)
        if (allowed < max_concurrency) != full:
            full = not full
            log.info(
                "%s: %s (holding %d jobs)",
                "engine full, taking no new job" if full else "engine has room again",
                load,
                held,
            )
        return allowed

    return concurrency_modifier


class LifecycleScaler(JobScaler):  # type: ignore[misc]
    def __init__(self, config: dict[str, Any], lifecycle: Lifecycle, max_jobs: int) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.jobs_queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=max_jobs)
        self.current_concurrency = max_jobs
        self.jobs_fetcher = self._take
        self.stop_signals_fetcher = self._stops

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        watcher = loop.create_task(self.lifecycle.watch_engine())
        try:
            await super().run()
        finally:
            watcher.cancel()

    def _on_signal(self, signum: int) -> None:
        log.info("%s received", signal.Signals(signum).name)
        self.lifecycle.begin_shutdown()

    async def set_scale(self) -> None:
        # No queue swap (see the module's docstring): the value bounds the take only.
        self.current_concurrency = self.concurrency_modifier(self.current_concurrency)

    async def _take(self, session: ClientSession, num_jobs: int) -> Any:
        if not self.lifecycle.stop_taking.is_set():
            return await rp_job.get_job(session, num_jobs)
        # Called only between polls, with every job taken so far queued: ending the loop
        # here loses none of them.
        while self.current_occupancy() > 0:
            await asyncio.sleep(DRAIN_POLL_S)
        self.kill_worker()
        return None

    async def _stops(self, session: ClientSession) -> list[str]:
        poll = asyncio.ensure_future(rp_job.get_stop_signals(session))
        ended = asyncio.ensure_future(self._shutdown_event.wait())
        await asyncio.wait({poll, ended}, return_when=asyncio.FIRST_COMPLETED)
        ended.cancel()
        if poll.done():
            return list(poll.result())
        poll.cancel()
        return []
