"""End to end: the worker under the runpod SDK's real production job loop and real vLLM.

The worker runs as RunPod runs it (``python -u src/handler.py`` with ``RUNPOD_WEBHOOK_*``
set), its SDK talks to the worker-facing job API of the product's local endpoint
(``vllm_worker.local_endpoint``, in a thread of the test process, on loopback), and its
engine is vLLM's CPU build serving the project's tiny model. Nothing is mocked: what
these tests see is what RunPod would receive. Jobs are put into the endpoint's store
directly and read back from it, so these tests see every post the worker made.

The worker starts once for the module (its engine takes 30-45 s to start here), from
the `worker_env` and `tiny_model_dir` fixtures of `tests/conftest.py`.
"""

from __future__ import annotations

import copy
import json
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers import group_members
from production_worker import STOP_TIMEOUT_S, WorkerProcess
from vllm_worker.local_endpoint import EndpointConfig, JobStore, ThreadedEndpoint
from vllm_worker.local_endpoint.jobs import Job, TakeRecord

REPO = Path(__file__).resolve().parents[2]
SEED_INPUT = REPO / "test_input.json"

ENGINE_START_TIMEOUT_S = 180.0  # until the worker polls for its first job
JOB_TIMEOUT_S = 90.0  # per batch of jobs once the worker is up (another engine may run)
MAX_CONCURRENCY = 8
ENDPOINT_ID = "test-endpoint"
WORKER_ID = "test-worker"
SIGTERM_TOKENS = 400  # per sequence of the job in flight at SIGTERM


# --- the platform: the local endpoint's job API, seen through its store ----------------


@dataclass
class JobRecord:
    """Everything the worker did for one job, as the platform saw it."""

    id: str
    input: Any
    status: str
    taken_at: float | None
    taken_by_batch: bool | None
    stream: list[Any]  # each job-stream post's "output", in order
    stream_times: list[float]
    done: Any  # the job-done post's body
    done_at: float | None
    done_is_stream: str | None

    @classmethod
    def of(cls, job: Job) -> JobRecord:
        return cls(
            id=job.id,
            input=copy.deepcopy(job.input),
            status=job.status.value,
            taken_at=job.started_at,
            taken_by_batch=job.taken_by_batch,
            stream=[copy.deepcopy(entry.output) for entry in job.stream],
            stream_times=[entry.at for entry in job.stream],
            done=copy.deepcopy(job.done_body),
            done_at=job.finished_at,
            done_is_stream=job.done_is_stream,
        )


class Platform:
    """Test helpers over the endpoint's store (which lives on the endpoint's thread)."""

    def __init__(self, endpoint: ThreadedEndpoint) -> None:
        self.endpoint = endpoint

    def _call(self, fn: Callable[[JobStore], Any]) -> Any:
        return self.endpoint.call(fn)

    def worker_env(self) -> dict[str, str]:
        return self.endpoint.worker_env(WORKER_ID)

    def enqueue(self, *jobs: dict[str, Any]) -> list[str]:
        """Queue jobs ``{"id": ..., "input": ...}``; all become visible to the worker at once."""

        def submit(store: JobStore) -> list[str]:
            return [store.submit(job["input"], job_id=job["id"]).id for job in jobs]

        ids: list[str] = self._call(submit)
        return ids

    def record(self, job_id: str) -> JobRecord:
        def snapshot(store: JobStore) -> JobRecord:
            job = store.get(job_id)
            assert job is not None, job_id
            return JobRecord.of(job)

        record: JobRecord = self._call(snapshot)
        return record

    @property
    def takes(self) -> list[TakeRecord]:
        return list(self._call(lambda store: copy.deepcopy(list(store.takes))))

    @property
    def pings(self) -> list[dict[str, str]]:
        return list(self._call(lambda store: copy.deepcopy(list(store.pings))))

    @property
    def problems(self) -> list[str]:
        """Protocol breaches seen so far (wrong worker id or token, bad bodies, ...)."""
        return list(self._call(lambda store: list(store.problems)))

    def wait_until(
        self,
        predicate: Callable[[], bool],
        timeout_s: float,
        *,
        check: Callable[[], None] | None = None,
        what: str = "the condition",
    ) -> None:
        """Poll ``predicate()`` every 50 ms; ``check()`` may raise (e.g. the worker died)."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            if check is not None:
                check()
            time.sleep(0.05)

    def wait_done(
        self,
        job_ids: Iterable[str],
        timeout_s: float,
        *,
        check: Callable[[], None] | None = None,
    ) -> dict[str, JobRecord]:
        """Wait until every job ended; snapshots of their records."""
        ids = list(job_ids)

        def pending() -> list[str]:
            return list(
                self._call(
                    lambda store: [i for i in ids if not store.get(i).status.final]  # type: ignore[union-attr]
                )
            )

        try:
            self.wait_until(lambda: not pending(), timeout_s, check=check, what="job-done")
        except TimeoutError as error:
            raise TimeoutError(f"{error}; jobs still not done: {pending()}") from None
        return {job_id: self.record(job_id) for job_id in ids}

    def wait_for_take(self, timeout_s: float, *, check: Callable[[], None] | None = None) -> float:
        """Wait for the worker's first job-take poll (it polls once it is ready to serve)."""
        first: list[float] = []

        def taken() -> bool:
            first[:] = self._call(
                lambda store: [store.workers[w].first_seen for w in store.workers]
            )
            return bool(first)

        self.wait_until(taken, timeout_s, check=check, what="the worker's first job-take")
        return first[0]

    def events(self) -> list[tuple[float, str, str]]:
        """``(time, "take" | "stream" | "done", job id)`` for every job, in time order."""

        def collect(store: JobStore) -> list[tuple[float, str, str]]:
            events = []
            for job in store.jobs():
                if job.started_at is not None:
                    events.append((job.started_at, "take", job.id))
                events.extend((entry.at, "stream", job.id) for entry in job.stream)
                if job.finished_at is not None:
                    events.append((job.finished_at, "done", job.id))
            return sorted(events)

        return list(self._call(collect))


