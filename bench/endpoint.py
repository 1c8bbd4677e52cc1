"""The benchmark's endpoint mode: jobs through the local endpoint, over HTTP, as a client sees them.

``bench/run.py`` calls this after its in-process engine has stopped. It starts
``python -m vllm_worker.local_endpoint`` (which runs ``src/handler.py`` in RunPod's
production mode: the runpod SDK's job loop, its HTTP posts per chunk, the worker's default
coalescing) and plays RunPod clients against it: ``POST /run``, then ``GET /stream/<id>``
until the job ends, polling again at once after a reply that carried chunks and after
``poll_interval_s`` after an empty one (as ``vllm_worker.client.EndpointClient.stream``
does). Times are taken on the client: the first chunk is the first ``/stream`` reply that
carries one, counted from just before ``POST /run``. Bytes on the wire are the HTTP bodies
of the job's requests and replies (``/run`` and every poll, empty ones included; headers
not counted), the count of requests beside them.

Loaded by path from ``bench/run.py`` (which also runs as a script), so it imports nothing
from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from vllm_worker.client import RUNNING, DeltaTracker

START_TIMEOUT_S = 600.0  # until the worker polls for jobs (the engine starts: 20-60 s here)
STOP_TIMEOUT_S = 150.0  # the endpoint gives its worker 60 s (below), then kills it
JOB_TIMEOUT_S = 600.0


@dataclass
class EndpointTrace:
    """One job as the client saw it; times in perf_counter seconds."""

    started: float
    arrivals: list[float] = field(default_factory=list)  # replies that carried chunks
    chunks: int = 0
    tokens: int = 0
    wire_bytes: int = 0
    requests: int = 0
    final_text_bytes: int = 0


@dataclass
class RunningEndpoint:
    proc: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""
    worker_pid: int = 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout_s: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while not (match := re.search(pattern, self.log())):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the local endpoint exited: {self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {pattern!r} in {self.log_path} after {timeout_s} s")
            time.sleep(0.2)
        return match


def endpoint_env(worker_env: Mapping[str, str]) -> dict[str, str]:
    """This environment minus RunPod's own variables, plus the worker's settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RUNPOD_")}
    env.update(worker_env)
    # The SDK's start-up checks connect to 8.8.8.8 and need a GPU: loopback only here.
    env.update({"RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true", "RUNPOD_SKIP_GPU_CHECK": "true"})
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@contextlib.contextmanager
def running_endpoint(worker_env: Mapping[str, str], log_path: Path) -> Iterator[str]:
    """Start the local endpoint and its worker; yield its URL once the worker polls."""
    command = [
        sys.executable,
        "-m",
        "vllm_worker.local_endpoint",
        "--port",
        "0",
        "--worker-stop-timeout",
        "60",
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command,
            env=endpoint_env(worker_env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    endpoint = RunningEndpoint(proc, log_path)
    try:
        endpoint.url = endpoint.wait_for_log(r"listening on (http://127\.0\.0\.1:\d+/\S+)\n", 60)[1]
        pid = endpoint.wait_for_log(r"worker \S+ started \(pid (\d+)\)", 60)
        endpoint.worker_pid = int(pid[1])
        asyncio.run(_wait_for_worker(endpoint))
        yield endpoint.url
    finally:
        _stop(endpoint)


async def _wait_for_worker(endpoint: RunningEndpoint) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(f"{endpoint.url}/health") as reply:
                workers = (await reply.json())["workers"]
            if workers["idle"] + workers["running"] >= 1:
                return
            if endpoint.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start: {endpoint.log()[-3000:]}")
            await asyncio.sleep(0.5)


def _stop(endpoint: RunningEndpoint) -> None:
    """SIGTERM (the endpoint stops its worker), then kill what is left of both groups."""
    if endpoint.proc.poll() is None:
        endpoint.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            endpoint.proc.wait(STOP_TIMEOUT_S)
    for group in (endpoint.proc.pid, endpoint.worker_pid):
        if group:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
    endpoint.proc.wait(10)


async def run_job(
    session: aiohttp.ClientSession, url: str, job_input: dict[str, Any], poll_interval_s: float
) -> EndpointTrace:
    """``POST /run``, then poll ``/stream`` until the job ends; what the client saw."""
    tracker = DeltaTracker(cumulative=job_input.get("stream_mode", "cumulative") != "delta")
    body = json.dumps({"input": job_input}).encode()
    trace = EndpointTrace(started=time.perf_counter())
    async with session.post(f"{url}/run", data=body) as reply:
        raw = await reply.read()
    trace.wire_bytes += len(body) + len(raw)
    trace.requests += 1
    job_id = json.loads(raw)["id"]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        async with session.get(f"{url}/stream/{job_id}") as reply:
            raw = await reply.read()
        now = time.perf_counter()
        trace.wire_bytes += len(raw)
        trace.requests += 1
        answer = json.loads(raw)
        chunks = [item["output"] for item in answer.get("stream", [])]
        if chunks:
            trace.arrivals.append(now)
            trace.chunks += len(chunks)
            for chunk in chunks:
                tracker.feed(chunk)
        if answer["status"] not in RUNNING:
            if answer["status"] != "COMPLETED" or tracker.final is None:
                raise RuntimeError(f"job {job_id}: {answer['status']} {answer.get('error')}")
            trace.tokens = tracker.final["usage"]["completion_tokens"]
            trace.final_text_bytes = len(tracker.texts.get(0, "").encode())
            return trace
        if not chunks:
            await asyncio.sleep(poll_interval_s)
    raise RuntimeError(f"job {job_id} still running after {JOB_TIMEOUT_S:.0f} s")


async def run_cell(
    url: str, job_inputs: list[dict[str, Any]], concurrency: int, poll_interval_s: float
) -> tuple[list[EndpointTrace], float]:
    """``concurrency`` clients run ``job_inputs`` back to back; the traces and the wall time."""
    pending = iter(job_inputs)
    traces: list[EndpointTrace] = []
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client() -> None:
            for job_input in pending:
                traces.append(await run_job(session, url, job_input, poll_interval_s))

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return traces, time.perf_counter() - started
