"""The local endpoint's job store: RunPod's job life cycle, driven by a fake clock."""

from __future__ import annotations

from typing import Any

import pytest

from vllm_worker.local_endpoint.jobs import (
    STOP_REPEAT_S,
    JobStatus,
    JobStore,
    PostResult,
    RetryError,
    StoreLimits,
    status_body,
    stream_body,
)

W = "worker-1"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def changes() -> list[int]:
    return []


@pytest.fixture
def store(clock: Clock, changes: list[int]) -> JobStore:
    limits = StoreLimits(execution_timeout_s=100, retention_s=1800, sync_retention_s=60, ttl_s=500)
    return JobStore(limits, clock=clock, on_change=lambda: changes.append(1))


def started(store: JobStore, job_input: Any = None) -> str:
    """A job handed to worker W."""
    job = store.submit(job_input or {"prompt": "hi"})
    (taken,) = store.take(W, 1, batch=False)
    assert taken.id == job.id
    return job.id


# --- the happy path and the response shapes ---------------------------------------------


def test_a_job_goes_from_queue_to_worker_to_completed(
    store: JobStore, clock: Clock, changes: list[int]
) -> None:
    job = store.submit({"prompt": "hi"})
    assert changes  # waiters are woken
    assert status_body(job) == {"id": job.id, "status": "IN_QUEUE"}

    clock.advance(1.5)
    (taken,) = store.take(W, 4, batch=True, job_in_progress="0")
    assert taken is job
    assert status_body(job) == {"id": job.id, "status": "IN_PROGRESS", "delayTime": 1500}

    assert store.post_stream(W, job.id, {"text": ["a"]}) is PostResult.ACCEPTED
    assert store.post_stream(W, job.id, {"text": ["ab"]}) is PostResult.ACCEPTED
    clock.advance(2.25)
    body = {"output": [{"text": ["a"]}, {"text": ["ab"]}]}
    assert store.finish(W, job.id, body, is_stream="true") is PostResult.ACCEPTED

    assert status_body(job) == {
        "id": job.id,
        "status": "COMPLETED",
        "delayTime": 1500,
        "executionTime": 2250,
        "output": [{"text": ["a"]}, {"text": ["ab"]}],
    }
    assert job.done_body == body
    assert job.done_is_stream == "true"
    assert job.taken_by_batch is True
    (take,) = store.takes
    assert (take.worker_id, take.batch, take.batch_size, take.job_ids) == (W, True, 4, [job.id])


def test_a_yielded_or_raised_error_fails_the_job(store: JobStore) -> None:
    job_id = started(store)
    store.finish(W, job_id, {"error": "invalid_input: prompt: required"})
    job = store.get(job_id)
    assert job is not None
    assert job.status is JobStatus.FAILED
    body = status_body(job)
    assert body["error"] == "invalid_input: prompt: required"
    assert "output" not in body
    assert stream_body(job, []) == {
        "id": job_id,
        "status": "FAILED",
        "stream": [],
        "error": "invalid_input: prompt: required",
    }


def test_ids_are_unique_and_runsync_ids_say_so(store: JobStore) -> None:
    ids = {store.submit({}).id for _ in range(100)}
    assert len(ids) == 100
    assert store.submit({}, sync=True).id.startswith("sync-")
    store.submit({}, job_id="mine")
    with pytest.raises(ValueError, match="in use"):
        store.submit({}, job_id="mine")


# --- /stream's cursor ------------------------------------------------------------------


def test_stream_returns_each_chunk_once_in_order(store: JobStore) -> None:
    job_id = started(store)
    assert store.read_stream("nope") is None
    polls = []
    for step in range(7):
        for chunk in range(step % 3):  # 0, 1 or 2 new chunks between polls
            store.post_stream(W, job_id, f"{step}.{chunk}")
        read = store.read_stream(job_id)
        assert read is not None
        polls.append(read[1])
    store.post_stream(W, job_id, "last")
    store.finish(W, job_id, {"output": []})
    job, rest = store.read_stream(job_id) or (None, [])
    assert job is not None
    assert job.status is JobStatus.COMPLETED
    assert rest == ["last"]
    assert store.read_stream(job_id) == (job, [])  # nothing twice

    every = [chunk for poll in polls for chunk in poll] + rest
    assert every == [entry.output for entry in job.stream]
    assert [len(poll) for poll in polls] == [0, 1, 2, 0, 1, 2, 0]
    assert stream_body(job, ["x"]) == {
        "id": job_id,
        "status": "COMPLETED",
        "stream": [{"output": "x"}],
    }


# --- cancel, stop signals, late posts ----------------------------------------------------


