"""The runpod SDK's production job loop, driven by events, with the worker's life cycle.

``serve`` runs what ``runpod.serverless.start`` runs in production (runpod 1.12.0's
``worker.run_worker``: the fitness checks, the heartbeat, a ``JobScaler``), with a
``JobScaler`` subclass. It keeps the SDK's job handling as it is: ``handle_job`` (the
handler's chunks posted to job-stream, the aggregate or the error to job-done, the job's
bookkeeping), the per-job stop (``stop_job``: RunPod's cancel and execution timeout), the
long-poll job-take and batch job-take requests. It changes when things happen:

- **A job starts as soon as it is taken.** The SDK's ``run_jobs`` starts queued jobs on a
  0.1 s tick; here the queue is awaited.
- **A full worker asks for jobs again as soon as it has room**: when a job ends, or when
  the engine's load (``admission``) says it has room again. The SDK's ``get_jobs`` sleeps
  a full second whenever it is full. While full, nothing polls: no job-take request.
- **The stop channel is asked again at once after a held (long-poll) answer.** The SDK
  pauses a second after every empty answer, during which a cancel waits; here only an
  answer that came at once (a server that does not hold polls) waits out that second.
- **Admission**: the SDK replaces its job queue whenever ``concurrency_modifier`` returns
  a new value, and waits for every job in flight to finish first, so a value that follows
  the engine's load would stall it. Here the queue is made once, for ``MAX_CONCURRENCY``
  jobs, and the modifier's value only bounds how many are taken.
- **Signals and stopping**: SIGTERM/SIGINT start ``Lifecycle.begin_shutdown`` (the SDK's
  own handler waits for jobs in flight without a deadline). Once the life cycle stops
  taking jobs, no new take request is made; one under way is waited for while jobs taken
  still run, up to the grace period (the platform may have handed it a job, which still
  runs, or fails at once when the engine is dead), then cut off (at once when none runs),
  so that a held long poll cannot keep the worker past the platform's SIGKILL. The loop
  ends once every job taken is posted. The held job-stop poll ends with it.

Every SDK internal relied on here is listed in ``SDK_INTERNALS``; a unit test pins their
source to runpod 1.12.0's, so that an upgrade that changes them is noticed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from runpod.http_client import TooManyRequests
from runpod.serverless.modules import rp_job
from runpod.serverless.modules.rp_scale import JobScaler
from runpod.serverless.modules.worker_state import JobsProgress

from vllm_worker.admission import allowed_concurrency, engine_is_full
from vllm_worker.engine_types import EngineLoad, Handler
from vllm_worker.lifecycle import Lifecycle
from vllm_worker.settings import Settings

if TYPE_CHECKING:
    from runpod.http_client import ClientSession

    from vllm_worker.engine import Engine

log = logging.getLogger(__name__)

# The runpod SDK's names for log levels.
_SDK_LOG_LEVELS = {"CRITICAL": "ERROR", "WARNING": "WARN"}

# The SDK's pauses that are kept: after a 429 (its debounce), and the shortest time
# between two job-stop polls (so that a server that does not hold polls is not spun on).
TOO_MANY_REQUESTS_PAUSE_S = 5.0
STOP_POLL_FLOOR_S = 1.0
# After a failed job-take (the control plane unreachable, a bad answer): the SDK retries
# at once, thousands of times a second; here the pause doubles from the first to the last.
TAKE_ERROR_PAUSES_S = (0.1, 5.0)

# What this module relies on in runpod 1.12.0 beyond its public API: ``JobScaler``'s
# attributes set in ``__init__`` (``_shutdown_event``, ``job_progress``, ``jobs_queue``,
# ``jobs_tasks``, ``current_concurrency``, ``concurrency_modifier``,
# ``jobs_fetcher_timeout``, ``stop_signals_fetcher_timeout``) and the methods below.
SDK_INTERNALS: dict[str, Callable[..., Any]] = {
    "JobScaler.__init__": JobScaler.__init__,
    "JobScaler.start": JobScaler.start,
    "JobScaler.run": JobScaler.run,
    "JobScaler.handle_job": JobScaler.handle_job,
    "JobScaler.stop_job": JobScaler.stop_job,
    "JobScaler.kill_worker": JobScaler.kill_worker,
    "JobScaler.is_alive": JobScaler.is_alive,
    "rp_job.get_job": rp_job.get_job,
    "rp_job.get_stop_signals": rp_job.get_stop_signals,
    "rp_job._job_stop_url": rp_job._job_stop_url,
    "rp_job.handle_job": rp_job.handle_job,
}

TakeJobs = Callable[["ClientSession", int], Awaitable[list[dict[str, Any]] | None]]
FetchStops = Callable[["ClientSession"], Awaitable[list[str]]]


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
    scaler = EventDrivenScaler(config, lifecycle, settings.max_concurrency)
    engine.add_load_listener(_room_when_not_full(scaler.room_changed))
    scaler.start()
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


def _room_when_not_full(room_changed: Callable[[], None]) -> Callable[[EngineLoad], None]:
    """An engine load listener that calls ``room_changed`` when the engine stops being
    full (once per change, not per engine step)."""
    full = False

    def on_load(load: EngineLoad) -> None:
        nonlocal full
        was_full, full = full, engine_is_full(load)
        if was_full and not full:
            room_changed()

    return on_load


class EventDrivenScaler(JobScaler):  # type: ignore[misc]
    """The SDK's ``JobScaler`` with event-driven take, start and stop loops (see the
    module's docstring). ``take`` and ``stops`` are the SDK's job-take and job-stop
    requests (a scripted platform in tests)."""

    def __init__(
        self,
        config: dict[str, Any],
        lifecycle: Lifecycle,
        max_jobs: int,
        *,
        take: TakeJobs = rp_job.get_job,
        stops: FetchStops = rp_job.get_stop_signals,
    ) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.jobs_queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=max_jobs)
        self.current_concurrency = max_jobs
        self._take = take
        self._stops = stops
        # Set when there may be room for another job: a job ended, the engine had room.
        self._room = asyncio.Event()

    def room_changed(self) -> None:
        self._room.set()

    def current_occupancy(self) -> int:
        # Every job taken is in the SDK's job progress from its take until its post: the
        # SDK also adds the queued ones, counting a job twice until it starts.
        return int(self.job_progress.get_job_count())

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

    # --- taking jobs ----------------------------------------------------------------------

    async def get_jobs(self, session: ClientSession) -> None:
        """Take jobs whenever there is room; once stopping, end the loop when every job
        taken has been posted."""
        pauses = _Backoff(*TAKE_ERROR_PAUSES_S)
        while (wanted := await self._wait_for_room()) > 0:
            try:
                jobs = await asyncio.wait_for(
                    self._take_unless_aborted(session, wanted), timeout=self.jobs_fetcher_timeout
                )
            except TooManyRequests:
                log.warning("job-take: too many requests; again in %g s", TOO_MANY_REQUESTS_PAUSE_S)
                await self._pause(TOO_MANY_REQUESTS_PAUSE_S, self.lifecycle.stop_taking)
                continue
            except asyncio.TimeoutError:
                continue  # a long poll the platform did not answer: ask again
            except Exception as error:  # the control plane unreachable, a bad answer
                pause = pauses.next()
                log.error(
                    "job-take failed (%s: %s); again in %g s", type(error).__name__, error, pause
                )
                await self._pause(pause, self.lifecycle.stop_taking)
                continue
            pauses.reset()
            for job in jobs or ():
                log.info("job %s taken", job["id"])
                self.job_progress.add(job)
                await self.jobs_queue.put(job)
        await self._until_no_job()
        self.kill_worker()

    async def _take_unless_aborted(
        self, session: ClientSession, wanted: int
    ) -> list[dict[str, Any]] | None:
        """A job-take request, cut off once stopping leaves nothing to wait for: after a
        stop signal, a take under way may still bring a job (the platform may have handed
        it out), so it is waited for while jobs taken still run, up to the grace period;
        then, or at once when none runs, it is cut off, so that a held long poll cannot
        keep the worker past the platform's SIGKILL."""
        take = asyncio.ensure_future(self._take(session, wanted))
        await _first_of(take, self._nothing_left_to_wait_for())
        if take.done():
            return take.result()
        take.cancel()
        log.info("stopping: the job-take request under way is cut off")
        return None

    async def _nothing_left_to_wait_for(self) -> None:
        """Once stopping: until the jobs in flight are aborted or none is left."""
        await self.lifecycle.stop_taking.wait()
        await _first_of(self.lifecycle.aborted.wait(), self._until_no_job())

    async def _wait_for_room(self) -> int:
        """How many jobs to ask for, once there is room for one; 0 once stopping."""
        while self.is_alive() and not self.lifecycle.stop_taking.is_set():
            self._room.clear()  # before looking: a change from now on wakes the wait
            self.current_concurrency = self.concurrency_modifier(self.current_concurrency)
            wanted = int(self.current_concurrency) - self.current_occupancy()
            if wanted > 0:
                return wanted
            await _first_of(
                self._room.wait(), self.lifecycle.stop_taking.wait(), self._shutdown_event.wait()
            )
        return 0

    async def _until_no_job(self) -> None:
        """Wait until every job taken has been posted (each end sets ``_room``)."""
        while True:
            self._room.clear()
            if self.current_occupancy() == 0:
                return
            await self._room.wait()

    # --- running jobs -----------------------------------------------------------------------

    async def run_jobs(self, session: ClientSession) -> None:
        """Start each job the moment it is queued; at the end, wait for those running."""
        running: set[asyncio.Task[None]] = set()
        while (job := await self._next_job()) is not None:
            task = asyncio.create_task(self.handle_job(session, job))
            self.jobs_tasks[job["id"]] = task
            running.add(task)
            task.add_done_callback(running.discard)
            # After the SDK's handle_job has forgotten the job: there is room for another.
            task.add_done_callback(lambda _task: self.room_changed())
        # As the SDK does: a stopped job's CancelledError is expected, any other is logged.
        for result in await asyncio.gather(*running, return_exceptions=True):
            if isinstance(result, Exception):
                log.error("a job's task failed during the shutdown: %r", result)

    async def _next_job(self) -> dict[str, Any] | None:
        """The next job taken, as soon as it is queued; None once the loop has ended."""
        while self.is_alive() or not self.jobs_queue.empty():
            if not self.jobs_queue.empty():
                return self.jobs_queue.get_nowait()
            getter = asyncio.ensure_future(self.jobs_queue.get())
            await _first_of(getter, self._shutdown_event.wait())
            if getter.done():
                return getter.result()
            getter.cancel()  # never took an item: Queue.get removes it only on return
        return None

    # --- the stop channel ---------------------------------------------------------------------

    async def monitor_stop_signals(self, session: ClientSession) -> None:
        """Stop the jobs RunPod stops (cancel, execution timeout), polling job-stop."""
        if self._stops is rp_job.get_stop_signals and rp_job._job_stop_url() is None:
            log.warning("no job-stop URL can be derived from the job-take URL: no per-job stop")
            return
        loop = asyncio.get_running_loop()
        while self.is_alive():
            asked_at = loop.time()
            try:
                job_ids = await asyncio.wait_for(
                    self._poll_stops(session), timeout=self.stop_signals_fetcher_timeout
                )
                for job_id in job_ids:
                    await self.stop_job(job_id)
                if not job_ids:  # asked again at once after a held poll
                    await self._pause(STOP_POLL_FLOOR_S - (loop.time() - asked_at))
            except TooManyRequests:
                await self._pause(TOO_MANY_REQUESTS_PAUSE_S)
            except asyncio.TimeoutError:
                pass
            except Exception as error:
                log.error("job-stop poll failed (%s: %s)", type(error).__name__, error)
                await self._pause(STOP_POLL_FLOOR_S)

    async def _poll_stops(self, session: ClientSession) -> list[str]:
        """One job-stop poll; cut short (no stops) when the loop ends."""
        poll = asyncio.ensure_future(self._stops(session))
        await _first_of(poll, self._shutdown_event.wait())
        if poll.done():
            return list(poll.result())
        poll.cancel()
        return []

    async def _pause(self, seconds: float, *cut_short_by: asyncio.Event) -> None:
        """Sleep up to ``seconds``, less if the loop ends (or one of ``cut_short_by`` is
        set) meanwhile."""
        if seconds > 0:
            ends = [self._shutdown_event, *cut_short_by]
            await _first_of(asyncio.sleep(seconds), *(event.wait() for event in ends))


class _Backoff:
    """Pauses that double from ``first_s`` up to ``last_s``."""

    def __init__(self, first_s: float, last_s: float) -> None:
        self._first_s, self._last_s = first_s, last_s
        self._next_s = first_s

    def next(self) -> float:
        pause, self._next_s = self._next_s, min(2 * self._next_s, self._last_s)
        return pause

    def reset(self) -> None:
        self._next_s = self._first_s


async def _first_of(*awaitables: Awaitable[Any]) -> None:
    """Wait until one of ``awaitables`` is done; cancel the others (futures given by the
    caller are left as they are, for the caller to read or cancel)."""
    futures = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    owned = [
        future for future, given in zip(futures, awaitables, strict=True) if future is not given
    ]
    try:
        await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in owned:
            future.cancel()
