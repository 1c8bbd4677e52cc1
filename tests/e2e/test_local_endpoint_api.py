"""The local endpoint's HTTP API without an engine: a scripted worker speaks the job API.

Quick checks of what the engine tests (``test_local_endpoint.py``) cannot reach in
reasonable time: API keys, execution timeouts reaching the worker's stop channel,
retention, /retry, /purge-queue, and refusals. Everything runs on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from vllm_worker.local_endpoint import EndpointConfig, StoreLimits, ThreadedEndpoint
from vllm_worker.local_endpoint.process import build_env, own_process_group

WORKER = "scripted-worker"


class ScriptedWorker:
    """Calls the worker-facing routes as the runpod SDK does."""

    def __init__(self, endpoint: ThreadedEndpoint) -> None:
        env = endpoint.worker_env(WORKER)
        self.take_url = env["RUNPOD_WEBHOOK_GET_JOB"].replace("$ID", WORKER)
        self.stop_url = self.take_url.replace("/job-take/", "/job-stop/")
        self.stream_url = env["RUNPOD_WEBHOOK_POST_STREAM"].replace("$RUNPOD_POD_ID", WORKER)
        self.done_url = env["RUNPOD_WEBHOOK_POST_OUTPUT"].replace("$RUNPOD_POD_ID", WORKER)

    def take(self) -> dict[str, Any] | None:
        reply = requests.get(self.take_url + "&job_in_progress=0", timeout=30)
        return None if reply.status_code == 204 else dict(reply.json())

    def stops(self) -> list[str]:
        reply = requests.get(self.stop_url, timeout=30)
        return [] if reply.status_code == 204 else list(reply.json()["jobsToStop"])

    def _post(self, url: str, job_id: str, body: Any) -> requests.Response:
        return requests.post(
            url.replace("$ID", job_id) + "&isStream=true",
            data=json.dumps(body),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            timeout=10,
        )

    def stream(self, job_id: str, output: Any) -> requests.Response:
        return self._post(self.stream_url, job_id, {"output": output})

    def done(self, job_id: str, body: Any) -> requests.Response:
        return self._post(self.done_url, job_id, body)


def make_endpoint(**limits: float) -> ThreadedEndpoint:
    config = EndpointConfig(port=0, limits=StoreLimits(**limits), take_hold_s=0.5, stop_hold_s=3.0)
    return ThreadedEndpoint(config)


@pytest.fixture
def endpoint() -> Iterator[ThreadedEndpoint]:
    with make_endpoint(execution_timeout_s=1.0, retention_s=1.0) as running:
        yield running


def test_an_api_key_is_required_only_when_configured() -> None:
    with ThreadedEndpoint(EndpointConfig(port=0, api_key="sekret")) as endpoint:
        url = f"{endpoint.url}/health"
        assert requests.get(url, timeout=10).status_code == 401
        assert requests.get(url, headers={"Authorization": "wrong"}, timeout=10).status_code == 401
        for header in ("sekret", "Bearer sekret"):  # the docs' form and the runpod SDK's
            reply = requests.get(url, headers={"Authorization": header}, timeout=10)
            assert reply.status_code == 200
            assert set(reply.json()) == {"jobs", "workers"}
        refused = requests.post(f"{endpoint.url}/run", json={"input": {}}, timeout=10)
        assert refused.status_code == 401
        assert "error" in refused.json()
    with make_endpoint() as endpoint:  # no key configured: any header, or none
        assert requests.get(f"{endpoint.url}/health", timeout=10).status_code == 200


def test_the_worker_side_wants_the_worker_token(endpoint: ThreadedEndpoint) -> None:
    worker = ScriptedWorker(endpoint)
    without = worker.take_url.split("?")[0] + "?job_in_progress=0"
    assert requests.get(without, timeout=10).status_code == 401
    assert worker.take() is None  # with it: an empty queue, held, then 204
    assert endpoint.call(lambda store: list(store.problems)) == [
        f"missing or wrong worker token on /v2/local/job-take/{WORKER}"
    ]


def test_an_execution_timeout_stops_the_job_on_its_worker(endpoint: ThreadedEndpoint) -> None:
    worker = ScriptedWorker(endpoint)
    job_id = requests.post(f"{endpoint.url}/run", json={"input": {"p": 1}}, timeout=10).json()["id"]
    job = worker.take()
    assert job == {"id": job_id, "input": {"p": 1}}
    assert worker.stream(job_id, "chunk 1").status_code == 200
    started = time.monotonic()
    assert worker.stops() == [job_id]  # held until the timeout hit
    assert 0.3 < time.monotonic() - started < 3.0
    body = requests.get(f"{endpoint.url}/status/{job_id}", timeout=10).json()
    assert body["status"] == "TIMED_OUT"
    assert body["error"].startswith("execution timeout")
    assert set(body) == {"id", "status", "delayTime", "executionTime", "error"}

    # The worker's late posts are taken (HTTP 200) and ignored.
    assert worker.stream(job_id, "chunk 2").status_code == 200
    assert worker.done(job_id, {"output": ["chunk 1", "chunk 2"]}).status_code == 200
    streamed = requests.get(f"{endpoint.url}/stream/{job_id}", timeout=10).json()
    assert streamed["status"] == "TIMED_OUT"
    assert [item["output"] for item in streamed["stream"]] == ["chunk 1"]

    # /retry queues it again, under the same id.
    retried = requests.post(f"{endpoint.url}/retry/{job_id}", timeout=10).json()
    assert retried == {"id": job_id, "status": "IN_QUEUE"}
    assert worker.take() == {"id": job_id, "input": {"p": 1}}
    worker.done(job_id, {"output": ["again"]})
    final = requests.get(f"{endpoint.url}/status/{job_id}", timeout=10).json()
    assert (final["status"], final["output"]) == ("COMPLETED", ["again"])
    health = requests.get(f"{endpoint.url}/health", timeout=10).json()
    assert health["jobs"] == {
        "completed": 1,
        "failed": 1,
        "inProgress": 0,
        "inQueue": 0,
        "retried": 1,
    }
    assert health["workers"]["idle"] == 1
    not_retryable = requests.post(f"{endpoint.url}/retry/{job_id}", timeout=10)
    assert not_retryable.status_code == 400


def test_results_expire_after_the_retention(endpoint: ThreadedEndpoint) -> None:
    worker = ScriptedWorker(endpoint)
    job_id = requests.post(f"{endpoint.url}/run", json={"input": {}}, timeout=10).json()["id"]
    worker.take()
    worker.done(job_id, {"output": "x"})
    assert requests.get(f"{endpoint.url}/status/{job_id}", timeout=10).status_code == 200
    deadline = time.monotonic() + 10
    while requests.get(f"{endpoint.url}/status/{job_id}", timeout=10).status_code == 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    gone = requests.get(f"{endpoint.url}/stream/{job_id}", timeout=10)
    assert (gone.status_code, gone.json()) == (404, {"error": "request does not exist"})


def test_runsync_waits_then_answers_with_the_job_to_poll(endpoint: ThreadedEndpoint) -> None:
    started = time.monotonic()
    reply = requests.post(f"{endpoint.url}/runsync?wait=1000", json={"input": {}}, timeout=10)
    assert 0.9 < time.monotonic() - started < 5
    body = reply.json()
    assert body == {"id": body["id"], "status": "IN_QUEUE"}
    assert body["id"].startswith("sync-")

    # A worker that finishes while /runsync waits: the reply carries the output.
    worker = ScriptedWorker(endpoint)

    def serve_one() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            job = worker.take()  # the first /runsync's job first: left to time out
            if job is not None and job["id"] != body["id"]:
                worker.stream(job["id"], {"text": ["a"]})
                worker.done(job["id"], {"output": [{"text": ["a"]}]})
                return

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    reply = requests.post(f"{endpoint.url}/runsync", json={"input": {"b": 2}}, timeout=30)
    thread.join(10)
    done = reply.json()
    assert set(done) == {"id", "status", "delayTime", "executionTime", "output"}
    assert (done["status"], done["output"]) == ("COMPLETED", [{"text": ["a"]}])


def test_cancel_and_purge_of_queued_jobs(endpoint: ThreadedEndpoint) -> None:
    ids = [
        requests.post(f"{endpoint.url}/run", json={"input": {"i": i}}, timeout=10).json()["id"]
        for i in range(3)
    ]
    cancelled = requests.post(f"{endpoint.url}/cancel/{ids[0]}", timeout=10).json()
    assert cancelled == {"id": ids[0], "status": "CANCELLED"}
    purged = requests.post(f"{endpoint.url}/purge-queue", timeout=10).json()
    assert purged == {"removed": 2, "status": "completed"}
    for job_id in ids:
        body = requests.get(f"{endpoint.url}/status/{job_id}", timeout=10).json()
        assert body == {"id": job_id, "status": "CANCELLED"}
    assert ScriptedWorker(endpoint).take() is None
    missing = requests.post(f"{endpoint.url}/cancel/nope", timeout=10)
    assert missing.status_code == 404


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/run", b"not json", 400),
        ("/run", json.dumps({"prompt": "no input key"}).encode(), 400),
        ("/run", json.dumps({"input": {}, "policy": {"executionTimeout": 100}}).encode(), 400),
        ("/runsync?wait=soon", json.dumps({"input": {}}).encode(), 400),
        ("/../other-endpoint/run", json.dumps({"input": {}}).encode(), 404),
        ("/no-such-operation", b"{}", 404),
    ],
)
def test_requests_the_endpoint_refuses(
    endpoint: ThreadedEndpoint, path: str, body: bytes, status: int
) -> None:
    url = endpoint.url + path
    if path.startswith("/.."):
        url = endpoint.url.replace("/v2/local", "/v2/other-endpoint/run")
    reply = requests.post(url, data=body, timeout=10)
    assert reply.status_code == status
    assert "error" in reply.json()


def test_stopping_answers_held_polls_at_once() -> None:
    endpoint = make_endpoint()
    endpoint.start()
    worker = ScriptedWorker(endpoint)  # its empty polls are held for 3 s
    answers: list[int] = []

    def poll() -> None:
        answers.append(requests.get(worker.stop_url, timeout=30).status_code)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not endpoint.call(
        lambda store: WORKER in store.workers and store.workers[WORKER].open_polls
    ):
        assert time.monotonic() < deadline, "the poll never reached the endpoint"
        time.sleep(0.01)
    started = time.monotonic()
    endpoint.stop()
    thread.join(10)
    assert answers == [204]
    assert time.monotonic() - started < 2.0


def test_the_worker_environment_attaches_it_and_keeps_the_callers_settings() -> None:
    caller = {
        "MODEL_NAME": "/models/llama",
        "RUNPOD_LOG_LEVEL": "INFO",
        "RUNPOD_VOLUME_PATH": "/vol",
        "RUNPOD_WEBHOOK_GET_JOB": "https://api.runpod.ai/elsewhere",
        "RUNPOD_REALTIME_PORT": "8000",  # would start the SDK's dev server instead
        "RUNPOD_API_KEY": "the user's real key",
        "VLLM_NO_USAGE_STATS": "0",
    }
    with make_endpoint() as endpoint:
        attach = endpoint.worker_env("w1")
    env = build_env(caller, attach)
    assert env["MODEL_NAME"] == "/models/llama"
    assert env["RUNPOD_LOG_LEVEL"] == "INFO"
    assert env["RUNPOD_VOLUME_PATH"] == "/vol"
    assert env["VLLM_NO_USAGE_STATS"] == "0"  # the caller's choice stands
    assert "RUNPOD_REALTIME_PORT" not in env
    assert "RUNPOD_API_KEY" not in env
    assert env["RUNPOD_WEBHOOK_GET_JOB"].startswith(endpoint.url + "/job-take/$ID?token=")
    assert env["RUNPOD_SKIP_AUTO_SYSTEM_CHECKS"] == env["RUNPOD_SKIP_GPU_CHECK"] == "true"
    assert env["RUNPOD_POD_ID"] == "w1"
    for name in ("RUNPOD_WEBHOOK_GET_JOB", "RUNPOD_WEBHOOK_POST_OUTPUT", "RUNPOD_WEBHOOK_PING"):
        assert env[name].startswith("http://127.0.0.1:")


def run_cli(*args: str, stop_once: str | None = None) -> tuple[int, str]:
    """``python -m vllm_worker.local_endpoint ...``; SIGTERM once a line of its output
    holds ``stop_once``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_worker.local_endpoint", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **own_process_group(),
    )
    try:
        early = b""
        if stop_once is not None:
            assert proc.stdout is not None
            for line in proc.stdout:  # ends with the process (its output closes)
                early += line
                if stop_once.encode() in line:
                    proc.send_signal(signal.SIGTERM)
                    break
        output, _ = proc.communicate(timeout=30)
        output = early + output
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode, output.decode(errors="replace")


