"""Load-balancing mode (ENDPOINT_TYPE=load_balancer): the worker as an HTTP server.

``serve(settings)`` runs it, in this order:

1. uvicorn serves the ``Gate`` on PORT (and its health path alone on PORT_HEALTH when
   that differs) in a thread of its own, before vLLM is imported: the health path
   answers 204 (initializing) from the first second;
2. the main thread starts the engine through the one start-up path
   (``startup.serving``: the same settings, engine, chat template, serving objects and
   errors as the queue), interruptible by SIGTERM as in the queue;
3. the gate gets the engine's app (``http_app.build_app``) and serves: 200 on the
   health path;
4. it serves until SIGTERM/SIGINT or the engine's death:
   - SIGTERM: new requests get 503 and the health path 503; the requests in flight get
     SHUTDOWN_GRACE_SECONDS to finish; then the servers stop (cutting any left, which
     aborts their vLLM requests) and the process exits 0;
   - the engine died: every request gets 503 and the health path 503; once a health
     check has seen that (RunPod then routes nothing here), or after
     ``UNHEALTHY_MAX_WAIT_S`` without one, the process exits 1.

A second signal while draining stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from types import FrameType
from typing import Any

import uvicorn

from vllm_worker.errors import SettingsError
from vllm_worker.http_gate import Gate, Phase, health_only
from vllm_worker.settings import Settings
from vllm_worker.startup import serving

log = logging.getLogger(__name__)

ENGINE_WATCH_INTERVAL_S = 0.5
UNHEALTHY_MAX_WAIT_S = 30.0
SERVER_START_TIMEOUT_S = 30.0
# Once drained (or after the grace period), how long uvicorn waits for connections
# before it cancels their tasks.
CUT_OFF_S = 1


def serve(settings: Settings) -> int:
    """Serve until stopped; the process's exit code (0 after SIGTERM, 1 after the
    engine's death)."""
    gate = Gate(settings)
    servers = [_ServerThread(gate, settings.host, settings.port, "PORT")]
    if settings.port_health is not None and settings.port_health != settings.port:
        servers.append(
            _ServerThread(health_only(gate), settings.host, settings.port_health, "PORT_HEALTH")
        )
    try:
        for server in servers:
            server.start()
        with serving(settings) as worker:
            from vllm_worker.http_app import build_app  # imports vLLM: once it has started

            app = build_app(worker)
            run = _Run(gate, worker.engine.is_dead, settings.shutdown_grace_seconds)
            try:
                return run.until_stopped(app, servers[0])
            finally:
                # Before the engine stops: requests still in flight are cut off (their vLLM
                # requests aborted), not ended by the engine's shutdown as if complete.
                _stop(servers)
    finally:
        _stop(servers)  # the engine did not start: nothing is in flight


def _stop(servers: list[_ServerThread]) -> None:
    for server in servers:
        server.stop()


class _Run:
    """The serving phase, driven from the main thread (signals) and run in the server's
    event loop (everything that touches the gate)."""

    def __init__(self, gate: Gate, is_engine_dead: Any, grace_s: float) -> None:
        self.gate = gate
        self.is_engine_dead = is_engine_dead
        self.grace_s = grace_s
        self.stop_requested: asyncio.Event | None = None
        self.signals = 0

    def until_stopped(self, app: Any, server: _ServerThread) -> int:
        loop = server.loop
        future: Future[int] = asyncio.run_coroutine_threadsafe(self._serve(app), loop)

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            self.signals += 1
            log.info("%s: draining", signal.Signals(signum).name)
            loop.call_soon_threadsafe(self._request_stop)

        previous = {signum: signal.signal(signum, on_signal) for signum in _STOP_SIGNALS}
        try:
            while True:  # a bounded wait, so that signal handlers run in this thread
                try:
                    return future.result(timeout=0.5)
                except FutureTimeout:
                    if not server.thread.is_alive():  # uvicorn itself failed: see its log
                        log.error("the HTTP server stopped by itself; exiting with code 1")
                        return 1
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _request_stop(self) -> None:
        assert self.stop_requested is not None
        self.stop_requested.set()

    async def _serve(self, app: Any) -> int:
        self.stop_requested = asyncio.Event()
        if self.signals:  # a signal came between the engine's start and now
            self.stop_requested.set()
        self.gate.set_phase(Phase.SERVING, app)
        watch = asyncio.create_task(self._engine_death())
        stop = asyncio.create_task(self.stop_requested.wait())
        await asyncio.wait({watch, stop}, return_when=asyncio.FIRST_COMPLETED)
        watch.cancel()
        stop.cancel()
        if self.is_engine_dead():
            log.error("the engine died: refusing every request; exiting with code 1")
            self.gate.set_phase(Phase.DEAD)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.gate.death_reported.wait(), UNHEALTHY_MAX_WAIT_S)
            return 1
        await self._drain()
        return 0

    async def _engine_death(self) -> None:
        while not self.is_engine_dead():
            await asyncio.sleep(ENGINE_WATCH_INTERVAL_S)

    async def _drain(self) -> None:
        gate = self.gate
        log.info(
            "taking no more requests; %d in flight get %g s to finish",
            gate.in_flight,
            self.grace_s,
        )
        gate.set_phase(Phase.DRAINING)
        assert self.stop_requested is not None
        self.stop_requested.clear()
        idle = asyncio.create_task(gate.idle.wait())
        again = asyncio.create_task(self.stop_requested.wait())  # a second signal
        await asyncio.wait({idle, again}, timeout=self.grace_s, return_when=asyncio.FIRST_COMPLETED)
        idle.cancel()
        again.cancel()
        if gate.in_flight:
            log.warning("cutting off %d requests in flight (vLLM aborts them)", gate.in_flight)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _ServerThread:
    """uvicorn serving one app on one port, in a thread with its own event loop."""

    def __init__(self, app: Any, host: str, port: int, setting: str) -> None:
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            lifespan="off",
            access_log=False,  # paths only, but one line a request: the worker logs its own
            log_level="warning",
            timeout_graceful_shutdown=CUT_OFF_S,
            timeout_keep_alive=75,  # longer than a proxy's idle keep-alive
        )
        self.server = uvicorn.Server(config)
        self.setting = setting
        self.where = f"{host}:{port}"
        self.loop: asyncio.AbstractEventLoop = _new_loop()
        self.thread = threading.Thread(target=self._run, name=f"http-{port}", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.serve())
        except SystemExit:  # uvicorn exits when it cannot listen: start() reports it
            pass
        finally:
            self.loop.close()

    def start(self) -> None:
        self.thread.start()
        self.thread.join(0)
        waited = 0.0
        while not self.server.started:
            if not self.thread.is_alive() or waited > SERVER_START_TIMEOUT_S:
                raise SettingsError(
                    f"{self.setting} with HOST: cannot listen on {self.where} (the port is "
                    "taken, or HOST is not an address of this machine)"
                )
            self.thread.join(0.02)
            waited += 0.02
        log.info("HTTP server listening on %s (%s)", self.where, self.setting)

    def stop(self) -> None:
        """Stop serving (at once if it has stopped already)."""
        self.server.should_exit = True
        self.thread.join(CUT_OFF_S + 10.0)


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop where it is installed (vLLM's API server runs on it), else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover (vLLM installs it)
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
