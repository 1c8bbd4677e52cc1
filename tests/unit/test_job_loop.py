"""The job loop's timing rules, with a scripted platform and scripted jobs (no engine).

The scaler is the runpod SDK's real ``JobScaler`` (subclassed by ``job_loop``); only its
seams are scripted: the job-take and job-stop requests and the per-job handling. Every
scenario runs on an event loop whose clock never moves: no timer ever fires, so whatever
happens here happens because of an event (a job taken, a job ended, room in the engine),
never because a tick or a pause ran out. A loop that waited on the SDK's 0.1 s tick or its
1 s sleep would stall (and the guard below fails the test); one that polled in a busy loop
would make requests it must not.

The real engine and the SDK's posting are in tests/e2e (test_production_loop.py,
test_lifecycle.py).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
from runpod.serverless.modules.worker_state import JobsProgress

from vllm_worker.engine_types import EngineLoad
from vllm_worker.job_loop import EventDrivenScaler, _room_when_not_full
from vllm_worker.lifecycle import Lifecycle

T = TypeVar("T")
GUARD_S = 30.0  # real seconds before a stalled scenario is failed
TURNS = 200  # event-loop turns that let anything pending run


class FrozenClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``time()`` stands still (``asyncio.sleep(d > 0)`` never ends)
    until a test moves it on with ``advance`` (a platform holding a poll for a while)."""

    now = 0.0

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def advance_clock(seconds: float) -> None:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, FrozenClockLoop)
    loop.advance(seconds)


def run_frozen(scenario: Callable[[], Awaitable[T]]) -> T:
    """Run ``scenario()`` on a frozen-clock loop; fail it after ``GUARD_S`` real seconds."""
    loop = FrozenClockLoop()
    task = loop.create_task(_as_coroutine(scenario))
    guard = threading.Timer(GUARD_S, lambda: loop.call_soon_threadsafe(task.cancel))
    guard.start()
    try:
        return loop.run_until_complete(task)
    except asyncio.CancelledError:
        pytest.fail(f"the scenario stalled: nothing happened for {GUARD_S} s without a timer")
    finally:
        guard.cancel()
        for pending in asyncio.all_tasks(loop):  # timers that can never fire (the grace)
            pending.cancel()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()


async def _as_coroutine(scenario: Callable[[], Awaitable[T]]) -> T:
    return await scenario()


async def turns(count: int = TURNS) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


@pytest.fixture(autouse=True)
def _no_jobs_in_progress() -> Iterator[None]:
    JobsProgress().clear()  # the SDK's process-wide singleton
    yield
    JobsProgress().clear()


class Platform:
    """A scripted RunPod: each job-take is answered from ``answers`` (a list of jobs, or
    ``HOLD``: held until the worker stops taking, then no job)."""

    HOLD = object()

    def __init__(self, lifecycle: Lifecycle, answers: list[Any]) -> None:
        self.lifecycle = lifecycle
        self.answers = list(answers)
        self.takes: list[int] = []  # the batch size of each job-take
        self.taken = asyncio.Event()
        self.stop_polls = 0
        self.stops_to_send: list[str] = []
        self.stop_poll = asyncio.Event()  # set to answer the held job-stop poll

    async def take(self, _session: Any, wanted: int) -> list[dict[str, Any]] | None:
        self.takes.append(wanted)
        self.taken.set()
        answer = self.answers.pop(0) if self.answers else Platform.HOLD
        if answer is Platform.HOLD:
            await self.lifecycle.stop_taking.wait()
            return None
        if isinstance(answer, Exception):
            raise answer
        return list(answer)

    async def stops(self, _session: Any) -> list[str]:
        """A held job-stop long poll, answered when ``stop_poll`` is set."""
        self.stop_polls += 1
        await self.stop_poll.wait()
        self.stop_poll.clear()
        sent, self.stops_to_send = self.stops_to_send, []
        return sent


class Jobs:
    """Scripted job handling in place of the SDK's ``rp_job.handle_job``: each job waits
    until the test releases it."""

    def __init__(self) -> None:
        self.started: dict[str, asyncio.Event] = {}
        self.release: dict[str, asyncio.Event] = {}
        self.ended: list[str] = []
        self.cancelled: list[str] = []

    def _events(self, job_id: str) -> tuple[asyncio.Event, asyncio.Event]:
        started = self.started.setdefault(job_id, asyncio.Event())
        release = self.release.setdefault(job_id, asyncio.Event())
        return started, release

    async def handle(self, _session: Any, _config: Any, job: dict[str, Any]) -> None:
        started, release = self._events(job["id"])
        started.set()
        try:
            await release.wait()
        except asyncio.CancelledError:
            self.cancelled.append(job["id"])
            raise
        self.ended.append(job["id"])

    async def until_started(self, job_id: str) -> None:
        await self._events(job_id)[0].wait()

    def finish(self, job_id: str) -> None:
        self._events(job_id)[1].set()


