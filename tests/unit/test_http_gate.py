"""The load-balancing server's gate: health, admission and the body cap, on a fake app.

The app behind the gate is a seam: here an ASGI app that answers at once, or holds its
request until the test lets it go. The real app on the real engine is tested end to end
(tests/e2e/test_load_balancer.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from vllm_worker.http_gate import Gate, Phase, health_only
from vllm_worker.settings import Settings


class HeldApp:
    """Answers 200 with the body it read; holds each request until ``release`` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.entered += 1
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


def gate_with(app: Any = None, **env: str) -> Gate:
    gate = Gate(Settings.from_env(env))
    if app is not None:
        gate.set_phase(Phase.SERVING, app)
    return gate


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gate")


@pytest.mark.parametrize(
    ("phase", "status"),
    [(Phase.STARTING, 204), (Phase.SERVING, 200), (Phase.DRAINING, 503), (Phase.DEAD, 503)],
)
def test_the_health_path_answers_runpods_codes(phase: Phase, status: int) -> None:
    async def scenario() -> None:
        gate = gate_with(HEALTH_CHECK_PATH="/healthz")
        gate.phase = phase
        async with client(gate) as http:
            assert (await http.get("/healthz")).status_code == status
        async with client(health_only(gate)) as http:  # PORT_HEALTH's server
            assert (await http.get("/healthz")).status_code == status
            assert (await http.get("/v1/models")).status_code == 404

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("phase", "says"),
    [
        (Phase.STARTING, "the worker is starting"),
        (Phase.DRAINING, "shutting down (SIGTERM)"),
        (Phase.DEAD, "engine stopped"),
    ],
)
def test_a_worker_that_does_not_serve_refuses_with_503_and_retry_after(
    phase: Phase, says: str
) -> None:
    async def scenario() -> httpx.Response:
        gate = gate_with(HeldApp())
        gate.phase = phase
        async with client(gate) as http:
            return await http.post("/v1/chat/completions", json={})

    answer = asyncio.run(scenario())
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "5"
    error = answer.json()["error"]
    assert says in error["message"] and error["code"] == 503
    assert error["type"] == "ServiceUnavailableError"


def test_beyond_max_concurrency_a_request_gets_429_at_once() -> None:
    async def scenario() -> tuple[httpx.Response, list[httpx.Response], Gate]:
        app = HeldApp()
        gate = gate_with(app, MAX_CONCURRENCY="2")
        async with client(gate) as http:
            held = [asyncio.create_task(http.post("/generate", content=b"x")) for _ in range(2)]
            while app.entered < 2:
                await asyncio.sleep(0)
            refused = await http.post("/generate", content=b"y")
            assert gate.in_flight == 2 and not gate.idle.is_set()
            app.release.set()
            return refused, await asyncio.gather(*held), gate

    refused, served, gate = asyncio.run(scenario())
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert "MAX_CONCURRENCY=2" in refused.json()["error"]["message"]
    assert [answer.status_code for answer in served] == [200, 200]
    assert gate.in_flight == 0 and gate.idle.is_set()


def test_a_body_over_the_cap_gets_413_with_or_without_a_length() -> None:
    async def scenario() -> list[httpx.Response]:
        app = HeldApp()
        app.release.set()
        gate = gate_with(app, MAX_REQUEST_BYTES="1000")

        async def chunked() -> Any:
            for _ in range(3):
                yield b"x" * 600

        async with client(gate) as http:
            return [
                await http.post("/generate", content=b"x" * 1001),
                await http.post("/generate", content=chunked()),
                await http.post("/generate", content=b"x" * 1000),
            ]

    too_long, too_long_chunked, fits = asyncio.run(scenario())
    for answer in (too_long, too_long_chunked):
        assert answer.status_code == 413
        assert "body: over 1000 bytes" in answer.json()["error"]["message"]
        assert "MAX_REQUEST_BYTES" in answer.json()["error"]["message"]
    assert fits.status_code == 200


def test_metrics_answer_in_prometheus_format_from_the_first_second() -> None:
    async def scenario() -> httpx.Response:
        async with client(gate_with()) as http:  # still starting
            return await http.get("/metrics")

    answer = asyncio.run(scenario())
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    assert 'vllm_worker_phase{vllm_worker_phase="starting"} 1.0' in answer.text
    assert "vllm_worker_requests_in_flight" in answer.text


def test_refusals_are_counted_by_reason() -> None:
    async def scenario() -> str:
        gate = gate_with()
        async with client(gate) as http:
            await http.post("/generate", content=b"{}")
            return (await http.get("/metrics")).text

    text = asyncio.run(scenario())
    line = next(line for line in text.splitlines() if 'reason="starting"' in line)
    assert float(line.split()[-1]) >= 1
