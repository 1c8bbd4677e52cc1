"""The front of the load-balancing server: health, admission and the body cap.

RunPod's load balancer sends each request straight to a worker, with no queue in front,
and reads the worker's health on ``HEALTH_CHECK_PATH`` (default ``/ping``): 204 while it
initializes, 200 once it is healthy, anything else unhealthy. ``Gate`` is the ASGI app
uvicorn serves from the process's first second, before vLLM is imported:

- the health path answers from the ``Phase`` (``PING_STATUS``);
- ``/metrics`` answers in Prometheus' text format from ``prometheus_client``'s registry,
  where vLLM records its ``vllm:*`` metrics and this module its own;
- any other request goes to the app on the engine (``http_app``) once it serves, and is
  refused at once otherwise: 503 with ``Retry-After`` while the worker starts, drains
  after SIGTERM or has lost its engine; 429 with ``Retry-After`` beyond MAX_CONCURRENCY
  requests in flight; 413 for a body over MAX_REQUEST_BYTES.

Refusals are the worker's errors, shaped by ``errors.http_error`` as every other error of
this server. Nothing here imports vLLM.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, make_asgi_app
from prometheus_client import Enum as StateMetric

from vllm_worker.errors import RequestTooLargeError, UnavailableError, WorkerError, http_error
from vllm_worker.settings import Settings

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Any  # ASGI's callables, kept loose: uvicorn's and Starlette's types differ
Send = Any

METRICS_PATH = "/metrics"
# How long a client is told to wait: a full worker frees a slot within a request's time;
# one that starts, stops or died comes back (or is replaced) only after seconds.
RETRY_AFTER_FULL_S = 1
RETRY_AFTER_UNAVAILABLE_S = 5


class Phase(enum.Enum):
    STARTING = "starting"  # the engine loads: nothing but health and metrics
    SERVING = "serving"
    DRAINING = "draining"  # SIGTERM: requests in flight finish, new ones are refused
    DEAD = "dead"  # the engine died: the process exits 1


PING_STATUS = {Phase.STARTING: 204, Phase.SERVING: 200, Phase.DRAINING: 503, Phase.DEAD: 503}

_UNAVAILABLE = {
    Phase.STARTING: "the worker is starting (its engine loads)",
    Phase.DRAINING: "the worker is shutting down (SIGTERM)",
    Phase.DEAD: "the worker's engine stopped (its process died); this worker is replaced",
}

# The worker's own metrics, beside vLLM's (one set per process: the registry is global).
IN_FLIGHT = Gauge("vllm_worker_requests_in_flight", "Requests the server is answering now.")
FINISHED = Counter(
    "vllm_worker_requests", "Requests answered by the engine's app, by HTTP status.", ["status"]
)
REFUSED = Counter(
    "vllm_worker_requests_refused",
    "Requests refused before the engine's app, by reason.",
    ["reason"],
)
STATE = StateMetric(
    "vllm_worker_phase", "The server's phase.", states=[phase.value for phase in Phase]
)


class _BodyTooLargeError(Exception):
    """The body passed MAX_REQUEST_BYTES while the engine's app read it."""


class Gate:
    """The ASGI app uvicorn serves (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.health_path = settings.health_check_path
        self.max_concurrency = settings.max_concurrency
        self.max_request_bytes = settings.max_request_bytes
        self.app: Any = None  # the engine's app, once it serves
        self.in_flight = 0
        self.idle = asyncio.Event()  # no request in flight (bound to the serving loop)
        self.idle.set()
        self.death_reported = asyncio.Event()  # a health check was told "unhealthy"
        self._metrics = make_asgi_app(REGISTRY)
        self.phase = Phase.STARTING
        STATE.state(self.phase.value)

    def health_status(self) -> int:
        """The health path's answer; once the engine died, the first 503 is noted
        (``death_reported``): the process exits after it."""
        if self.phase is Phase.DEAD:
            self.death_reported.set()
        return PING_STATUS[self.phase]

    def set_phase(self, phase: Phase, app: Any = None) -> None:
        if app is not None:
            self.app = app
        log.info("HTTP server: %s -> %s", self.phase.value, phase.value)
        self.phase = phase
        STATE.state(phase.value)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # no lifespan (uvicorn's is off), no websockets
            return
        path = scope["path"]
        if path == self.health_path:
            await _empty(send, self.health_status())
        elif path == METRICS_PATH or path.startswith(METRICS_PATH + "/"):
            await self._metrics(scope, receive, send)
        else:
            await self._admit(scope, receive, send)

    async def _admit(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._refusal(scope)
        if refusal is not None:
            await _refuse(send, refusal)
            return
        self.in_flight += 1
        self.idle.clear()
        IN_FLIGHT.inc()
        response = _Response(send)
        try:
            await self.app(scope, self._capped(receive), response.send)
        except _BodyTooLargeError:
            if not response.started:
                await _refuse(send, self._too_large())
        finally:
            self.in_flight -= 1
            IN_FLIGHT.dec()
            if self.in_flight == 0:
                self.idle.set()
            FINISHED.labels(str(response.status)).inc()

    def _refusal(self, scope: Scope) -> WorkerError | None:
        """Why a request cannot be taken now; None when it can."""
        phase = self.phase
        if phase is not Phase.SERVING:
            REFUSED.labels(phase.value).inc()
            return UnavailableError(
                f"{_UNAVAILABLE[phase]}: retry the request",
                status=503,
                retry_after_s=RETRY_AFTER_UNAVAILABLE_S,
            )
        if self.in_flight >= self.max_concurrency:
            REFUSED.labels("full").inc()
            return UnavailableError(
                f"the worker is answering {self.in_flight} requests, its most "
                f"(MAX_CONCURRENCY={self.max_concurrency}): retry the request",
                status=429,
                retry_after_s=RETRY_AFTER_FULL_S,
            )
        length = _content_length(scope)
        if length is not None and length > self.max_request_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> WorkerError:
        REFUSED.labels("too_large").inc()
        return RequestTooLargeError(
            f"body: over {self.max_request_bytes} bytes, the most a request may send "
            "(MAX_REQUEST_BYTES)"
        )

    def _capped(self, receive: Receive) -> Receive:
        """``receive``, raising ``_BodyTooLargeError`` once the body passes the cap (a body
        sent without a Content-Length)."""
        received = 0

        async def capped_receive() -> Message:
            nonlocal received
            message: Message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_request_bytes:
                    raise _BodyTooLargeError
            return message

        return capped_receive


def health_only(gate: Gate) -> Any:
    """The ASGI app of a PORT_HEALTH of its own: the gate's health path, nothing else."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            found = scope["path"] == gate.health_path
            await _empty(send, gate.health_status() if found else 404)

    return app


class _Response:
    """``send``, noting the response's status once it starts."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.status = 0  # 0: the app sent nothing (the client left first)

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.status = message["status"]
        await self._send(message)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _empty(send: Send, status: int) -> None:
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def _refuse(send: Send, error: WorkerError) -> None:
    status, body = http_error(error)
    headers = [(b"content-type", b"application/json")]
    if isinstance(error, UnavailableError):
        headers.append((b"retry-after", str(error.retry_after_s).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})
