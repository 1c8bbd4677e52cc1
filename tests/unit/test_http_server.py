"""The load-balancing server's serving phase: draining after SIGTERM, a dead engine, a port
that is taken. The engine is a seam here (``is_engine_dead``); the whole process on the
real engine is tested end to end (tests/e2e/test_load_balancer.py)."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import pytest

from vllm_worker import http_server
from vllm_worker.errors import SettingsError
from vllm_worker.http_gate import Gate, Phase
from vllm_worker.settings import Settings


async def noop_app(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("no request here")


def run_for(grace_s: float, engine_dead: list[bool]) -> tuple[Gate, http_server._Run]:
    gate = Gate(Settings.from_env({}))
    return gate, http_server._Run(gate, lambda: engine_dead[0], grace_s)


async def until(predicate: Any) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


def test_a_stop_signal_drains_the_requests_in_flight_then_ends_with_0() -> None:
    async def scenario() -> tuple[int, list[Phase]]:
        gate, run = run_for(600.0, [False])
        serving = asyncio.create_task(run._serve(noop_app))
        await until(lambda: gate.phase is Phase.SERVING)
        gate.in_flight = 1  # a request in flight
        gate.idle.clear()
        run._request_stop()
        await until(lambda: gate.phase is Phase.DRAINING)
        assert not serving.done()  # it waits for the request
        gate.in_flight = 0
        gate.idle.set()
        return await serving, [gate.phase]

    code, phases = asyncio.run(scenario())
    assert code == 0 and phases == [Phase.DRAINING]


def test_the_grace_period_ends_the_drain(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> int:
        gate, run = run_for(0.05, [False])
        serving = asyncio.create_task(run._serve(noop_app))
        await until(lambda: gate.phase is Phase.SERVING)
        gate.in_flight = 1  # never ends
        gate.idle.clear()
        run._request_stop()
        return await serving

    with caplog.at_level(logging.INFO, logger=http_server.__name__):
        assert asyncio.run(scenario()) == 0
    assert "cutting off 1 requests in flight" in caplog.text


def test_a_second_signal_ends_the_drain_at_once() -> None:
    async def scenario() -> int:
        gate, run = run_for(600.0, [False])
        serving = asyncio.create_task(run._serve(noop_app))
        await until(lambda: gate.phase is Phase.SERVING)
        gate.in_flight = 1
        gate.idle.clear()
        run._request_stop()
        await until(lambda: gate.phase is Phase.DRAINING)
        run._request_stop()
        return await serving

    assert asyncio.run(scenario()) == 0


def test_a_dead_engine_ends_with_1_once_a_health_check_saw_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http_server, "ENGINE_WATCH_INTERVAL_S", 0.01)
    dead = [False]

    async def scenario() -> tuple[int, Phase, bool]:
        gate, run = run_for(600.0, dead)
        serving = asyncio.create_task(run._serve(noop_app))
        await until(lambda: gate.phase is Phase.SERVING)
        dead[0] = True
        await until(lambda: gate.phase is Phase.DEAD)
        for _ in range(10):  # it waits for a health check, however long
            await asyncio.sleep(0)
        waited = not serving.done()
        assert gate.health_status() == 503
        return await serving, gate.phase, waited

    assert asyncio.run(scenario()) == (1, Phase.DEAD, True)


def test_a_dead_engine_nobody_asks_about_ends_with_1_after_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http_server, "ENGINE_WATCH_INTERVAL_S", 0.01)
    monkeypatch.setattr(http_server, "UNHEALTHY_MAX_WAIT_S", 0.05)

    async def scenario() -> int:
        _gate, run = run_for(600.0, [True])
        return await run._serve(noop_app)

    assert asyncio.run(scenario()) == 1


def test_a_port_that_is_taken_stops_start_up_naming_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = http_server._ServerThread(noop_app, "127.0.0.1", port, "PORT")
        with pytest.raises(
            SettingsError, match=f"PORT with HOST: cannot listen on 127.0.0.1:{port}"
        ):
            server.start()
        server.stop()


def test_a_host_that_is_not_this_machines_stops_start_up_naming_it() -> None:
    server = http_server._ServerThread(noop_app, "203.0.113.7", 8123, "PORT")  # TEST-NET-3
    with pytest.raises(SettingsError, match="HOST is not an address of this machine"):
        server.start()
    server.stop()
