"""Tensor parallelism, run for real: ``TENSOR_PARALLEL_SIZE=2`` on vLLM's CPU build.

The tiny model has 2 attention heads and 2 KV heads, so it splits over 2 ranks, each a
``VLLM::Worker_TP<rank>`` process of the worker's process group. vLLM's CPU build binds each
rank's threads to cores; on a machine with one NUMA node its automatic binding refuses
2 ranks ("Not enough allowed NUMA nodes"), so ``VLLM_CPU_OMP_THREADS_BIND="0|1"`` gives
each rank one core (GPUs need no such setting). The worker runs in RunPod's production
mode against a loopback job API; every job that must still run when the test acts
cannot end by itself, and every wait is for an observable state.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import ENDLESS_TOKENS, LONG_CONTEXT_ENV, REPO_ROOT, SEED_INPUT, group_members
from production_worker import WorkerProcess
from vllm_worker.local_endpoint import EndpointConfig, ThreadedEndpoint
from vllm_worker.local_endpoint.jobs import Job
from vllm_worker.local_endpoint.process import build_env

TP_ENV = {"TENSOR_PARALLEL_SIZE": "2", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
WAIT_S = 300.0  # for a state: two ranks start on two shared cores
# The seed's request, greedy, so that two engines must write the same text.
GREEDY = {
    "prompt": SEED_INPUT["prompt"],
    "sampling_params": {"max_tokens": 16, "temperature": 0, "ignore_eos": True},
}
ENDLESS = {
    "prompt": "An endless story:",
    "sampling_params": {"max_tokens": ENDLESS_TOKENS, "ignore_eos": True},
}


@pytest.fixture(scope="module")
def one_process_text(worker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """The greedy text of the engine in one process (the local one-shot run)."""
    handler = str(REPO_ROOT / "src" / "handler.py")
    result = subprocess.run(
        [sys.executable, handler, "--test_input", json.dumps({"input": GREEDY})],
        cwd=tmp_path_factory.mktemp("one-process"),
        env=worker_env,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("Job result: ")]
    return str(json.loads(line.removeprefix("Job result: "))["output"]["text"][0])


class TensorParallelWorker:
    """A worker with 2 tensor-parallel ranks, attached to a loopback job API."""

    def __init__(self, endpoint: ThreadedEndpoint, worker: WorkerProcess) -> None:
        self.endpoint, self.worker = endpoint, worker

    def until(self, predicate: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not predicate():
            self.worker.check_alive()
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def submit(self, job_input: dict[str, Any]) -> str:
        return str(self.endpoint.call(lambda store: store.submit(job_input).id))

    def job(self, job_id: str) -> Job:
        found = self.endpoint.call(lambda store: copy.deepcopy(store.get(job_id)))
        assert found is not None, job_id
        return found

    def until_streaming(self, job_id: str) -> None:
        self.until(lambda: bool(self.job(job_id).stream), f"job {job_id}'s first chunk")

    def ranks(self) -> list[int]:
        assert self.worker.proc is not None
        members = group_members(self.worker.proc.pid)
        ranks = [m for m in members if m.split()[1].startswith("VLLM::Worker_TP")]
        return [int(member.split()[0]) for member in sorted(ranks, key=lambda m: m.split()[1])]


@pytest.fixture
def tp_worker(worker_env: dict[str, str], tmp_path: Path) -> Iterator[TensorParallelWorker]:
    config = EndpointConfig(port=0, take_hold_s=0.5, stop_hold_s=0.5)
    with ThreadedEndpoint(config) as endpoint:
        settings = {**TP_ENV, **LONG_CONTEXT_ENV, "SHUTDOWN_GRACE_SECONDS": "1"}
        env = build_env({**worker_env, **settings}, endpoint.worker_env("tp"))
        worker = WorkerProcess(env, tmp_path, tmp_path / "worker.log")
        worker.start()
        running = TensorParallelWorker(endpoint, worker)
        try:
            running.until(lambda: endpoint.call(lambda s: bool(s.workers)), "the first poll")
            assert len(running.ranks()) == 2, group_members(worker.proc.pid)
            yield running
        except BaseException:
            print("worker log (tail):\n" + worker.log_tail())
            raise
        finally:
            worker.stop()


def test_two_ranks_write_what_one_process_writes_and_stop_on_sigterm(
    tp_worker: TensorParallelWorker, one_process_text: str
) -> None:
    """The seed's request, greedy: the same text as one process. Then SIGTERM with a job
    in flight: it ends FAILED after the grace period, the worker exits 0, and neither
    rank outlives it."""
    greedy = tp_worker.submit(GREEDY)
    tp_worker.until(lambda: tp_worker.job(greedy).status.final, "the greedy job")
    done = tp_worker.job(greedy)
    assert done.status.value == "COMPLETED", done.error
    assert done.stream[-1].output["text"] == [one_process_text]
    assert done.stream[-1].output["usage"]["completion_tokens"] == 16

    endless = tp_worker.submit(ENDLESS)
    tp_worker.until_streaming(endless)
    worker = tp_worker.worker
    assert worker.proc is not None
    worker.proc.send_signal(signal.SIGTERM)  # as RunPod stops a worker
    assert worker.proc.wait(WAIT_S) == 0, worker.log_tail()
    assert members_after_exit(worker.proc.pid, grace_s=10) == []
    job = tp_worker.job(endless)
    assert job.status.value == "FAILED"
    assert job.error is not None
    assert job.error.startswith("engine_error: the worker is shutting down (SIGTERM)")


def test_a_killed_rank_fails_the_jobs_in_flight_and_the_worker_exits_1(
    tp_worker: TensorParallelWorker,
) -> None:
    """One rank's process is killed while a job streams: the job ends FAILED with the
    engine's error, the worker exits 1 (to be replaced), and the other rank is gone too."""
    endless = tp_worker.submit(ENDLESS)
    tp_worker.until_streaming(endless)
    os.kill(tp_worker.ranks()[-1], signal.SIGKILL)
    tp_worker.until(lambda: tp_worker.job(endless).status.final, "the job to fail")
    job = tp_worker.job(endless)
    assert job.status.value == "FAILED"
    assert job.error == (
        "engine_error: the engine stopped (its process died); this worker exits and is "
        "replaced: retry the job"
    )
    worker = tp_worker.worker
    assert worker.proc is not None
    assert worker.proc.wait(WAIT_S) == 1, worker.log_tail()
    assert members_after_exit(worker.proc.pid, grace_s=10) == []
    worker.stop()


def members_after_exit(pgid: int, grace_s: float) -> list[str]:
    """The group's members once it is empty, or after ``grace_s``: those left then. A
    rank and vLLM's resource tracker end on their own a moment after the worker (both
    seen still there right at its exit): an orphan is one still there seconds later."""
    deadline = time.monotonic() + grace_s
    while (members := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return members
