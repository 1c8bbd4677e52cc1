"""The endpoint's HTTP server, and ``serve``: the endpoint plus the worker it runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from aiohttp import web

from vllm_worker.local_endpoint import public_api, worker_api
from vllm_worker.local_endpoint.context import Context, EndpointConfig
from vllm_worker.local_endpoint.jobs import JobStore
from vllm_worker.local_endpoint.process import WorkerProcess, build_env
from vllm_worker.local_endpoint.stall import StallWatch

log = logging.getLogger(__name__)

T = TypeVar("T")

REAP_INTERVAL_S = 0.5  # how often execution timeouts and retention are checked


class LocalEndpoint:
    """RunPod's public queue API and its worker-facing job API on one aiohttp server."""

    def __init__(self, config: EndpointConfig | None = None) -> None:
        self.config = config or EndpointConfig()
        self._ctx: Context | None = None
        self._runner: web.AppRunner | None = None
        self._reaper: asyncio.Task[None] | None = None
        self.stall_watch = StallWatch()
        self._stall_task: asyncio.Task[None] | None = None
        self.port = self.config.port

    @property
    def ctx(self) -> Context:
        assert self._ctx is not None, "the endpoint is not started"
        return self._ctx

    @property
    def store(self) -> JobStore:
        return self.ctx.store

    @property
    def base_url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def url(self) -> str:
        """What replaces ``https://api.runpod.ai/v2/<endpoint_id>`` for clients."""
        return f"{self.base_url}/v2/{self.config.endpoint_id}"

    def worker_env(self, worker_id: str) -> dict[str, str]:
        """The RUNPOD_* variables that attach a worker to this endpoint."""
        return worker_api.worker_env(self.ctx, self.base_url, worker_id)

    async def start(self) -> None:
        self._ctx = Context.create(self.config)
        # RunPod accepts payloads up to 20 MB (/runsync) and 10 MB (/run).
        app = web.Application(client_max_size=20 * 2**20)
        public_api.add_routes(app, self._ctx)
        worker_api.add_routes(app, self._ctx)
        app.router.add_route("*", "/{tail:.*}", _unknown_route)
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=5.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        self._reaper = asyncio.create_task(self._reap())
        self._stall_task = asyncio.create_task(self.stall_watch.run())

    async def stop(self) -> None:
        """Answer every held poll and waiting /runsync now, then close the server."""
        if self._runner is None:
            return
        self.ctx.drain()
        for task in (self._reaper, self._stall_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._runner.cleanup()
        self._runner = None

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            try:
                timed_out, _forgotten = self.store.expire()
            except Exception:  # a bug here must not end timeouts for good
                log.exception("checking timeouts failed")
                continue
            for job in timed_out:
                log.warning("job %s TIMED_OUT: %s", job.id, job.error)


async def _unknown_route(request: web.Request) -> web.StreamResponse:
    return web.json_response(
        {"error": f"no such operation: {request.method} {request.path}"}, status=404
    )


class ThreadedEndpoint:
    """A ``LocalEndpoint`` in a background thread with its own event loop.

    For tests and for Python programs that are not asyncio: ``with ThreadedEndpoint() as
    endpoint: ...``. ``call(fn)`` runs ``fn(store)`` on the endpoint's loop, which owns the
    store, and returns its result.
    """

    def __init__(self, config: EndpointConfig | None = None) -> None:
        self.endpoint = LocalEndpoint(config or EndpointConfig(port=0))
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def __enter__(self) -> ThreadedEndpoint:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return self.endpoint.url

    def worker_env(self, worker_id: str) -> dict[str, str]:
        return self.call(lambda _store: self.endpoint.worker_env(worker_id))

    def start(self, timeout_s: float = 10.0) -> None:
        self._thread = threading.Thread(target=self._run, name="local-endpoint", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise RuntimeError(f"the local endpoint did not start within {timeout_s} s")
        if self._error is not None:
            raise RuntimeError("the local endpoint failed to start") from self._error

    def stop(self, timeout_s: float = 15.0) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended already
                self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise RuntimeError(f"the local endpoint did not stop within {timeout_s} s")
        self._thread = None

    def call(self, fn: Callable[[JobStore], T], timeout_s: float = 10.0) -> T:
        """``fn(store)``, run on the endpoint's event loop."""
        assert self._loop is not None, "not started"

        async def run() -> T:
            return fn(self.endpoint.store)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout_s)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as error:
            self._error = error
            self._started.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        await self.endpoint.start()
        self._started.set()
        try:
            await self._stopping.wait()
        finally:
            await self.endpoint.stop()


async def serve(
    config: EndpointConfig,
    *,
    worker_command: Sequence[str] | None,
    environ: Mapping[str, str],
    stop_grace_s: float = 30.0,
    announce: Callable[[str], None] = print,
) -> int:
    """Run the endpoint (and, unless ``worker_command`` is None, its worker) until
    SIGINT/SIGTERM. Returns the exit code: 0; 1 when the worker died on its own; 2 when
    it could not be started."""
    endpoint = LocalEndpoint(config)
    await endpoint.start()
    signals = asyncio.Queue[int]()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, signals.put_nowait, signum)
    worker_id = f"local-{secrets.token_hex(4)}"
    announce(f"RunPod endpoint {config.endpoint_id!r} listening on {endpoint.url}")
    announce(
        f"  POST {endpoint.url}/run | /runsync   GET {endpoint.url}/status/<id> | "
        f"/stream/<id>   POST {endpoint.url}/cancel/<id>   GET {endpoint.url}/health"
    )
    announce(f"  OpenAI-compatible API: {endpoint.url}/openai/v1 (the openai client's base_url)")
    try:
        if worker_command is None:
            _announce_attach(announce, endpoint.worker_env(worker_id))
            received = await signals.get()
            announce(f"{signal.Signals(received).name}: stopping")
            return 0
        worker = WorkerProcess(worker_command, build_env(environ, endpoint.worker_env(worker_id)))
        try:
            worker.start()
        except (OSError, subprocess.SubprocessError) as error:
            log.error("cannot start the worker %s: %s", " ".join(worker_command), error)
            return 2
        announce(f"worker {worker_id} started (pid {worker.pid}); it is ready when it polls")
        try:
            return await _supervise(endpoint, worker, worker_id, signals, announce)
        finally:
            endpoint.ctx.drain()  # no more jobs for it; its posts are still accepted
            # A second Ctrl-C kills it at once.
            await worker.stop(stop_grace_s, force=lambda: not signals.empty())
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await endpoint.stop()


