"""The local endpoint's job store: RunPod's job life cycle as a pure state machine.

No I/O, no clock of its own (``clock`` is passed in), no threads: the HTTP layers call
it from one event loop, and unit tests drive it directly.

Life cycle (RunPod's job states, ``docs.runpod.io/serverless/endpoints/job-states``)::

    IN_QUEUE --take--> IN_PROGRESS --job-done--> COMPLETED | FAILED
       |                  |--cancel----------> CANCELLED   (the worker is told to stop it)
       |                  '--execution timeout-> TIMED_OUT (the worker is told to stop it)
       |--cancel / purge-queue--> CANCELLED
       '--queue ttl--> TIMED_OUT
    FAILED | TIMED_OUT --retry--> IN_QUEUE (same id, output cleared)

A job in a final state keeps its result for the retention period of the operation
that submitted it (``/run`` or ``/runsync``), then is forgotten (``/status`` gives 404).
A worker's posts for a job that is no longer IN_PROGRESS (cancelled, timed out) are
ignored; a stream post for such a job means the worker still runs it, so its stop
signal is sent again.
"""

from __future__ import annotations

import enum
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


class JobStatus(str, enum.Enum):
    IN_QUEUE = "IN_QUEUE"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMED_OUT = "TIMED_OUT"

    @property
    def final(self) -> bool:
        return self not in {JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS}


class PostResult(enum.Enum):
    """What the store did with a worker's job-stream or job-done post."""

    ACCEPTED = "accepted"
    IGNORED = "ignored"  # the job ended already (cancelled, timed out): dropped, as RunPod does
    UNKNOWN_JOB = "unknown_job"  # never handed out to this worker, or forgotten


class RetryError(Exception):
    """``/retry`` of a job that is not FAILED or TIMED_OUT."""


# How long a stop signal is not repeated for the same job (see ``post_stream``).
STOP_REPEAT_S = 1.0


@dataclass
class StreamEntry:
    output: Any
    at: float


@dataclass
class Job:
    """One job and everything the worker reported for it."""

    id: str
    input: Any
    submitted_at: float
    sync: bool  # submitted by /runsync: shorter retention
    execution_timeout_s: float
    ttl_s: float  # longest wait in the queue
    status: JobStatus = JobStatus.IN_QUEUE
    started_at: float | None = None  # handed to a worker
    finished_at: float | None = None
    worker_id: str | None = None
    taken_by_batch: bool | None = None
    stream: list[StreamEntry] = field(default_factory=list)
    stream_read: int = 0  # /stream cursor: entries before it were returned already
    output: Any = None
    has_output: bool = False
    error: str | None = None
    done_body: Any = None  # the job-done post, as the worker sent it
    done_is_stream: str | None = None
    stop_sent_at: float | None = None  # last time a stop signal was queued for the worker
    stop_delivered_at: float | None = None  # when the worker first received it (job-stop)
    ignored_posts: int = 0  # worker posts that came after the job ended
    last_ignored_stream_at: float | None = None  # the last job-stream post among those
    retries: int = 0

    @property
    def delay_ms(self) -> int | None:
        """Time in the queue (RunPod's ``delayTime``)."""
        if self.started_at is None:
            return None
        return _ms(self.started_at - self.submitted_at)

    @property
    def execution_ms(self) -> int | None:
        """Time on the worker (RunPod's ``executionTime``), once the job ended."""
        if self.started_at is None or self.finished_at is None:
            return None
        return _ms(self.finished_at - self.started_at)


@dataclass
class TakeRecord:
    """One job-take or job-take-batch poll of a worker, and the jobs it was given."""

    at: float
    worker_id: str
    batch: bool
    batch_size: int
    job_in_progress: str | None
    job_ids: list[str] = field(default_factory=list)


@dataclass
class WorkerRecord:
    first_seen: float
    last_seen: float
    open_polls: int = 0  # job-take and job-stop polls held open now
    open_takes: int = 0  # of those, job-take polls: a job queued now may go to this worker


@dataclass(frozen=True)
class StoreLimits:
    """Times, in seconds, that RunPod's documentation gives (defaults) or the user sets."""

    execution_timeout_s: float = 600.0  # policy.executionTimeout: 10 minutes
    retention_s: float = 1800.0  # /run results: 30 minutes
    sync_retention_s: float = 60.0  # /runsync results: 1 minute
    ttl_s: float = 86400.0  # policy.ttl: 24 hours
    worker_gone_s: float = 60.0  # a worker not heard from for this long is not counted


