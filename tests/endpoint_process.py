"""A local endpoint with its real worker, as a subprocess, and a RunPod client's helpers.

``start_endpoint`` runs ``python -m vllm_worker.local_endpoint`` as a user runs it: its
own process, which starts ``src/handler.py`` in RunPod's production mode (the runpod
SDK's real job loop) on vLLM's CPU build and the tiny model. It yields once the worker
polls for jobs, and on exit stops both with SIGTERM, then kills whatever is left.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

START_TIMEOUT_S = 240.0  # until the worker polls for jobs (another engine may be starting)
JOB_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 150.0  # the endpoint gives its worker 90 s (below) to shut down


@dataclass
class EndpointProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""
    worker_pid: int = 0
    headers: dict[str, str] = field(default_factory=dict)  # Authorization, with an API key

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"the endpoint exited with code {self.proc.returncode}:\n{self.log_tail()}"
            )

    def wait_for_log(self, pattern: str, timeout_s: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while True:
            if match := re.search(pattern, self.log()):
                return match
            self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {pattern!r} in the endpoint's log after {timeout_s} s")
            time.sleep(0.1)

    def kill_everything(self) -> None:
        for pgid in (self.proc.pid, self.worker_pid):
            if pgid:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
        self.proc.wait(10)


@contextlib.contextmanager
def start_endpoint(
    worker_env: Mapping[str, str],
    workdir: Path,
    extra_env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    api_key: str | None = None,
) -> Iterator[EndpointProcess]:
    """An endpoint whose worker serves the tiny model; stopped (and reaped) on exit.

    ``worker_env`` is the ``worker_env`` fixture; ``extra_env`` overrides its settings
    (e.g. ``MAX_CONCURRENCY``); ``extra_args`` go to the endpoint's command line;
    ``api_key``: the endpoint checks it, and the calls below send it.
    """
    env = {
        **worker_env,  # the tiny model; STREAM_MIN_INTERVAL_MS=0: a chunk per engine step
        "LOG_LEVEL": "INFO",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MAX_CONCURRENCY": "64",
        # Room for the seed's own max_tokens (1000); the fixed KV cache holds 64k tokens.
        "MAX_MODEL_LEN": "2048",
        **(extra_env or {}),
    }
    command = [
        sys.executable,
        "-m",
        "vllm_worker.local_endpoint",
        "--port",
        "0",  # any free port; the URL is in its output
        "--log-level",
        "DEBUG",
        "--worker-stop-timeout",
        "90",  # vLLM's shutdown is slow on a busy machine
        *extra_args,
        *(["--api-key", api_key] if api_key else []),
    ]
    log_path = workdir / "endpoint.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    process = EndpointProcess(proc, log_path)
    if api_key:
        process.headers["Authorization"] = f"Bearer {api_key}"
    try:
        _wait_until_ready(process)
        yield process
    except BaseException:
        print("endpoint log (tail):\n" + process.log_tail())
        raise
    finally:
        stop(process)


def _wait_until_ready(process: EndpointProcess) -> None:
    url = process.wait_for_log(r"listening on (http://127\.0\.0\.1:\d+/v2/local)\n", 30)
    process.url = url.group(1)
    pid = process.wait_for_log(r"worker \S+ started \(pid (\d+)\)", 30)
    process.worker_pid = int(pid.group(1))
    started = time.monotonic()
    deadline = started + START_TIMEOUT_S
    while sum(health(process)["workers"][state] for state in ("idle", "running")) < 1:
        process.check_alive()
        assert time.monotonic() < deadline, "the worker did not start polling"
        time.sleep(0.5)
    print(f"endpoint {process.url}: worker ready in {time.monotonic() - started:.1f} s")


def stop(process: EndpointProcess) -> None:
    """SIGTERM (a no-op if it already exited), then kill whatever is left."""
    if process.proc.poll() is None:
        process.proc.send_signal(signal.SIGTERM)
        try:
            process.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print("the endpoint did not stop on SIGTERM: killed")
    process.kill_everything()


# --- a RunPod client's calls --------------------------------------------------------------


def health(endpoint: EndpointProcess) -> dict[str, Any]:
    reply = requests.get(f"{endpoint.url}/health", headers=endpoint.headers, timeout=10)
    return dict(reply.json())


def submit(endpoint: EndpointProcess, job_input: dict[str, Any]) -> str:
    reply = requests.post(
        f"{endpoint.url}/run", json={"input": job_input}, headers=endpoint.headers, timeout=10
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body == {"id": body["id"], "status": "IN_QUEUE"}
    return str(body["id"])


def status(endpoint: EndpointProcess, job_id: str) -> dict[str, Any]:
    reply = requests.get(f"{endpoint.url}/status/{job_id}", headers=endpoint.headers, timeout=10)
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


def wait_final(endpoint: EndpointProcess, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (body := status(endpoint, job_id))["status"] in {"IN_QUEUE", "IN_PROGRESS"}:
        endpoint.check_alive()
        assert time.monotonic() < deadline, f"job {job_id} still {body['status']}"
        time.sleep(0.1)
    return body
