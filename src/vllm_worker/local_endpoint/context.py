"""What the endpoint's two HTTP sides share: settings, the job store, change notification."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from vllm_worker.local_endpoint.jobs import JobStore, StoreLimits


@dataclass(frozen=True)
class EndpointConfig:
    """Settings of one local endpoint (the CLI's options)."""

    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port
    endpoint_id: str = "local"
    api_key: str | None = None  # clients must send it in ``Authorization`` when set
    limits: StoreLimits = field(default_factory=StoreLimits)
    runsync_wait_s: float = 90.0  # /runsync without ?wait=: RunPod's default
    take_hold_s: float = 5.0  # how long a worker's job-take poll is held when the queue is empty
    # The same for its job-stop poll. Longer would save the SDK's 1 s pause after an empty
    # answer, but a worker told to exit (SIGTERM) waits for this poll to end before it does.
    stop_hold_s: float = 5.0
    # Authenticates the worker side (in every worker URL's query string): only the worker
    # this endpoint started, or one given its environment, can take jobs and post results.
    worker_token: str = field(default_factory=lambda: secrets.token_urlsafe(16))


class Changes:
    """Wakes every waiter (held polls, /runsync) whenever the store changed."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait_for(self, ready: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until ``ready()`` (checked after every change) or the timeout; ``ready()``."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            event = self._event  # taken before awaiting: no change can be missed
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except asyncio.TimeoutError:
                return ready()
        return True


@dataclass
class Context:
    """The endpoint's state, used by both route tables."""

    config: EndpointConfig
    changes: Changes
    store: JobStore
    draining: bool = False  # shutting down: hand out no more jobs, answer held polls now
    workers_initializing: Callable[[], int] = lambda: 0

    @classmethod
    def create(cls, config: EndpointConfig) -> Context:
        changes = Changes()
        store = JobStore(config.limits, clock=time.monotonic, on_change=changes.notify)
        return cls(config=config, changes=changes, store=store)

    def drain(self) -> None:
        self.draining = True
        self.changes.notify()
