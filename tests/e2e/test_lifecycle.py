"""End to end: the worker's life cycle under the local endpoint, on the real engine.

Cancelled and timed-out jobs stop generating at once, SIGTERM aborts what outlives the
grace period and exits 0, and a dead engine fails every job in flight and exits
non-zero. The endpoint (``tests/endpoint_process.py``) runs the worker in RunPod's
production mode; what the engine did is read from the worker's log, which the endpoint's
log holds: ``request <job id>-<suffix> aborted ...`` is written once vLLM aborted it.

One endpoint serves the module (its worker's grace period is 1 s) until the SIGTERM test
stops it; the engine-death test starts its own.
"""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from endpoint_process import (
    JOB_TIMEOUT_S,
    STOP_TIMEOUT_S,
    EndpointProcess,
    start_endpoint,
    status,
    submit,
)
from helpers import ENDLESS_TOKENS, LONG_CONTEXT_ENV, REPO_ROOT, engine_core, group_members
from production_worker import WorkerProcess
from vllm_worker.local_endpoint import EndpointConfig, ThreadedEndpoint
from vllm_worker.local_endpoint.jobs import Job
from vllm_worker.local_endpoint.process import build_env

LONG_TOKENS = 400  # work that ends by itself while the endless jobs beside it are cancelled
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}
# A chunk per engine step for 20 jobs floods the endpoint with posts on 2 shared cores, so
# that a client's polls come seconds apart: chunks every 200 ms here.
QUIETER = {"STREAM_MIN_INTERVAL_MS": "200"}


@pytest.fixture(scope="module")
def endpoint(
    worker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EndpointProcess]:
    workdir = tmp_path_factory.mktemp("lifecycle")
    settings = QUIETER | {"SHUTDOWN_GRACE_SECONDS": "1"} | LONG_CONTEXT_ENV
    with start_endpoint(worker_env, workdir, settings) as process:
        yield process


def endless_job(number: int, n: int = 1) -> dict[str, Any]:
    return {
        "prompt": f"Job {number}: an endless story",
        "sampling_params": {"n": n, "max_tokens": ENDLESS_TOKENS, "ignore_eos": True},
    }


def long_job(number: int, n: int = 1) -> dict[str, Any]:
    return {
        "prompt": f"Job {number}: a very long story",
        "sampling_params": {"n": n, "max_tokens": LONG_TOKENS, "ignore_eos": True},
    }


def wait_all(endpoint: EndpointProcess, job_ids: list[str], states: set[str]) -> dict[str, Any]:
    """Poll until every job is in one of ``states``; their last status bodies."""
    deadline = time.monotonic() + 2 * JOB_TIMEOUT_S
    bodies: dict[str, Any] = {}
    while True:
        for job_id in job_ids:
            if bodies.get(job_id, {}).get("status") not in FINAL:
                bodies[job_id] = status(endpoint, job_id)
        if all(body["status"] in states for body in bodies.values()):
            return bodies
        endpoint.check_alive()
        assert time.monotonic() < deadline, {i: b["status"] for i, b in bodies.items()}
        time.sleep(0.1)


def running_jobs(
    endpoint: EndpointProcess, job_ids: list[str], count: int, then: Callable[[str], bool]
) -> list[str]:
    """Poll the jobs; ``then(job)`` for each one seen streaming while still in progress
    (its request runs in the engine), until it returned True ``count`` times. The jobs it
    returned True for. On 2 loaded cores a job can end between two polls: it is skipped."""
    pending, chosen = list(job_ids), list[str]()
    deadline = time.monotonic() + 2 * JOB_TIMEOUT_S
    while len(chosen) < count:
        assert pending, f"only {len(chosen)} of {count} jobs were seen running"
        for job_id in list(pending):
            seen = requests.get(f"{endpoint.url}/stream/{job_id}", timeout=10).json()
            if seen["stream"] or seen["status"] in FINAL:
                pending.remove(job_id)
            if seen["stream"] and seen["status"] == "IN_PROGRESS" and then(job_id):
                chosen.append(job_id)
                if len(chosen) == count:
                    break
        assert time.monotonic() < deadline, f"not streaming: {pending}"
        time.sleep(0.05)
    return chosen


