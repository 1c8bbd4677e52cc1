"""The worker's one error hierarchy, and the one place that turns an error into a job error.

Every failure a client can see is a ``WorkerError`` whose message is safe to show: a
single line, no traceback, no prompt text. Anything else that escapes is an internal
error: the client gets a stable message, the worker log gets the traceback.
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)

# What every job gets once the engine died: the worker exits (lifecycle.py), and the
# platform replaces it.
ENGINE_DEAD_MESSAGE = (
    "the engine stopped (its process died); this worker exits and is replaced: retry the job"
)
INTERNAL_ERROR_MESSAGE = "Internal error in the worker; the details are in the worker log."


class WorkerError(Exception):
    """Base class of every error whose message is meant for the client."""

    kind = "worker_error"
    # What an OpenAI route answers for it: HTTP status and OpenAI error type.
    status = 500
    error_type = "InternalServerError"
    param: str | None = None

    def __init__(self, message: str) -> None:
        # One line only: the platform shows this string as the job's error.
        super().__init__(" ".join(message.split()))

    @property
    def message(self) -> str:
        return str(self.args[0])


class SettingsError(WorkerError):
    """An environment variable has a value the worker cannot use; start-up stops."""

    kind = "invalid_setting"


class InvalidInputError(WorkerError):
    """The job's input is malformed or outside an allowed range."""

    kind = "invalid_input"
    status = 400
    error_type = "BadRequestError"


class OpenAIRequestError(InvalidInputError):
    """An OpenAI-route request refused (by vLLM's OpenAI layer or the route table), with
    the status code, error type and parameter an OpenAI client expects."""

    def __init__(self, message: str, *, status: int, error_type: str, param: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.param = param


class RequestTooLargeError(InvalidInputError):
    """A load-balancing request whose body is over MAX_REQUEST_BYTES."""

    status = 413
    error_type = "RequestTooLargeError"


class UnavailableError(WorkerError):
    """A load-balancing worker that cannot take a request now: full (429), starting,
    stopping or with a dead engine (503). The client retries after ``retry_after_s``."""

    kind = "unavailable"

    def __init__(self, message: str, *, status: int, retry_after_s: int) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = "RateLimitError" if status == 429 else "ServiceUnavailableError"
        self.retry_after_s = retry_after_s


class EngineError(WorkerError):
    """The engine failed while serving a valid request."""

    kind = "engine_error"


class EngineStartError(WorkerError):
    """The engine could not start (the model, the memory, vLLM itself); start-up stops."""

    kind = "engine_start_error"


def job_error(error: BaseException, job_id: str = "-") -> dict[str, str]:
    """The job output that makes RunPod end the job FAILED with a readable message.

    The runpod SDK turns a yielded ``{"error": ...}`` into a FAILED job with exactly that
    string, whereas a raised exception becomes a message with a traceback appended.
    """
    kind, message = _logged(error, job_id)
    return {"error": f"{kind}: {message}"}


def openai_job_error(error: BaseException, job_id: str = "-") -> dict[str, str]:
    """``job_error`` for a job of an OpenAI route: the FAILED job's error is the OpenAI
    error object as one line of JSON, ``{"error": {"message", "type", "param", "code"}}``,
    ``code`` being the HTTP status, so that whoever relays it can answer as OpenAI does."""
    _status, body = http_error(error, job_id)
    return {"error": json.dumps(body)}


def http_error(error: BaseException, request_id: str = "-") -> tuple[int, dict[str, object]]:
    """The HTTP status and the OpenAI error object, ``{"error": {"message", "type",
    "param", "code"}}`` (``code``: the status), for a job of an OpenAI route and for every
    refused request of the load-balancing server."""
    kind, message = _logged(error, request_id)
    if isinstance(error, WorkerError):
        status, error_type, param = error.status, error.error_type, error.param
    else:
        status, error_type, param = 500, "InternalServerError", None
    body = {"message": f"{kind}: {message}", "type": error_type, "param": param, "code": status}
    return status, {"error": body}


def _logged(error: BaseException, job_id: str) -> tuple[str, str]:
    """The error's kind and client-safe message; logged (with the traceback when internal)."""
    if isinstance(error, WorkerError):
        log.info("job %s failed: %s: %s", job_id, error.kind, error.message)
        return error.kind, error.message
    log.error("job %s failed with an internal error", job_id, exc_info=error)
    return "internal_error", INTERNAL_ERROR_MESSAGE