def job(job_id: str) -> dict[str, Any]:
    return {"id": job_id, "input": {}}


def make_scaler(
    platform_answers: list[Any],
    *,
    max_jobs: int = 4,
    concurrency: Callable[[int], int] | None = None,
) -> tuple[EventDrivenScaler, Platform, Jobs]:
    lifecycle = Lifecycle(1.0, lambda: False)
    platform, jobs = Platform(lifecycle, platform_answers), Jobs()
    config: dict[str, Any] = {"handler": None, "rp_args": {}}
    if concurrency is not None:
        config["concurrency_modifier"] = concurrency
    scaler = EventDrivenScaler(
        config, lifecycle, max_jobs, take=platform.take, stops=platform.stops
    )
    scaler.jobs_handler = jobs.handle
    return scaler, platform, jobs


async def stop(scaler: EventDrivenScaler, running: asyncio.Task[None]) -> None:
    """SIGTERM's path: stop taking; the loop ends once the jobs it took are done."""
    scaler.lifecycle.begin_shutdown()
    await running


def test_a_job_taken_while_another_runs_starts_before_the_other_ends() -> None:
    async def scenario() -> None:
        scaler, platform, jobs = make_scaler([[job("a")], [job("b")]])
        running = asyncio.ensure_future(scaler.run())
        await jobs.until_started("a")
        await jobs.until_started("b")  # with "a" still running
        assert jobs.ended == []
        jobs.finish("a")
        jobs.finish("b")
        await stop(scaler, running)
        assert sorted(jobs.ended) == ["a", "b"]
        assert platform.takes[:2] == [4, 3]  # the batch take asks for the room left

    run_frozen(scenario)


def test_a_full_worker_takes_again_as_soon_as_a_job_ends_and_not_before() -> None:
    async def scenario() -> None:
        scaler, platform, jobs = make_scaler([[job("a")], [job("b")]], max_jobs=1)
        running = asyncio.ensure_future(scaler.run())
        await jobs.until_started("a")
        await turns()
        assert platform.takes == [1]  # full: no job-take request while "a" runs
        platform.taken.clear()
        jobs.finish("a")
        await platform.taken.wait()  # at once: no timer can fire here
        assert platform.takes == [1, 1]
        await jobs.until_started("b")
        jobs.finish("b")
        await stop(scaler, running)

    run_frozen(scenario)


def test_room_in_the_engine_wakes_a_worker_that_admission_held_back() -> None:
    engine_full = True

    def admission(_current: int) -> int:  # as job_loop._admission: held jobs when full
        return 1 if engine_full else 4

    async def scenario() -> None:
        nonlocal engine_full
        scaler, platform, jobs = make_scaler([[job("a")], [job("b")]], concurrency=admission)
        running = asyncio.ensure_future(scaler.run())
        await jobs.until_started("a")
        await turns()
        assert platform.takes == [1]  # the engine is full: no request
        platform.taken.clear()
        engine_full = False
        on_load = _room_when_not_full(scaler.room_changed)
        on_load(EngineLoad(running=2, waiting=1, kv_cache_usage=0.5, max_running=8))
        on_load(EngineLoad(running=1, waiting=0, kv_cache_usage=0.5, max_running=8))
        await platform.taken.wait()
        assert platform.takes == [1, 3]  # room for 4, "a" still running
        await jobs.until_started("b")
        jobs.finish("a")
        jobs.finish("b")
        await stop(scaler, running)

    run_frozen(scenario)


def test_the_load_listener_signals_only_a_change_to_not_full() -> None:
    calls: list[int] = []
    on_load = _room_when_not_full(lambda: calls.append(1))
    full = EngineLoad(running=8, waiting=0, kv_cache_usage=0.2, max_running=8)
    room = EngineLoad(running=3, waiting=0, kv_cache_usage=0.2, max_running=8)
    for load in (room, room, full, full, room, room, full, room):
        on_load(load)
    assert len(calls) == 2


