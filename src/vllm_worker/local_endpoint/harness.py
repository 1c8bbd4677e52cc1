"""The local endpoint and its worker as a subprocess, for tests and benchmarks.

``running_endpoint`` starts ``python -m vllm_worker.local_endpoint`` as a user starts it
(its own process, which runs ``src/handler.py`` in RunPod's production mode), yields once
the worker polls for jobs, and on exit stops both with SIGTERM, then kills whatever is
left of their process groups. Its whole output goes to a log file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_worker.local_endpoint import stall
from vllm_worker.local_endpoint.process import own_process_group

START_TIMEOUT_S = 600.0  # until the worker polls for jobs (another engine may be starting)
STOP_TIMEOUT_S = 150.0  # after SIGTERM, before SIGKILL (the endpoint gives its worker 90 s)


@dataclass
class EndpointProcess:
    """A running local endpoint: its process, its log, its URL and its worker's pid."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""
    worker_pid: int = 0
    headers: dict[str, str] = field(default_factory=dict)  # Authorization, with an API key

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 80) -> str:
        """The log's last lines, and every stall it reported (they explain a time-out)."""
        tail = self.log().splitlines()[-lines:]
        stalls = [f"{late:.2f} s" for late in stall.stalls_in(self.log())]
        return "\n".join([*tail, f"(stalls of its event loop: {', '.join(stalls) or 'none'})"])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"the endpoint exited with code {self.proc.returncode}:\n{self.log_tail()}"
            )

    def wait_for_log(self, pattern: str, timeout_s: float) -> re.Match[str]:
        """The first match of ``pattern`` in the log, once it is there."""
        deadline = time.monotonic() + timeout_s
        while not (match := re.search(pattern, self.log())):
            self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no {pattern!r} in the endpoint's log after {timeout_s} s:\n{self.log_tail()}"
                )
            time.sleep(0.1)
        return match

    def health(self) -> dict[str, Any]:
        request = urllib.request.Request(f"{self.url}/health", headers=self.headers)
        with urllib.request.urlopen(request, timeout=10) as reply:
            return dict(json.loads(reply.read()))

    def stop(self) -> None:
        """SIGTERM (the endpoint stops its worker), then kill what is left of both groups."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(STOP_TIMEOUT_S)
        for late_s in stall.stalls_in(self.log()):  # into this process's log (and pytest's)
            stall.report(late_s, where="a local endpoint subprocess's event loop")
        for group in (self.proc.pid, self.worker_pid):
            if group:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, signal.SIGKILL)
        self.proc.wait(10)


def endpoint_env(worker_env: Mapping[str, str]) -> dict[str, str]:
    """This process's environment minus RunPod's own variables, plus the worker's
    settings; loopback only (the SDK's start-up checks connect to 8.8.8.8)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("RUNPOD_")}
    env.update(worker_env)
    env.update({"RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true", "RUNPOD_SKIP_GPU_CHECK": "true"})
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@contextlib.contextmanager
def running_endpoint(
    worker_env: Mapping[str, str],
    log_path: Path,
    *,
    extra_args: Sequence[str] = (),
    api_key: str | None = None,
    start_timeout_s: float = START_TIMEOUT_S,
) -> Iterator[EndpointProcess]:
    """The endpoint and its worker (settings in ``worker_env``), once the worker polls."""
    command = [sys.executable, "-m", "vllm_worker.local_endpoint", "--port", "0"]
    command += ["--worker-stop-timeout", "90", *extra_args]
    if api_key:
        command += ["--api-key", api_key]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command,
            cwd=log_path.parent,
            env=endpoint_env(worker_env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its group is killed whole on exit; in this session: see own_process_group.
            **own_process_group(),
        )
    endpoint = EndpointProcess(proc, log_path)
    if api_key:
        endpoint.headers["Authorization"] = f"Bearer {api_key}"
    try:
        url = endpoint.wait_for_log(r"listening on (http://127\.0\.0\.1:\d+/\S+)\n", 60)
        endpoint.url = url.group(1)
        pid = endpoint.wait_for_log(r"worker \S+ started \(pid (\d+)\)", 60)
        endpoint.worker_pid = int(pid.group(1))
        _until_the_worker_polls(endpoint, start_timeout_s)
        yield endpoint
    finally:
        endpoint.stop()


def _until_the_worker_polls(endpoint: EndpointProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(endpoint.health()["workers"][state] for state in ("idle", "running")) < 1:
        endpoint.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the worker did not poll for jobs in {timeout_s} s:\n{endpoint.log_tail()}"
            )
        time.sleep(0.2)