def cancel(endpoint: EndpointProcess, job_id: str) -> bool:
    reply = requests.post(f"{endpoint.url}/cancel/{job_id}", timeout=10).json()
    assert reply["status"] in {"CANCELLED", "COMPLETED"}, reply
    return bool(reply["status"] == "CANCELLED")  # else it ended before the cancel came


def aborted_tokens(log: str, job_id: str) -> int | None:
    """Tokens the engine had generated when it aborted the job's request (worker log)."""
    found = re.search(rf"request {re.escape(job_id)}-\w+ aborted after (\d+) tokens", log)
    return None if found is None else int(found.group(1))


def test_cancelling_10_of_20_running_jobs_stops_them_and_the_rest_complete(
    endpoint: EndpointProcess,
) -> None:
    """20 jobs at once: 10 that cannot end by themselves are cancelled once each is seen
    running; the 10 others complete."""
    jobs = [
        submit(endpoint, endless_job(number) if number % 2 else long_job(number))
        for number in range(20)
    ]
    endless, to_finish = jobs[1::2], jobs[0::2]
    # RunPod's execution timeout stops a job through the same channel as a cancel.
    timed = requests.post(
        f"{endpoint.url}/run",
        json={"input": endless_job(20, n=2), "policy": {"executionTimeout": 5000}},
        timeout=10,
    ).json()["id"]
    to_cancel = running_jobs(endpoint, endless, 10, lambda job_id: cancel(endpoint, job_id))
    assert sorted(to_cancel) == sorted(endless)

    finished = wait_all(endpoint, to_finish, {"COMPLETED"})
    for body in finished.values():
        final = body["output"][-1]
        assert final["finish_reason"] == ["length"]
        assert final["usage"]["completion_tokens"] == LONG_TOKENS

    # Each cancelled job's vLLM request was aborted.
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while any(aborted_tokens(endpoint.log(), job_id) is None for job_id in to_cancel):
        endpoint.check_alive()
        assert time.monotonic() < deadline, endpoint.log_tail()
        time.sleep(0.2)
    log = endpoint.log()
    at_abort = sorted(aborted_tokens(log, job_id) or 0 for job_id in to_cancel)
    assert at_abort[-1] < ENDLESS_TOKENS, at_abort
    for job_id in to_cancel:  # aborted once the SDK stopped it, not before
        assert log.index(f"| {job_id} | Stopping job.") < log.index(f"request {job_id}-")
    for job_id in to_cancel:
        assert status(endpoint, job_id)["status"] == "CANCELLED"
        assert f"job {job_id} done:" not in log  # the handler never finished it
    print(f"cancelled jobs: tokens generated when their requests were aborted: {at_abort}")

    # The timed job cannot end by itself within its 5 s, whatever the machine's speed.
    assert wait_all(endpoint, [timed], FINAL)[timed]["status"] == "TIMED_OUT"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (tokens := aborted_tokens(endpoint.log(), timed)) is None:
        endpoint.check_alive()
        assert time.monotonic() < deadline, endpoint.log_tail()
        time.sleep(0.2)
    assert tokens < 2 * ENDLESS_TOKENS
    assert f"job {timed} done:" not in endpoint.log()
    print(f"timed-out job: {tokens} of {2 * ENDLESS_TOKENS} tokens when it was aborted")


