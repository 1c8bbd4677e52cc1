"""A worker in load-balancing mode (ENDPOINT_TYPE=load_balancer) as a subprocess.

``start_lb_worker`` runs ``python -u src/handler.py`` on a free loopback port, records every
status its health path answers from the process's start until it serves (200), and stops
it (its process group with it) on exit.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from production_worker import WorkerProcess

START_TIMEOUT_S = 240.0
PING_INTERVAL_S = 0.05


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class LBWorker:
    process: WorkerProcess
    url: str
    pings: list[int] = field(default_factory=list)  # statuses until the first 200; 0: refused

    def ping(self) -> int:
        try:
            return httpx.get(f"{self.url}/ping", timeout=10).status_code
        except httpx.TransportError:
            return 0

    def log_tail(self) -> str:
        return self.process.log_tail()

    def metric(self, name: str) -> float:
        """The sum of a metric's samples in /metrics (over its labels)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def wait_serving(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            self.process.check_alive()
            status = self.ping()
            if not self.pings or self.pings[-1] != status:
                self.pings.append(status)
            if status == 200:
                return
            time.sleep(PING_INTERVAL_S)
        raise AssertionError(f"not serving after {START_TIMEOUT_S} s:\n{self.log_tail()}")


@contextlib.contextmanager
def start_lb_worker(env: Mapping[str, str], workdir: Path) -> Iterator[LBWorker]:
    port = free_port()
    full_env = {
        **env,
        "ENDPOINT_TYPE": "load_balancer",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "LOG_LEVEL": "INFO",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    process = WorkerProcess(full_env, workdir, workdir / "worker.log")
    process.start()
    worker = LBWorker(process, f"http://127.0.0.1:{port}")
    try:
        worker.wait_serving()
        yield worker
    finally:
        process.stop()
