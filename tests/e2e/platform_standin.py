"""A stand-in for RunPod's worker-facing control plane, for end-to-end tests.

It speaks the protocol the runpod SDK (1.12) uses in its production job loop
(``runpod/serverless/modules/rp_job.py``, ``rp_scale.py``, ``rp_http.py``, ``rp_ping.py``):

- ``GET  /v2/<endpoint>/job-take/<worker>?...&job_in_progress=0|1``: long poll, one job
  ``{"id": ..., "input": ...}`` or 204;
- ``GET  /v2/<endpoint>/job-take-batch/<worker>?...&batch_size=N&job_in_progress=0|1``:
  long poll, a JSON list of at most N jobs or 204 (the SDK uses it when its concurrency
  leaves room for more than one job);
- ``GET  /v2/<endpoint>/job-stop/<worker>?...``: long poll, ``{"jobsToStop": [...]}``;
- ``POST /v2/<endpoint>/job-stream/<worker>/<job>?...&isStream=...``: body ``{"output": chunk}``;
- ``POST /v2/<endpoint>/job-done/<worker>/<job>?...&isStream=...``: the job's result;
- ``GET  /v2/<endpoint>/ping/<worker>?job_id=...&runpod_version=...``: heartbeat.

POST bodies are JSON sent with ``Content-Type: application/x-www-form-urlencoded``, so the
raw body is parsed as JSON. Every request must carry ``Authorization: <api key>``.

The server runs on 127.0.0.1 (a free port) in a background thread with its own event
loop; ``with PlatformStandIn() as platform:`` starts and stops it. Tests enqueue jobs,
then wait (bounded) until they are done and inspect what the worker posted. Anything the
worker does that breaks the protocol is collected in ``problems`` instead of raising in
the server thread, so a test can assert it is empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

ENDPOINT_ID = "test-endpoint"
WORKER_ID = "test-worker"
API_KEY = "test-api-key"


@dataclass
class TakeRequest:
    """One job-take or job-take-batch call, and the job ids it was answered with."""

    at: float
    batch: bool
    batch_size: int
    job_in_progress: str | None
    job_ids: list[str] = field(default_factory=list)


@dataclass
class JobRecord:
    """Everything the worker did for one job, as the platform saw it."""

    job: dict[str, Any]
    enqueued_at: float
    taken_at: float | None = None
    taken_by_batch: bool | None = None
    stream: list[Any] = field(default_factory=list)  # each POST's "output", in order
    stream_bodies: list[Any] = field(default_factory=list)  # each POST's whole body
    stream_times: list[float] = field(default_factory=list)
    stream_is_stream: list[str | None] = field(default_factory=list)
    done: Any = None  # the job-done POST body
    done_at: float | None = None
    done_is_stream: str | None = None
    request_ids: list[str | None] = field(default_factory=list)  # X-Request-ID per POST

    @property
    def id(self) -> str:
        return str(self.job["id"])

    @property
    def is_done(self) -> bool:
        return self.done_at is not None


class PlatformStandIn:
    """The control plane a RunPod worker talks to, on loopback; see the module docstring."""

    def __init__(
        self,
        *,
        endpoint_id: str = ENDPOINT_ID,
        worker_id: str = WORKER_ID,
        api_key: str = API_KEY,
        hold_s: float = 2.0,
    ) -> None:
        self.endpoint_id = endpoint_id
        self.worker_id = worker_id
        self.api_key = api_key
        # How long a take or stop poll is held open when there is nothing to hand out. The
        # SDK re-polls job-take at once after a 204 (no back-off), so answering at once
        # would make it spin; RunPod holds these polls open too.
        self.hold_s = hold_s

        self._lock = threading.Condition()
        self._queue: deque[str] = deque()
        self._jobs: dict[str, JobRecord] = {}
        self._to_stop: list[str] = []
        self._takes: list[TakeRequest] = []
        self._pings: list[dict[str, str]] = []
        self._problems: list[str] = []

        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._jobs_ready: asyncio.Event | None = None
        self._stops_ready: asyncio.Event | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None

    # --- lifecycle ---------------------------------------------------------------

    def __enter__(self) -> PlatformStandIn:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._sock is not None, "not started"
        host, port = self._sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def start(self, timeout_s: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._thread = threading.Thread(target=self._run, name="platform-standin", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise RuntimeError(f"the platform stand-in did not start within {timeout_s} s")
        if self._start_error is not None:
            raise RuntimeError("the platform stand-in failed to start") from self._start_error

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise RuntimeError(f"the platform stand-in did not stop within {timeout_s} s")
        self._thread = None
        with self._lock:
            self._lock.notify_all()

    def worker_env(self) -> dict[str, str]:
        """The RUNPOD_* variables that point a worker's SDK at this stand-in.

        ``$ID`` in the take URL becomes the worker id; in the post URLs
        ``$RUNPOD_POD_ID`` becomes the worker id and ``$ID`` the job id. Every URL has a
        query string because the SDK appends ``&name=value`` to it.
        """
        base = f"{self.base_url}/v2/{self.endpoint_id}"
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{base}/job-take/$ID?gpu=cpu",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{base}/job-done/$RUNPOD_POD_ID/$ID?gpu=cpu",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{base}/job-stream/$RUNPOD_POD_ID/$ID?gpu=cpu",
            "RUNPOD_WEBHOOK_PING": f"{base}/ping/$RUNPOD_POD_ID?gpu=cpu",
            "RUNPOD_POD_ID": self.worker_id,
            "RUNPOD_AI_API_KEY": self.api_key,
        }

    # --- what tests call (any thread) ----------------------------------------------

    def enqueue(self, *jobs: dict[str, Any]) -> list[str]:
        """Queue jobs ``{"id": ..., "input": ...}``; all become visible to the worker at once."""
        ids = []
        with self._lock:
            for job in jobs:
                job_id = str(job["id"])
                if job_id in self._jobs:
                    raise ValueError(f"job id {job_id!r} was already used")
                self._jobs[job_id] = JobRecord(job=copy.deepcopy(job), enqueued_at=_now())
                self._queue.append(job_id)
                ids.append(job_id)
        self._wake(self._jobs_ready)
        return ids

    def stop_job(self, job_id: str) -> None:
        """Tell the worker (through the job-stop poll) to stop a job."""
        with self._lock:
            self._to_stop.append(job_id)
        self._wake(self._stops_ready)

    def wait_until(
        self,
        predicate: Callable[[], bool],
        timeout_s: float,
        *,
        check: Callable[[], None] | None = None,
        what: str = "the condition",
    ) -> None:
        """Wait until ``predicate()`` (called under the state lock) is true.

        ``check`` is called about twice a second and may raise (e.g. when the worker died).
        Raises ``TimeoutError`` after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
                if check is not None:
                    self._lock.release()
                    try:
                        check()
                    finally:
                        self._lock.acquire()
                self._lock.wait(min(remaining, 0.5))

    def wait_done(
        self,
        job_ids: Iterable[str],
        timeout_s: float,
        *,
        check: Callable[[], None] | None = None,
    ) -> dict[str, JobRecord]:
        """Wait until every job has its job-done POST; return snapshots of their records."""
        ids = list(job_ids)

        def all_done() -> bool:
            return all(self._jobs[job_id].is_done for job_id in ids)

        def pending() -> str:
            with self._lock:
                return ", ".join(i for i in ids if not self._jobs[i].is_done)

        try:
            self.wait_until(all_done, timeout_s, check=check, what="job-done")
        except TimeoutError as error:
            raise TimeoutError(f"{error}; jobs still not done: {pending()}") from None
        return {job_id: self.record(job_id) for job_id in ids}

    def wait_for_take(self, timeout_s: float, *, check: Callable[[], None] | None = None) -> float:
        """Wait for the worker's first job-take poll (it polls once it is ready to serve)."""
        self.wait_until(
            lambda: bool(self._takes), timeout_s, check=check, what="the worker's first job-take"
        )
        with self._lock:
            return self._takes[0].at

    def record(self, job_id: str) -> JobRecord:
        with self._lock:
            return copy.deepcopy(self._jobs[job_id])

    @property
    def takes(self) -> list[TakeRequest]:
        with self._lock:
            return copy.deepcopy(self._takes)

    @property
    def pings(self) -> list[dict[str, str]]:
        with self._lock:
            return copy.deepcopy(self._pings)

    @property
    def problems(self) -> list[str]:
        """Protocol violations seen so far (wrong worker id or key, bad bodies, ...)."""
        with self._lock:
            return list(self._problems)

    def events(self) -> list[tuple[float, str, str]]:
        """``(time, "take" | "stream" | "done", job id)`` for every job, in time order."""
        with self._lock:
            events = []
            for record in self._jobs.values():
                if record.taken_at is not None:
                    events.append((record.taken_at, "take", record.id))
                events.extend((at, "stream", record.id) for at in record.stream_times)
                if record.done_at is not None:
                    events.append((record.done_at, "done", record.id))
        return sorted(events)

    # --- the server (its own thread and event loop) ---------------------------------

    def _wake(self, event: asyncio.Event | None) -> None:
        if self._loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.call_soon_threadsafe(event.set)

    def _problem(self, message: str) -> None:
        with self._lock:
            self._problems.append(message)
            self._lock.notify_all()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as error:
            self._start_error = error
            self._started.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._jobs_ready = asyncio.Event()
        self._stops_ready = asyncio.Event()
        app = web.Application()
        prefix = "/v2/{endpoint}"
        app.router.add_get(prefix + "/job-take/{worker}", self._take)
        app.router.add_get(prefix + "/job-take-batch/{worker}", self._take_batch)
        app.router.add_get(prefix + "/job-stop/{worker}", self._job_stop)
        app.router.add_post(prefix + "/job-stream/{worker}/{job}", self._job_stream)
        app.router.add_post(prefix + "/job-done/{worker}/{job}", self._job_done)
        app.router.add_get(prefix + "/ping/{worker}", self._ping)
        app.router.add_route("*", "/{tail:.*}", self._unknown)
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        assert self._sock is not None
        await web.SockSite(runner, self._sock).start()
        self._started.set()
        try:
            await self._stopping.wait()
        finally:
            # Wake every held poll: they see _stopping and answer 204.
            self._jobs_ready.set()
            self._stops_ready.set()
            await runner.cleanup()

    def _check_caller(self, request: web.Request) -> str | None:
        """Why the request is not from our worker, or None."""
        if request.match_info["endpoint"] != self.endpoint_id:
            return f"wrong endpoint id in {request.path}"
        if request.match_info["worker"] != self.worker_id:
            return f"wrong worker id in {request.path} (want {self.worker_id!r})"
        if request.headers.get("Authorization") != self.api_key:
            return f"missing or wrong Authorization header on {request.method} {request.path}"
        return None

    async def _hold(self, event: asyncio.Event, ready: Callable[[], bool]) -> None:
        """Return when ``ready()``, when stopping, or after ``hold_s``."""
        assert self._stopping is not None
        deadline = time.monotonic() + self.hold_s
        while not self._stopping.is_set():
            event.clear()  # before checking, so a wake-up in between is not lost
            if ready():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _pop_jobs(self, limit: int, *, batch: bool, take: TakeRequest) -> list[dict[str, Any]]:
        with self._lock:
            jobs = []
            while self._queue and len(jobs) < limit:
                record = self._jobs[self._queue.popleft()]
                record.taken_at = _now()
                record.taken_by_batch = batch
                jobs.append(copy.deepcopy(record.job))
                take.job_ids.append(record.id)
            self._lock.notify_all()
        return jobs

    def _queue_nonempty(self) -> bool:
        with self._lock:
            return bool(self._queue)

    async def _take(self, request: web.Request) -> web.StreamResponse:
        return await self._take_jobs(request, batch=False)

    async def _take_batch(self, request: web.Request) -> web.StreamResponse:
        return await self._take_jobs(request, batch=True)

    async def _take_jobs(self, request: web.Request, *, batch: bool) -> web.StreamResponse:
        if (problem := self._check_caller(request)) is not None:
            self._problem(problem)
            return web.Response(status=401, text=problem)
        job_in_progress = request.query.get("job_in_progress")
        if job_in_progress not in {"0", "1"}:
            self._problem(f"job_in_progress={job_in_progress!r} on {request.path_qs}")
        batch_size = 1
        if batch:
            try:
                batch_size = int(request.query["batch_size"])
            except (KeyError, ValueError):
                self._problem(f"job-take-batch without a valid batch_size: {request.path_qs}")
                return web.Response(status=400)
            if batch_size < 2:
                self._problem(f"job-take-batch with batch_size={batch_size}")
        take = TakeRequest(
            at=_now(), batch=batch, batch_size=batch_size, job_in_progress=job_in_progress
        )
        with self._lock:  # recorded on arrival: a held poll shows the worker is ready
            self._takes.append(take)
            self._lock.notify_all()
        assert self._jobs_ready is not None
        await self._hold(self._jobs_ready, self._queue_nonempty)
        jobs = self._pop_jobs(batch_size, batch=batch, take=take)
        if not jobs:
            return web.Response(status=204)
        return web.json_response(jobs if batch else jobs[0])

    async def _job_stop(self, request: web.Request) -> web.StreamResponse:
        if (problem := self._check_caller(request)) is not None:
            self._problem(problem)
            return web.Response(status=401, text=problem)

        def any_to_stop() -> bool:
            with self._lock:
                return bool(self._to_stop)

        assert self._stops_ready is not None
        await self._hold(self._stops_ready, any_to_stop)
        with self._lock:
            to_stop, self._to_stop = self._to_stop, []
        return web.json_response({"jobsToStop": to_stop})

    async def _read_post(self, request: web.Request) -> tuple[JobRecord, Any] | web.Response:
        if (problem := self._check_caller(request)) is not None:
            self._problem(problem)
            return web.Response(status=401, text=problem)
        job_id = request.match_info["job"]
        raw = await request.read()
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            self._problem(f"{request.path}: body is not JSON ({error}): {raw[:200]!r}")
            return web.Response(status=400)
        with self._lock:
            record = self._jobs.get(job_id)
        if record is None or record.taken_at is None:
            self._problem(f"{request.path}: POST for a job that was never handed out")
            return web.Response(status=404)
        if record.is_done:
            self._problem(f"{request.path}: POST after the job's job-done")
        return record, body

    async def _job_stream(self, request: web.Request) -> web.StreamResponse:
        read = await self._read_post(request)
        if isinstance(read, web.Response):
            return read
        record, body = read
        if not isinstance(body, dict) or set(body) != {"output"}:
            self._problem(f"job {record.id}: job-stream body is not {{'output': ...}}: {body!r}")
        with self._lock:
            live = self._jobs[record.id]
            live.stream_bodies.append(body)
            live.stream.append(body.get("output") if isinstance(body, dict) else None)
            live.stream_times.append(_now())
            live.stream_is_stream.append(request.query.get("isStream"))
            live.request_ids.append(request.headers.get("X-Request-ID"))
            self._lock.notify_all()
        return web.Response(status=200, text="{}", content_type="application/json")

    async def _job_done(self, request: web.Request) -> web.StreamResponse:
        read = await self._read_post(request)
        if isinstance(read, web.Response):
            return read
        record, body = read
        with self._lock:
            live = self._jobs[record.id]
            live.done = body
            live.done_at = _now()
            live.done_is_stream = request.query.get("isStream")
            live.request_ids.append(request.headers.get("X-Request-ID"))
            self._lock.notify_all()
        return web.Response(status=200, text="{}", content_type="application/json")

    async def _ping(self, request: web.Request) -> web.StreamResponse:
        if (problem := self._check_caller(request)) is not None:
            self._problem(problem)
            return web.Response(status=401, text=problem)
        with self._lock:
            self._pings.append(dict(request.query))
        return web.Response(status=200)

    async def _unknown(self, request: web.Request) -> web.StreamResponse:
        self._problem(f"unexpected request: {request.method} {request.path_qs}")
        return web.Response(status=404)


def _now() -> float:
    return time.monotonic()