async def _supervise(
    endpoint: LocalEndpoint,
    worker: WorkerProcess,
    worker_id: str,
    signals: asyncio.Queue[int],
    announce: Callable[[str], None],
) -> int:
    store = endpoint.store
    ready = False

    def initializing() -> int:
        return int(not ready and worker.returncode() is None)

    endpoint.ctx.workers_initializing = initializing
    while True:
        with contextlib.suppress(asyncio.TimeoutError):
            signum = await asyncio.wait_for(signals.get(), 0.5)
            announce(f"{signal.Signals(signum).name}: stopping")
            return 0
        if not ready and worker_id in store.workers:
            ready = True
            announce(f"worker {worker_id} ready after {time.monotonic() - worker.started_at:.1f} s")
        returncode = worker.returncode()
        if returncode is not None:
            reason = f"the worker exited with code {returncode}"
            lost = store.worker_lost(worker_id, reason)
            log.error("%s; %d jobs in progress failed; stopping the endpoint", reason, len(lost))
            return 1


def _announce_attach(announce: Callable[[str], None], env: Mapping[str, str]) -> None:
    announce("no worker started (--no-worker). Start one with this environment:")
    for name, value in env.items():
        announce(f"  export {name}='{value}'")
    announce("  (for docker: pass each with -e, and --network host: the URLs are loopback;")
    announce("   on a CPU-only machine also --cpu-shares 2, so its engine cannot starve this;")
    announce("   several workers: give each its own RUNPOD_POD_ID)")