def _production_env(base: dict[str, str], platform: Platform) -> dict[str, str]:
    """``base`` (the tiny model, loopback only) plus the RunPod production loop's variables."""
    env = {name: value for name, value in base.items() if not name.startswith("RUNPOD_")}
    # The job URLs, the worker id and token; the SDK's outside checks turned off.
    env.update(platform.worker_env())
    assert env["RUNPOD_SKIP_AUTO_SYSTEM_CHECKS"] == env["RUNPOD_SKIP_GPU_CHECK"] == "true"
    env.update(
        {
            # Loopback only: no usage stats, no hub.
            "RUNPOD_PING_INTERVAL": "3600000",  # ms: one ping at start, then quiet
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "DTYPE": "float32",
            # Room for the SIGTERM test's long job: positions past the tiny model's 2048.
            "MAX_MODEL_LEN": "4096",
            "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1",
            "KV_CACHE_MEMORY_BYTES": str(128 * 2**20),
            "ENFORCE_EAGER": "true",
            "MAX_CONCURRENCY": str(MAX_CONCURRENCY),
            "LOG_LEVEL": "INFO",
            # The SIGTERM test's job must finish, however slow the machine: it tests the
            # drain (the abort after the grace period: tests/e2e/test_lifecycle.py).
            "SHUTDOWN_GRACE_SECONDS": "600",
        }
    )
    return env


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def platform() -> Iterator[Platform]:
    # Held job-take and job-stop polls end after 2 s: the worker exits soon after SIGTERM.
    config = EndpointConfig(port=0, endpoint_id=ENDPOINT_ID, take_hold_s=2.0, stop_hold_s=2.0)
    with ThreadedEndpoint(config) as endpoint:
        yield Platform(endpoint)


@pytest.fixture(scope="module")
def worker(
    platform: Platform,
    worker_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WorkerProcess]:
    # An empty working directory: no test_input.json for the SDK (or the worker) to find.
    workdir = tmp_path_factory.mktemp("worker")
    env = _production_env(worker_env, platform)
    process = WorkerProcess(env, workdir, workdir / "worker.log")
    process.start()
    try:
        ready_at = platform.wait_for_take(ENGINE_START_TIMEOUT_S, check=process.check_alive)
        print(f"worker ready (first job-take) {ready_at - process.started_at:.1f} s after start")
        yield process
    except BaseException:
        print("worker log (tail):\n" + process.log_tail())
        raise
    finally:
        returncode, left_behind = process.stop()
        print(f"worker stopped: exit code {returncode}; left running: {left_behind or 'none'}")


@pytest.fixture(scope="module")
def count_prompt_tokens(tiny_model_dir: Path) -> Any:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    return lambda text: len(tokenizer.encode(text).ids)  # with <s>, as the worker sends it


# --- helpers ----------------------------------------------------------------------------


def run_jobs(platform: Platform, worker: WorkerProcess, *jobs: dict[str, Any]) -> list[JobRecord]:
    """Hand the jobs to the worker all at once; their records once all are done."""
    ids = platform.enqueue(*jobs)
    records = platform.wait_done(ids, JOB_TIMEOUT_S, check=worker.check_alive)
    assert platform.problems == []
    return [records[job_id] for job_id in ids]