class JobStore:
    """All jobs of one endpoint, its queue, and the workers that serve it."""

    def __init__(
        self,
        limits: StoreLimits | None = None,
        *,
        clock: Callable[[], float],
        on_change: Callable[[], None] = lambda: None,
        history: int = 10_000,
    ) -> None:
        self.limits = limits or StoreLimits()
        self._clock = clock
        self._on_change = on_change
        self._jobs: dict[str, Job] = {}
        self._queue: deque[str] = deque()
        self._stops: dict[str, list[str]] = {}  # worker id -> job ids it must stop
        self.workers: dict[str, WorkerRecord] = {}
        self.counts = {"completed": 0, "failed": 0, "cancelled": 0, "timed_out": 0, "retried": 0}
        # For diagnostics and tests; bounded so that a long-running endpoint stays small.
        self.takes: deque[TakeRecord] = deque(maxlen=history)
        self.pings: deque[dict[str, str]] = deque(maxlen=history)
        self.problems: deque[str] = deque(maxlen=history)

    # --- the public side ----------------------------------------------------------

    def submit(
        self,
        job_input: Any,
        *,
        sync: bool = False,
        job_id: str | None = None,
        execution_timeout_s: float | None = None,
        ttl_s: float | None = None,
    ) -> Job:
        if job_id is None:
            job_id = ("sync-" if sync else "") + str(uuid.uuid4())
        elif job_id in self._jobs:
            raise ValueError(f"job id {job_id!r} is in use")
        job = Job(
            id=job_id,
            input=job_input,
            submitted_at=self._clock(),
            sync=sync,
            execution_timeout_s=execution_timeout_s or self.limits.execution_timeout_s,
            ttl_s=ttl_s or self.limits.ttl_s,
        )
        self._jobs[job_id] = job
        self._queue.append(job_id)
        self._on_change()
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        return list(self._jobs.values())

    def read_stream(self, job_id: str) -> tuple[Job, list[Any]] | None:
        """The job and the chunks streamed since the previous call (RunPod's ``/stream``)."""
        job = self._jobs.get(job_id)
        if job is None:
            return None
        new = [entry.output for entry in job.stream[job.stream_read :]]
        job.stream_read = len(job.stream)
        return job, new

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued or running job; a job that ended already stays as it is."""
        job = self._jobs.get(job_id)
        if job is None or job.status.final:
            return job
        if job.status is JobStatus.IN_QUEUE:
            self._queue.remove(job_id)
        self._end(job, JobStatus.CANCELLED)
        return job

    def retry(self, job_id: str) -> Job | None:
        """Queue a FAILED or TIMED_OUT job again, under the same id, without its output."""
        job = self._jobs.get(job_id)
        if job is None:
            return None
        if job.status not in {JobStatus.FAILED, JobStatus.TIMED_OUT}:
            raise RetryError(
                f"only FAILED or TIMED_OUT jobs can be retried; this one is {job.status.value}"
            )
        job.status = JobStatus.IN_QUEUE
        job.submitted_at = self._clock()
        job.started_at = job.finished_at = job.worker_id = job.taken_by_batch = None
        job.stream, job.stream_read = [], 0
        job.output, job.has_output, job.error = None, False, None
        job.done_body = job.done_is_stream = job.stop_sent_at = None
        job.retries += 1
        self.counts["retried"] += 1
        for pending in self._stops.values():  # a stop not yet sent must not hit the new run
            if job_id in pending:
                pending.remove(job_id)
        self._queue.append(job_id)
        self._on_change()
        return job

    def purge_queue(self) -> int:
        """Cancel every queued job (jobs in progress go on); how many there were."""
        purged = list(self._queue)
        self._queue.clear()
        for job_id in purged:
            self._end(self._jobs[job_id], JobStatus.CANCELLED)
        return len(purged)

    def health(self, *, workers_initializing: int = 0) -> dict[str, Any]:
        """RunPod's ``/health`` body: job counts and worker counts."""
        in_progress = [job for job in self._jobs.values() if job.status is JobStatus.IN_PROGRESS]
        busy = {job.worker_id for job in in_progress}
        present = self.present_workers()
        return {
            "jobs": {
                "completed": self.counts["completed"],
                "failed": self.counts["failed"] + self.counts["timed_out"],
                "inProgress": len(in_progress),
                "inQueue": len(self._queue),
                "retried": self.counts["retried"],
            },
            "workers": {
                "idle": len([worker for worker in present if worker not in busy]),
                "initializing": workers_initializing,
                "running": len([worker for worker in present if worker in busy]),
            },
        }

    # --- the worker side ----------------------------------------------------------

    def has_queued(self) -> bool:
        return bool(self._queue)

    def poll_started(self, worker_id: str, *, take: bool = False) -> None:
        record = self.seen(worker_id)
        record.open_polls += 1
        record.open_takes += take

    def poll_ended(self, worker_id: str, *, take: bool = False) -> None:
        record = self.seen(worker_id)
        record.open_polls -= 1
        record.open_takes -= take

    def taking(self, worker_id: str) -> bool:
        """Whether ``worker_id`` has a job-take poll open now."""
        record = self.workers.get(worker_id)
        return record is not None and record.open_takes > 0

    def seen(self, worker_id: str) -> WorkerRecord:
        now = self._clock()
        record = self.workers.get(worker_id)
        if record is None:
            record = self.workers[worker_id] = WorkerRecord(first_seen=now, last_seen=now)
            self._on_change()
        record.last_seen = now
        return record

    def present_workers(self) -> list[str]:
        """Workers with a poll open now or heard from within ``worker_gone_s``."""
        now = self._clock()
        return [
            worker_id
            for worker_id, record in self.workers.items()
            if record.open_polls > 0 or now - record.last_seen <= self.limits.worker_gone_s
        ]

    def take(
        self,
        worker_id: str,
        limit: int,
        *,
        batch: bool,
        job_in_progress: str | None = None,
    ) -> list[Job]:
        """Hand up to ``limit`` queued jobs, oldest first, to a worker."""
        now = self._clock()
        self.seen(worker_id)
        record = TakeRecord(
            at=now,
            worker_id=worker_id,
            batch=batch,
            batch_size=limit,
            job_in_progress=job_in_progress,
        )
        taken: list[Job] = []
        while self._queue and len(taken) < limit:
            job = self._jobs[self._queue.popleft()]
            job.status = JobStatus.IN_PROGRESS
            job.started_at = now
            job.worker_id = worker_id
            job.taken_by_batch = batch
            taken.append(job)
            record.job_ids.append(job.id)
        self.takes.append(record)
        if taken:
            self._on_change()
        return taken

    def _posted_to(self, worker_id: str, job_id: str, post: str) -> Job | PostResult:
        """The running job a worker's post is for, or why the post is not taken."""
        self.seen(worker_id)
        job = self._jobs.get(job_id)
        if job is None or job.worker_id != worker_id:
            return PostResult.UNKNOWN_JOB
        if job.status is not JobStatus.IN_PROGRESS:
            job.ignored_posts += 1
            self._late_post(job, post)
            return PostResult.IGNORED
        return job

    def _repeat_stop(self, job_id: str) -> None:
        """A stopped job still streams: the stop signal was lost (e.g. it came before the
        SDK had started the job's task), so it is sent again."""
        job = self._jobs[job_id]
        if job.stop_sent_at is not None and self._clock() - job.stop_sent_at >= STOP_REPEAT_S:
            self._request_stop(job)

    def post_stream(self, worker_id: str, job_id: str, output: Any) -> PostResult:
        """A chunk the worker streamed for a job."""
        job = self._posted_to(worker_id, job_id, "job-stream")
        if isinstance(job, PostResult):
            if job is PostResult.IGNORED:
                self._jobs[job_id].last_ignored_stream_at = self._clock()
                self._repeat_stop(job_id)
            return job
        job.stream.append(StreamEntry(output=output, at=self._clock()))
        self._on_change()
        return PostResult.ACCEPTED

    def finish(
        self, worker_id: str, job_id: str, body: Any, *, is_stream: str | None = None
    ) -> PostResult:
        """The worker's job-done post: ``{"output": ...}`` or ``{"error": "..."}``."""
        job = self._posted_to(worker_id, job_id, "job-done")
        if isinstance(job, PostResult):
            return job
        job.done_body = body
        job.done_is_stream = is_stream
        body = body if isinstance(body, dict) else {"output": body}
        if "output" in body:
            job.output, job.has_output = body["output"], True
        if body.get("error"):
            job.error = str(body["error"])
            self._end(job, JobStatus.FAILED)
        else:
            self._end(job, JobStatus.COMPLETED)
        return PostResult.ACCEPTED

    def ping(self, worker_id: str, params: dict[str, str]) -> None:
        """A heartbeat, with the ids of the jobs the worker is running (comma-separated)."""
        self.seen(worker_id)
        self.pings.append(params)
        running = [job_id for job_id in params.get("job_id", "").split(",") if job_id]
        for job_id in running:
            job = self._jobs.get(job_id)
            if job is not None and job.worker_id == worker_id and job.status.final:
                self._request_stop(job)  # still running although it ended here

    def has_stops(self, worker_id: str) -> bool:
        return bool(self._stops.get(worker_id))

    def pop_stops(self, worker_id: str) -> list[str]:
        """The job ids the worker must stop, once each."""
        job_ids = self._stops.pop(worker_id, [])
        for job_id in job_ids:
            job = self._jobs.get(job_id)
            if job is not None and job.stop_delivered_at is None:
                job.stop_delivered_at = self._clock()
        return job_ids

    def worker_lost(self, worker_id: str, reason: str) -> list[Job]:
        """A worker died: its jobs in progress fail with ``reason``."""
        lost = [
            job
            for job in self._jobs.values()
            if job.worker_id == worker_id and job.status is JobStatus.IN_PROGRESS
        ]
        for job in lost:
            job.error = reason
            self._end(job, JobStatus.FAILED)
        self.workers.pop(worker_id, None)
        self._stops.pop(worker_id, None)
        self._on_change()
        return lost

    def problem(self, message: str) -> None:
        """Record a worker's breach of the protocol (for logs and tests)."""
        self.problems.append(message)

    # --- time ---------------------------------------------------------------------

    def expire(self) -> tuple[list[Job], list[str]]:
        """Time out jobs that ran or waited too long; forget results past retention.

        Returns the jobs that timed out now and the ids of the jobs forgotten now.
        """
        now = self._clock()
        timed_out = []
        for job in self._jobs.values():
            if job.status is JobStatus.IN_PROGRESS:
                assert job.started_at is not None
                if now - job.started_at > job.execution_timeout_s:
                    job.error = f"execution timeout: ran longer than {job.execution_timeout_s:g} s"
                    timed_out.append(job)
            elif job.status is JobStatus.IN_QUEUE and now - job.submitted_at > job.ttl_s:
                job.error = f"ttl: waited in the queue longer than {job.ttl_s:g} s"
                self._queue.remove(job.id)
                timed_out.append(job)
        for job in timed_out:
            self._end(job, JobStatus.TIMED_OUT)
        forgotten = [
            job.id
            for job in self._jobs.values()
            if job.finished_at is not None and now - job.finished_at > self._retention(job)
        ]
        for job_id in forgotten:
            del self._jobs[job_id]
        return timed_out, forgotten

    # --- internals ----------------------------------------------------------------

    def _retention(self, job: Job) -> float:
        return self.limits.sync_retention_s if job.sync else self.limits.retention_s

    def _end(self, job: Job, status: JobStatus) -> None:
        was_running = job.status is JobStatus.IN_PROGRESS
        job.status = status
        job.finished_at = self._clock()
        key = {
            JobStatus.COMPLETED: "completed",
            JobStatus.FAILED: "failed",
            JobStatus.CANCELLED: "cancelled",
            JobStatus.TIMED_OUT: "timed_out",
        }[status]
        self.counts[key] += 1
        if was_running and status in {JobStatus.CANCELLED, JobStatus.TIMED_OUT}:
            self._request_stop(job)
        self._on_change()

    def _late_post(self, job: Job, kind: str) -> None:
        # Expected after a cancel or a timeout (the worker has not stopped yet); after the
        # worker's own job-done it breaks the protocol.
        if job.status in {JobStatus.COMPLETED, JobStatus.FAILED}:
            self.problem(f"job {job.id}: {kind} post after the job ended {job.status.value}")

    def _request_stop(self, job: Job) -> None:
        if job.worker_id is None:
            return
        pending = self._stops.setdefault(job.worker_id, [])
        if job.id not in pending:
            pending.append(job.id)
        job.stop_sent_at = self._clock()
        self._on_change()


# --- RunPod's response bodies ----------------------------------------------------------


def status_body(job: Job) -> dict[str, Any]:
    """``/status/<id>`` (and a finished ``/runsync``): RunPod's job status object."""
    body: dict[str, Any] = {"id": job.id, "status": job.status.value}
    if job.delay_ms is not None:
        body["delayTime"] = job.delay_ms
    if job.execution_ms is not None:
        body["executionTime"] = job.execution_ms
    if job.has_output:
        body["output"] = job.output
    if job.error is not None:
        body["error"] = job.error
    return body


def stream_body(job: Job, outputs: Iterable[Any]) -> dict[str, Any]:
    """``/stream/<id>``: the chunks since the previous call, each as ``{"output": chunk}``."""
    body: dict[str, Any] = {
        "id": job.id,
        "status": job.status.value,
        "stream": [{"output": output} for output in outputs],
    }
    if job.error is not None:
        body["error"] = job.error
    return body


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))