def test_the_endpoint_exits_when_its_worker_dies() -> None:
    worker_cmd = f"{sys.executable} -c 'raise SystemExit(3)'"
    returncode, output = run_cli("--worker-cmd", worker_cmd)
    assert returncode == 1, output
    assert "the worker exited with code 3" in output, output


def test_no_worker_mode_prints_what_a_worker_needs_and_stops_on_sigterm() -> None:
    returncode, output = run_cli("--no-worker", stop_once="export RUNPOD_SKIP_GPU_CHECK")
    assert returncode == 0, output
    exports = dict(re.findall(r"export (\w+)='([^']*)'", output))
    assert exports["RUNPOD_WEBHOOK_GET_JOB"].startswith("http://127.0.0.1:")
    assert "/v2/local/job-take/$ID?token=" in exports["RUNPOD_WEBHOOK_GET_JOB"]
    assert exports["RUNPOD_SKIP_AUTO_SYSTEM_CHECKS"] == "true"
    assert "SIGTERM: stopping" in output


def test_the_worker_dies_with_a_killed_endpoint(tmp_path: Path) -> None:
    log_path = tmp_path / "endpoint.log"
    worker_cmd = f"{sys.executable} -c 'import time; time.sleep(120)'"
    command = [sys.executable, "-m", "vllm_worker.local_endpoint", "--port", "0"]
    command.extend(["--worker-cmd", worker_cmd])
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            **own_process_group(),
        )
    worker_pid = 0
    try:
        deadline = time.monotonic() + 30
        while not (found := re.search(r"started \(pid (\d+)\)", log_path.read_text())):
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        worker_pid = int(found.group(1))
        # Past the wrapper that arms the kernel's parent-death signal: it execs the worker.
        deadline = time.monotonic() + 30
        while b"time.sleep(120)" not in _cmdline(worker_pid):
            assert time.monotonic() < deadline, "the wrapper never started the worker"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # no chance to stop its worker itself
        proc.wait(10)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{worker_pid}").exists() and _state(worker_pid) != "Z":
            assert time.monotonic() < deadline, "the worker outlived the endpoint"
            time.sleep(0.1)
    finally:
        for pid in (proc.pid, worker_pid):
            if pid:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return stat[stat.rindex(")") + 2]


def test_a_worker_command_that_cannot_start_stops_the_endpoint() -> None:
    returncode, output = run_cli("--worker-cmd", "/nonexistent/worker --flag")
    assert returncode == 1, output
    assert "cannot start the worker: /nonexistent/worker" in output
