"""The local endpoint's OpenAI relay: how a job that did not complete is answered."""

from __future__ import annotations

import json

import pytest

from vllm_worker.errors import OpenAIRequestError, openai_job_error
from vllm_worker.local_endpoint.jobs import Job, JobStatus
from vllm_worker.local_endpoint.openai_api import error_body, failure


def ended(status: JobStatus, error: str | None) -> Job:
    job = Job(
        id="sync-1",
        input={},
        submitted_at=0.0,
        sync=True,
        execution_timeout_s=600.0,
        ttl_s=60.0,
    )
    job.status, job.error = status, error
    return job


def test_the_workers_openai_error_object_is_the_body_and_its_code_the_status() -> None:
    refused = OpenAIRequestError("no model", status=404, error_type="NotFoundError", param=None)
    error = openai_job_error(refused)["error"]
    assert failure(ended(JobStatus.FAILED, error)) == (404, json.loads(error))


@pytest.mark.parametrize(
    "error",
    [
        "internal_error: Internal error in the worker",  # not JSON: the worker's own kind
        '{"error": {"message": "x", "code": 200}}',  # not an error status
        '{"error": {"message": "x", "code": "400"}}',  # not a number
        '{"message": "x"}',  # not an OpenAI error object
        "the worker exited with code -9",  # the endpoint's own
    ],
)
def test_any_other_failure_is_a_500_with_an_openai_error_body(error: str) -> None:
    assert failure(ended(JobStatus.FAILED, error)) == (
        500,
        error_body(error, 500, "InternalServerError"),
    )


def test_a_timed_out_job_is_a_504_and_a_cancelled_one_names_its_status() -> None:
    status, body = failure(ended(JobStatus.TIMED_OUT, "execution timeout: ran longer than 5 s"))
    assert (status, body["error"]["type"]) == (504, "TimeoutError")
    status, body = failure(ended(JobStatus.CANCELLED, None))
    assert (status, body["error"]["message"]) == (500, "the job ended CANCELLED")
