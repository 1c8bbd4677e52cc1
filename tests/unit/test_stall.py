"""The stall detector on a scripted clock: no real time passes, nothing is logged."""

from __future__ import annotations

import asyncio

import pytest

from vllm_worker.local_endpoint import stall
from vllm_worker.local_endpoint.stall import StallWatch


def run_ticks(watch: StallWatch, durations: list[float]) -> list[float]:
    """``watch.run`` for as many ticks as ``durations``, each sleep taking that long;
    returns what it passed to ``on_stall``."""
    now = [0.0]
    left = list(durations)
    reported: list[float] = []

    async def sleep(_seconds: float) -> None:
        if not left:
            raise asyncio.CancelledError
        now[0] += left.pop(0)

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(watch.run(clock=lambda: now[0], sleep=sleep, on_stall=reported.append))
    return reported


def test_a_late_wake_up_is_reported_with_its_figure() -> None:
    watch = StallWatch(tick_s=0.1, warn_after_s=1.0)
    reported = run_ticks(watch, [0.1, 0.5, 1.6, 0.1, 3.1])
    assert reported == pytest.approx([1.5, 3.0])
    assert watch.stalls == reported


def test_a_wake_up_less_than_the_threshold_late_is_not_reported() -> None:
    watch = StallWatch(tick_s=0.1, warn_after_s=1.0)
    assert run_ticks(watch, [0.1, 1.09, 0.2]) == []
    assert watch.stalls == []


def test_the_warning_names_the_figure_and_is_read_back_from_a_log() -> None:
    line = stall.describe(2.25)
    assert line.startswith("stall: the endpoint's event loop woke 2.25 s late")
    log = (
        "12:00 INFO local-endpoint: job a COMPLETED\n"
        f"12:01 WARNING local-endpoint: {line}\n"
        f"12:02 WARNING local-endpoint: {stall.describe(1.0, 'another loop')}\n"
    )
    assert stall.stalls_in(log) == [2.25, 1.0]
