"""A stall detector: the endpoint's event loop notices when it wakes late.

A loop that sleeps 0.1 s and wakes a second or more later was held off the CPU (or held
by a blocking call). Every poll and post it serves waited as long, so a test that then
times out, or a stream that looks frozen, has its cause in the log: one warning with
the figure.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

TICK_S = 0.1  # how often the loop checks itself
WARN_AFTER_S = 1.0  # how late a wake-up must be to be reported
STALL_LINE = re.compile(r"stall: .* woke (\d+\.\d+) s late")  # what ``describe`` says


@dataclass
class StallWatch:
    """What was seen: every wake-up at least ``warn_after_s`` late, in seconds."""

    tick_s: float = TICK_S
    warn_after_s: float = WARN_AFTER_S
    stalls: list[float] = field(default_factory=list)

    def woke(self, slept_s: float) -> float | None:
        """Records a tick that took ``slept_s``; returns how late it was, when reported."""
        late_s = slept_s - self.tick_s
        if late_s < self.warn_after_s:
            return None
        self.stalls.append(late_s)
        return late_s

    async def run(
        self,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_stall: Callable[[float], None] | None = None,
    ) -> None:
        """Forever (cancel it to stop): sleep a tick; a late wake-up goes to ``on_stall``
        (default: ``report``, the log's warning)."""
        while True:
            before = clock()
            await sleep(self.tick_s)
            late_s = self.woke(clock() - before)
            if late_s is not None:
                (on_stall or report)(late_s)


def describe(late_s: float, where: str = "the endpoint's event loop") -> str:
    """The one line a stall gets."""
    return (
        f"stall: {where} woke {late_s:.2f} s late; every request it serves waited as long "
        "(a busy machine, or a process starving the others)"
    )


def report(late_s: float, where: str = "the endpoint's event loop") -> None:
    """A stall's warning in the log (the harness repeats a subprocess endpoint's here)."""
    log.warning("%s", describe(late_s, where))


def stalls_in(text: str) -> list[float]:
    """The figures of the stall warnings in a log."""
    return [float(late) for late in STALL_LINE.findall(text)]