def seed_input(max_tokens: int = 64) -> dict[str, Any]:
    """The seed request (test_input.json), shortened to ``max_tokens`` exact tokens."""
    job_input = json.loads(SEED_INPUT.read_text())["input"]
    job_input["sampling_params"].update(max_tokens=max_tokens, ignore_eos=True)
    return job_input


def assert_streamed_output(
    record: JobRecord,
    *,
    prompt: str,
    n: int,
    max_tokens: int,
    prompt_tokens: int,
    mode: str = "cumulative",
) -> list[str]:
    """Check a finished job's stream and aggregate; return each sequence's full text."""
    chunks = record.stream
    assert chunks, "no chunk was streamed"
    # return_aggregate_stream: job-done carries every streamed chunk, in order.
    assert record.done == {"output": chunks}
    assert record.done_is_stream == "true"
    *partial, final = chunks
    for chunk in partial:
        assert set(chunk) == {"text"}
    assert set(final) == {"text", "finish_reason", "usage", "metrics"}
    assert final["metrics"]["time_to_first_token_ms"] >= 0  # docs/input-output.md

    texts = [""] * n
    for chunk in chunks:
        assert isinstance(chunk["text"], list)
        assert len(chunk["text"]) == n
        assert all(isinstance(text, str) for text in chunk["text"])
        for index, text in enumerate(chunk["text"]):
            if mode == "cumulative":
                assert text.startswith(texts[index]), "a cumulative chunk did not extend the last"
                texts[index] = text
            else:
                texts[index] += text
    for text in texts:
        assert text.startswith(prompt)  # echo: the text starts with the prompt
        assert len(text) > len(prompt)

    assert final["finish_reason"] == ["length"] * n
    assert final["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": n * max_tokens,
        "total_tokens": prompt_tokens + n * max_tokens,
    }
    return texts


# --- tests ------------------------------------------------------------------------------


def test_seed_request_streams_chunks_and_aggregates_them(
    platform: Platform, worker: WorkerProcess, count_prompt_tokens: Any
) -> None:
    job_input = seed_input(max_tokens=64)
    (record,) = run_jobs(platform, worker, {"id": "seed-1", "input": job_input})

    assert_streamed_output(
        record,
        prompt=job_input["prompt"],
        n=1,
        max_tokens=64,
        prompt_tokens=count_prompt_tokens(job_input["prompt"]),
    )
    # The SDK posted each chunk as {"output": chunk} (anything else is a recorded problem),
    # then the aggregate, to the job's URLs.
    assert platform.problems == []
    assert record.status == "COMPLETED"
    assert record.taken_at is not None
    assert record.done_at is not None
    assert all(record.taken_at <= at <= record.done_at for at in record.stream_times)
    # The heartbeat process pinged once at start, with the worker's id and key.
    platform.wait_until(lambda: bool(platform.pings), 30, what="a ping")
    assert "runpod_version" in platform.pings[0]