def test_sigterm_aborts_the_jobs_left_after_the_grace_period_and_exits_0(
    endpoint: EndpointProcess,
) -> None:
    """Runs last in the module's endpoint: it stops its worker (grace period 1 s)."""
    jobs = [submit(endpoint, endless_job(number, n=2)) for number in range(4)]
    running_jobs(endpoint, jobs, 1, lambda _job_id: True)
    os.kill(endpoint.worker_pid, signal.SIGTERM)
    bodies = wait_all(endpoint, jobs, FINAL)
    log = endpoint.log()
    for job_id, body in bodies.items():
        assert body["status"] == "FAILED", body
        assert body["error"].startswith("engine_error: the worker is shutting down (SIGTERM)")
        assert "SHUTDOWN_GRACE_SECONDS" in body["error"]
        tokens = aborted_tokens(log, job_id)
        assert tokens is not None and tokens < 2 * ENDLESS_TOKENS, (job_id, tokens)
    print(f"SIGTERM, 1 s grace: {sorted(body['status'] for body in bodies.values())}")
    # The worker exits 0 once they are posted; the endpoint, left without it, stops.
    assert endpoint.proc.wait(STOP_TIMEOUT_S) == 1
    # Every job was posted before the exit: none was left for the endpoint to fail.
    assert "the worker exited with code 0; 0 jobs in progress failed" in endpoint.log()