def test_cancelling_a_queued_job_takes_it_out_of_the_queue(store: JobStore) -> None:
    first = store.submit({"n": 1})
    second = store.submit({"n": 2})
    assert store.cancel(first.id) is first
    assert first.status is JobStatus.CANCELLED
    assert status_body(first) == {"id": first.id, "status": "CANCELLED"}
    assert [job.id for job in store.take(W, 10, batch=True)] == [second.id]
    assert store.pop_stops(W) == []  # no worker ever had it
    assert store.cancel("nope") is None


def test_cancelling_a_running_job_tells_its_worker_once_and_ignores_its_posts(
    store: JobStore, clock: Clock
) -> None:
    job_id = started(store)
    store.post_stream(W, job_id, "before")
    clock.advance(2)
    job = store.cancel(job_id)
    assert job is not None
    assert job.status is JobStatus.CANCELLED
    assert job.execution_ms == 2000
    assert store.has_stops(W)
    assert job.stop_delivered_at is None
    clock.advance(0.25)
    assert store.pop_stops(W) == [job_id]
    assert job.stop_delivered_at == clock.now  # when the stop reached the worker
    assert store.pop_stops(W) == []
    assert not store.has_stops("another-worker")

    # The worker was mid-post: its chunk and its result are dropped.
    clock.advance(0.25)
    assert store.post_stream(W, job_id, "after") is PostResult.IGNORED
    assert job.last_ignored_stream_at == clock.now
    assert store.finish(W, job_id, {"output": ["before", "after"]}) is PostResult.IGNORED
    assert job.status is JobStatus.CANCELLED
    assert [entry.output for entry in job.stream] == ["before"]
    assert job.ignored_posts == 2
    assert "output" not in status_body(job)
    assert store.pop_stops(W) == []  # too soon to repeat the stop

    # Still streaming a while later: the stop was lost (the SDK had not started the
    # job's task yet), so it is sent again.
    clock.advance(STOP_REPEAT_S)
    store.post_stream(W, job_id, "still running")
    delivered = job.stop_delivered_at
    assert store.pop_stops(W) == [job_id]
    assert job.stop_delivered_at == delivered  # the first delivery's time stays
    # A heartbeat that lists it does the same.
    store.ping(W, {"job_id": f"other,{job_id}", "runpod_version": "1.12.0"})
    assert store.pop_stops(W) == [job_id]
    assert store.cancel(job_id) is job  # cancelling again changes nothing
    assert store.pop_stops(W) == []


def test_a_finished_job_cannot_be_cancelled(store: JobStore) -> None:
    job_id = started(store)
    store.finish(W, job_id, {"output": ["x"]})
    job = store.cancel(job_id)
    assert job is not None
    assert job.status is JobStatus.COMPLETED
    assert store.pop_stops(W) == []


def test_posts_for_jobs_a_worker_was_not_given_are_refused(store: JobStore) -> None:
    job_id = started(store)
    queued = store.submit({})
    assert store.post_stream(W, queued.id, "x") is PostResult.UNKNOWN_JOB
    assert store.post_stream(W, "never-submitted", "x") is PostResult.UNKNOWN_JOB
    assert store.finish("another-worker", job_id, {"output": []}) is PostResult.UNKNOWN_JOB
    assert store.get(job_id) is not None
    assert store.get(job_id).status is JobStatus.IN_PROGRESS  # type: ignore[union-attr]


# --- time: execution timeout, queue ttl, retention -----------------------------------------


def test_a_job_running_past_its_execution_timeout_times_out_and_is_stopped(
    store: JobStore, clock: Clock
) -> None:
    job_id = started(store)
    short = store.submit({}, execution_timeout_s=10)
    store.take(W, 1, batch=False)
    clock.advance(10.5)
    timed_out, forgotten = store.expire()
    assert [job.id for job in timed_out] == [short.id]
    assert forgotten == []
    assert short.status is JobStatus.TIMED_OUT
    assert store.pop_stops(W) == [short.id]
    assert status_body(short)["error"].startswith("execution timeout")

    clock.advance(90)  # past the default 100 s
    timed_out, _ = store.expire()
    assert [job.id for job in timed_out] == [job_id]
    assert store.finish(W, job_id, {"output": []}) is PostResult.IGNORED


def test_a_job_waiting_past_its_ttl_times_out_in_the_queue(store: JobStore, clock: Clock) -> None:
    job = store.submit({})
    clock.advance(501)
    timed_out, _ = store.expire()
    assert timed_out == [job]
    assert job.status is JobStatus.TIMED_OUT
    assert not store.has_queued()
    assert store.take(W, 1, batch=False) == []