def test_stopping_takes_no_new_job_and_ends_once_the_taken_ones_are_done() -> None:
    async def scenario() -> None:
        scaler, platform, jobs = make_scaler([[job("a")], Platform.HOLD])
        running = asyncio.ensure_future(scaler.run())
        await jobs.until_started("a")
        await platform.taken.wait()
        await turns()
        scaler.lifecycle.begin_shutdown()
        await turns()
        assert not running.done()  # "a" is still running: the loop waits for it
        assert len(platform.takes) == 2  # the held poll ended; no new one was made
        jobs.finish("a")
        await running
        assert jobs.ended == ["a"]

    run_frozen(scenario)


def test_a_job_the_held_take_brings_after_the_stop_signal_still_runs() -> None:
    async def scenario() -> None:
        scaler, platform, jobs = make_scaler([[job("a")]])
        gate = asyncio.Event()
        answer_b = platform.take

        async def take_b_after_the_signal(session: Any, wanted: int) -> Any:
            if platform.takes:  # the second take: held until the signal, then brings "b"
                platform.takes.append(wanted)
                await gate.wait()
                return [job("b")]
            return await answer_b(session, wanted)

        scaler._take = take_b_after_the_signal
        running = asyncio.ensure_future(scaler.run())
        await jobs.until_started("a")
        await turns()
        scaler.lifecycle.begin_shutdown()
        gate.set()
        await jobs.until_started("b")  # not lost: it runs
        jobs.finish("a")
        jobs.finish("b")
        await running
        assert sorted(jobs.ended) == ["a", "b"]
        assert len(platform.takes) == 2

    run_frozen(scenario)


def test_a_stop_after_a_held_poll_is_asked_for_at_once_and_stops_the_job() -> None:
    async def scenario() -> None:
        scaler, platform, jobs = make_scaler([[job("a")]])
        running = asyncio.ensure_future(scaler.run())
        await jobs.until_started("a")
        await turns()
        assert platform.stop_polls == 1
        advance_clock(30.0)  # the platform holds the poll, as RunPod does ...
        platform.stop_poll.set()  # ... then answers: no job to stop
        await turns()
        assert platform.stop_polls == 2  # asked again at once (the SDK pauses 1 s here)
        platform.stops_to_send = ["a"]
        platform.stop_poll.set()
        await turns()
        assert jobs.cancelled == ["a"]
        await stop(scaler, running)

    run_frozen(scenario)


def test_a_stop_channel_that_answers_at_once_is_not_spun_on() -> None:
    async def scenario() -> None:
        scaler, _platform, _jobs = make_scaler([])
        answers = 0

        async def at_once(_session: Any) -> list[str]:
            nonlocal answers
            answers += 1
            return []

        scaler._stops = at_once
        running = asyncio.ensure_future(scaler.run())
        await turns()
        assert answers == 1  # then it waits out a second, which never passes here
        await stop(scaler, running)

    run_frozen(scenario)


def test_a_failing_job_take_is_retried_after_a_pause_not_in_a_spin() -> None:
    async def scenario() -> None:
        scaler, platform, _jobs = make_scaler([ConnectionError("refused"), [job("a")]])
        running = asyncio.ensure_future(scaler.run())
        await turns()
        assert platform.takes == [4]  # the pause (0.1 s, doubling) never ends here
        await stop(scaler, running)

    run_frozen(scenario)


def test_a_held_take_is_cut_off_once_stopping_leaves_nothing_to_wait_for() -> None:
    async def scenario() -> None:
        scaler, platform, jobs = make_scaler([[job("a")]])
        forever = asyncio.Event()
        answers = platform.take

        async def second_take_held_forever(session: Any, wanted: int) -> Any:
            if not platform.takes:
                return await answers(session, wanted)
            platform.takes.append(wanted)
            await forever.wait()  # a platform that holds the poll past any grace

        scaler._take = second_take_held_forever
        running = asyncio.ensure_future(scaler.run())
        await jobs.until_started("a")
        await turns()
        scaler.lifecycle.begin_shutdown()  # SIGTERM: the take under way is waited for ...
        await turns()
        assert not running.done()
        jobs.finish("a")  # ... while a job runs; then cut off
        await running
        assert platform.takes == [4, 3]
        assert jobs.ended == ["a"]

    run_frozen(scenario)


def test_a_held_take_is_cut_off_at_once_when_stopping_with_no_job() -> None:
    async def scenario() -> None:
        scaler, platform, _jobs = make_scaler([])
        forever = asyncio.Event()

        async def held_forever(_session: Any, wanted: int) -> Any:
            platform.takes.append(wanted)
            await forever.wait()

        scaler._take = held_forever
        running = asyncio.ensure_future(scaler.run())
        await turns()
        scaler.lifecycle.begin_shutdown()
        await running  # no timer can fire here: it ended on the signal itself
        assert platform.takes == [4]

    run_frozen(scenario)