def test_killing_the_engine_fails_the_jobs_in_flight_and_the_worker_exits_1(
    worker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """6 jobs that cannot end by themselves, each seen streaming: the engine's process is
    killed, and every one of them ends FAILED with the engine's error."""
    workdir = tmp_path_factory.mktemp("engine-death")
    with start_endpoint(worker_env, workdir, QUIETER | LONG_CONTEXT_ENV) as endpoint:
        jobs = [submit(endpoint, endless_job(number, n=2)) for number in range(6)]
        assert sorted(running_jobs(endpoint, jobs, 6, lambda _job_id: True)) == sorted(jobs)
        os.kill(engine_core(endpoint.worker_pid), signal.SIGKILL)
        killed_at = time.monotonic()
        bodies = wait_all(endpoint, jobs, FINAL)
        failed_after = time.monotonic() - killed_at
        for body in bodies.values():
            assert body["status"] == "FAILED", body
            assert body["error"] == (
                "engine_error: the engine stopped (its process died); this worker exits and "
                "is replaced: retry the job"
            )
        # It takes no more jobs and exits non-zero; the endpoint, left without it, stops.
        assert endpoint.proc.wait(STOP_TIMEOUT_S) == 1
        assert "the worker exited with code 1; 0 jobs in progress failed" in endpoint.log()
        print(f"engine killed: 6 jobs in flight, all FAILED within {failed_after:.1f} s")


def test_an_engine_that_cannot_start_exits_1_at_once_with_one_line(
    worker_env: dict[str, str], tmp_path: Path
) -> None:
    """Production mode, a KV cache larger than the machine's memory (an out-of-memory
    start): the worker exits 1 before it asks for a job, and says why in one line."""
    env = {
        **worker_env,
        # Nothing listens there: the worker must fail before it polls.
        "RUNPOD_WEBHOOK_GET_JOB": "http://127.0.0.1:9/v2/none/job-take/$ID?token=t",
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "KV_CACHE_MEMORY_BYTES": str(10**13),  # 10 TB
    }
    result = subprocess.run(
        [sys.executable, "-u", str(REPO_ROOT / "src" / "handler.py")],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 1
    summary = [
        line for line in result.stderr.splitlines() if line.startswith("vllm-worker: cannot start")
    ]
    assert len(summary) == 1, result.stderr[-3000:]
    assert summary[0].startswith(
        "vllm-worker: cannot start: the engine failed to start: RuntimeError: Engine core "
        "initialization failed. See root cause above."
    )
    # The root cause, from the engine's process, is in the log above it.
    assert "less than requested memory for kv" in result.stderr
    assert "job-take" not in result.stderr


def test_a_full_engine_takes_no_new_job_until_it_has_room(
    worker_env: dict[str, str], tmp_path: Path
) -> None:
    """Admission through the SDK's real job loop: with room for 2 sequences, a job that
    comes while they run stays in the endpoint's queue (another worker could take it)
    until the engine has room, although MAX_CONCURRENCY would allow 8 jobs.

    No step depends on speed: the two jobs that fill the engine cannot end before the
    test cancels them, and the order is read from the worker's own log (one process, one
    clock): it takes the late job only after it said the engine had room again."""
    config = EndpointConfig(port=0, take_hold_s=0.5, stop_hold_s=0.5)
    with ThreadedEndpoint(config) as endpoint:
        settings = {
            "MAX_NUM_SEQS": "2",
            "MAX_CONCURRENCY": "8",
            **LONG_CONTEXT_ENV,  # its jobs cannot end before the test cancels them
        }
        env = build_env({**worker_env, **QUIETER, **settings}, endpoint.worker_env("full"))
        worker = WorkerProcess(env, tmp_path, tmp_path / "worker.log")
        worker.start()
        try:
            _check_admission(endpoint, worker)
        except BaseException:
            print("worker log (tail):\n" + worker.log_tail())
            raise
        finally:
            worker.stop()


def _check_admission(endpoint: ThreadedEndpoint, worker: WorkerProcess) -> None:
    def until(predicate: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 240
        while not predicate():
            worker.check_alive()
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def submit_job(job_input: dict[str, Any]) -> str:
        return str(endpoint.call(lambda store: store.submit(job_input).id))

    def job(job_id: str) -> Job:
        found = endpoint.call(lambda store: copy.deepcopy(store.get(job_id)))
        assert found is not None, job_id
        return found

    until(lambda: endpoint.call(lambda store: bool(store.workers)), "the worker's first poll")
    # Two jobs of 2 sequences each: the first fills the engine, the second waits in it.
    endless = {"n": 2, "max_tokens": ENDLESS_TOKENS, "ignore_eos": True}
    first, second = (
        submit_job({"prompt": f"Job {number}: a story", "sampling_params": endless})
        for number in range(2)
    )
    full = "engine full, taking no new job"
    until(lambda: full in worker.log(), "the worker to see its engine full")
    late = submit_job({"prompt": "Late:", "sampling_params": {"max_tokens": 8}})
    # While full, the worker asks for no job: once its last job-take has ended (the
    # endpoint may have held it), nothing can take the late job, which stays queued.
    until(lambda: not endpoint.call(lambda store: store.taking("full")), "no job-take open")
    assert job(late).status.value == "IN_QUEUE"
    for job_id in (first, second):
        endpoint.call(lambda store, job_id=job_id: store.cancel(job_id))
    until(lambda: job(late).status.final, "the late job")
    assert job(late).status.value == "COMPLETED"
    log = worker.log()
    full_at = log.index(full)
    room_at = log.index("engine has room again", full_at)
    assert log.index(f"job {late} taken") > room_at, "taken while the engine was full"
    assert log.index(f"job {first} taken") < full_at
    assert log.index(f"job {second} taken") < full_at


def test_sigterm_while_the_engine_starts_stops_its_processes_and_exits_0(
    worker_env: dict[str, str], tmp_path: Path
) -> None:
    """RunPod scales workers down at any time, also while their engine still starts: the
    worker stops the engine's processes (they would outlive it) and exits 0 at once."""
    with ThreadedEndpoint(EndpointConfig(port=0, take_hold_s=0.5, stop_hold_s=0.5)) as endpoint:
        env = build_env(worker_env, endpoint.worker_env("starting"))
        worker = WorkerProcess(env, tmp_path, tmp_path / "worker.log")
        worker.start()
        assert worker.proc is not None
        try:
            deadline = time.monotonic() + 120
            # The engine's processes exist: the start is under way.
            while not any("VLLM::EngineCore" in m for m in group_members(worker.proc.pid)):
                worker.check_alive()
                assert time.monotonic() < deadline, worker.log_tail()
                time.sleep(0.05)
            assert "job-take" not in worker.log()  # not serving yet
            worker.proc.send_signal(signal.SIGTERM)
            assert worker.proc.wait(STOP_TIMEOUT_S) == 0, worker.log_tail()
            log = worker.log()
            assert "SIGTERM while the engine starts: stopping" in log
            # Nothing of the engine outlived it (a moment for processes that are exiting).
            deadline = time.monotonic() + 10
            while group_members(worker.proc.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert group_members(worker.proc.pid) == []
        finally:
            worker.stop()