def test_results_are_forgotten_after_their_retention(store: JobStore, clock: Clock) -> None:
    run_id = started(store)
    store.finish(W, run_id, {"output": 1})
    sync = store.submit({}, sync=True)
    store.take(W, 1, batch=False)
    store.finish(W, sync.id, {"output": 2})
    running = store.submit({})  # never finishes: never forgotten

    clock.advance(61)
    assert store.expire() == ([], [sync.id])
    assert store.get(sync.id) is None
    assert store.read_stream(sync.id) is None
    clock.advance(1800)
    assert store.expire() == ([running], [run_id])  # the queued one hit its ttl meanwhile
    assert store.get(run_id) is None
    assert store.get(running.id) is not None


# --- purge, retry, health, lost workers ------------------------------------------------


def test_purge_queue_cancels_queued_jobs_only(store: JobStore) -> None:
    running = started(store)
    queued = [store.submit({}) for _ in range(3)]
    assert store.purge_queue() == 3
    assert all(job.status is JobStatus.CANCELLED for job in queued)
    assert store.get(running).status is JobStatus.IN_PROGRESS  # type: ignore[union-attr]
    assert store.purge_queue() == 0
    assert store.pop_stops(W) == []


def test_retry_of_a_timed_out_job_drops_its_unsent_stop(store: JobStore, clock: Clock) -> None:
    job_id = started(store)
    clock.advance(101)
    store.expire()
    assert store.has_stops(W)
    store.retry(job_id)
    assert store.pop_stops(W) == []


def test_retry_requeues_a_failed_job_under_its_id(store: JobStore) -> None:
    job_id = started(store)
    store.post_stream(W, job_id, "partial")
    store.finish(W, job_id, {"error": "engine_error: boom"})
    job = store.retry(job_id)
    assert job is not None
    assert status_body(job) == {"id": job_id, "status": "IN_QUEUE"}
    assert job.stream == []
    assert [taken.id for taken in store.take(W, 1, batch=False)] == [job_id]
    store.finish(W, job_id, {"output": ["ok"]})
    assert job.status is JobStatus.COMPLETED
    with pytest.raises(RetryError, match="COMPLETED"):
        store.retry(job_id)
    assert store.retry("nope") is None
    assert store.health()["jobs"]["retried"] == 1


def test_health_counts_jobs_and_workers(store: JobStore, clock: Clock) -> None:
    assert store.health() == {
        "jobs": {"completed": 0, "failed": 0, "inProgress": 0, "inQueue": 0, "retried": 0},
        "workers": {"idle": 0, "initializing": 0, "running": 0},
    }
    done, failed, timed_out, running = (started(store) for _ in range(4))
    store.finish(W, done, {"output": []})
    store.finish(W, failed, {"error": "x"})
    store.get(timed_out).execution_timeout_s = 1  # type: ignore[union-attr]
    clock.advance(2)
    store.expire()
    store.cancel(store.submit({}).id)  # cancelled jobs count nowhere
    store.submit({})
    store.poll_started("idle-worker")
    assert store.health(workers_initializing=1) == {
        "jobs": {"completed": 1, "failed": 2, "inProgress": 1, "inQueue": 1, "retried": 0},
        "workers": {"idle": 1, "initializing": 1, "running": 1},
    }
    assert running in {job.id for job in store.jobs()}

    # A worker with no open poll that has not been heard from for a minute is gone.
    store.poll_ended("idle-worker")
    clock.advance(61)
    assert store.health()["workers"] == {"idle": 0, "initializing": 0, "running": 0}
    store.ping(W, {"job_id": running})
    assert store.health()["workers"] == {"idle": 0, "initializing": 0, "running": 1}


def test_a_lost_worker_fails_its_jobs(store: JobStore) -> None:
    job_id = started(store)
    queued = store.submit({})
    (lost,) = store.worker_lost(W, "the worker exited with code -9")
    assert lost.id == job_id
    assert status_body(lost)["error"] == "the worker exited with code -9"
    assert lost.status is JobStatus.FAILED
    assert queued.status is JobStatus.IN_QUEUE
    assert W not in store.workers


def test_take_hands_out_oldest_first_up_to_the_limit(store: JobStore) -> None:
    jobs = [store.submit({"i": i}) for i in range(5)]
    assert store.take(W, 0, batch=True) == []
    assert store.take(W, 2, batch=True) == jobs[:2]
    assert store.take("w2", 10, batch=True) == jobs[2:]
    assert store.take(W, 1, batch=False) == []
    assert [take.job_ids for take in store.takes] == [
        [],
        [jobs[0].id, jobs[1].id],
        [job.id for job in jobs[2:]],
        [],
    ]
    assert {job.worker_id for job in jobs[2:]} == {"w2"}