BAD_INPUTS = {
    "out_of_range": (
        {"prompt": "Hello there", "sampling_params": {"temperature": 5, "max_tokens": 4}},
        "sampling_params.temperature",
    ),
    "unknown_key": ({"prompt": "Hello there", "max_token": 4}, "max_token"),
    # A str seed passes vLLM's SamplingParams and wedges its engine core for good.
    "wrong_type": (
        {"prompt": "Hello there", "sampling_params": {"seed": "abc", "max_tokens": 4}},
        "sampling_params.seed",
    ),
    "not_an_object": ("Hello there", "input"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_the_job_and_the_worker_keeps_serving(
    platform: Platform, worker: WorkerProcess, count_prompt_tokens: Any, case: str
) -> None:
    bad_input, field = BAD_INPUTS[case]
    (failed,) = run_jobs(platform, worker, {"id": f"bad-{case}", "input": bad_input})

    assert failed.stream == []  # nothing was streamed for it
    assert set(failed.done) == {"error"}
    message = failed.done["error"]
    assert isinstance(message, str)
    assert message.startswith("invalid_input: ")
    assert field in message
    assert "\n" not in message
    assert "Traceback" not in message

    prompt = "The quick brown fox"
    good_input = {"prompt": prompt, "sampling_params": {"max_tokens": 8, "ignore_eos": True}}
    (good,) = run_jobs(platform, worker, {"id": f"after-{case}", "input": good_input})
    assert_streamed_output(
        good, prompt=prompt, n=1, max_tokens=8, prompt_tokens=count_prompt_tokens(prompt)
    )


def test_concurrent_jobs_with_n_and_stream_modes(
    platform: Platform, worker: WorkerProcess, count_prompt_tokens: Any
) -> None:
    # (n, max_tokens, stream_mode); the last two differ only in stream_mode (same seed).
    specs = [
        (1, 8, "cumulative"),
        (2, 16, "delta"),
        (3, 24, "cumulative"),
        (1, 40, "delta"),
        (3, 40, "delta"),
        (1, 12, "cumulative"),
        (2, 32, "cumulative"),
        (2, 32, "delta"),
    ]
    jobs = []
    for number, (n, max_tokens, mode) in enumerate(specs):
        prompt = f"Job {number}: the French Revolution changed Europe because"
        if number >= 6:
            prompt = "Twins: the French Revolution changed Europe because"
        sampling: dict[str, Any] = {"n": n, "max_tokens": max_tokens, "ignore_eos": True}
        if number >= 6:
            # Only the twins are seeded: many seeded requests at once can crash the CPU
            # build's engine ("CPU Generator does not use offset"), an issue #5 case.
            sampling["seed"] = 7
        job_input = {"prompt": prompt, "sampling_params": sampling, "stream_mode": mode}
        jobs.append({"id": f"concurrent-{number}", "input": job_input})

    records = run_jobs(platform, worker, *jobs)

    texts = []
    for record, (n, max_tokens, mode) in zip(records, specs, strict=True):
        prompt = record.input["prompt"]
        texts.append(
            assert_streamed_output(
                record,
                prompt=prompt,
                n=n,
                max_tokens=max_tokens,
                prompt_tokens=count_prompt_tokens(prompt),
                mode=mode,
            )
        )
    # Rebuilding a delta stream gives the text a cumulative stream gives.
    assert texts[7] == texts[6]

    # The SDK took several jobs per poll (job-take-batch: its concurrency is MAX_CONCURRENCY) ...
    ids = {record.id for record in records}
    takes = [take for take in platform.takes if ids & set(take.job_ids)]
    assert any(take.batch and len(take.job_ids) > 1 for take in takes), takes
    assert all(len(take.job_ids) <= take.batch_size <= MAX_CONCURRENCY for take in takes)
    # ... held several at once (taken, not yet done) ...
    in_flight = held = 0
    for _at, kind, job_id in platform.events():
        if job_id in ids and kind in {"take", "done"}:
            in_flight += 1 if kind == "take" else -1
            held = max(held, in_flight)
    assert held >= 2
    # ... and ran them at once: a job streamed while another one had not finished.
    running = [(record.stream_times[0], record.done_at or 0.0) for record in records]
    assert _peak_overlap(running) >= 2, platform.events()


def _peak_overlap(intervals: list[tuple[float, float]]) -> int:
    points = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    current = peak = 0
    for _at, step in points:
        current += step
        peak = max(peak, current)
    return peak


def test_sigterm_lets_the_running_job_finish_then_exits(
    platform: Platform, worker: WorkerProcess, count_prompt_tokens: Any
) -> None:
    """RunPod scales a worker down with SIGTERM: the job in flight must still be delivered.

    Runs last: it stops the module's worker.
    """
    assert worker.proc is not None
    prompt = "A long answer, please:"
    # 4 x 400 tokens: 2-5 s of generation (900 to 300 tokens/s), far longer than the
    # moment from its first chunk to SIGTERM (the worker shares this session: no stall of
    # seconds, which a worker in a session of its own caused): still in flight then, which
    # the worker's log confirms below.
    job_input = {
        "prompt": prompt,
        "sampling_params": {"n": 4, "max_tokens": SIGTERM_TOKENS, "ignore_eos": True},
    }
    (job_id,) = platform.enqueue({"id": "at-sigterm", "input": job_input})
    platform.wait_until(
        lambda: bool(platform.record(job_id).stream),
        JOB_TIMEOUT_S,
        check=worker.check_alive,
        what="the job's first chunk",
    )
    worker.proc.send_signal(signal.SIGTERM)
    signalled_at = time.monotonic()

    record = platform.wait_done([job_id], 4 * JOB_TIMEOUT_S)[job_id]  # a long job
    # It really was in flight: the worker says so (its own log, its own order of events).
    assert "stop signal: taking no more jobs; 1 in flight" in worker.log()
    assert_streamed_output(
        record,
        prompt=prompt,
        n=4,
        max_tokens=SIGTERM_TOKENS,
        prompt_tokens=count_prompt_tokens(prompt),
    )
    assert worker.proc.wait(STOP_TIMEOUT_S) == 0
    print(f"worker exited {time.monotonic() - signalled_at:.1f} s after SIGTERM")
    # No engine process outlived it (a moment's grace for children that are exiting).
    deadline = time.monotonic() + 5
    while group_members(worker.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert group_members(worker.proc.pid) == []
    assert platform.problems == []
