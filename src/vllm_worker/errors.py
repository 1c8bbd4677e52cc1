"""The worker's one error hierarchy, and the one place that turns an error into a job error.

Every failure a client can see is a ``WorkerError`` whose message is safe to show: a
single line, no traceback, no prompt text. Anything else that escapes is an internal
error: the client gets a stable message, the worker log gets the traceback.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

INTERNAL_ERROR_MESSAGE = "Internal error in the worker; the details are in the worker log."


class WorkerError(Exception):
    """Base class of every error whose message is meant for the client."""

    kind = "worker_error"

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


class EngineError(WorkerError):
    """The engine failed while serving a valid request."""

    kind = "engine_error"


def job_error(error: BaseException, job_id: str = "-") -> dict[str, str]:
    """The job output that makes RunPod end the job FAILED with a readable message.

    The runpod SDK turns a yielded ``{"error": ...}`` into a FAILED job with exactly that
    string, whereas a raised exception becomes a message with a traceback appended.
    """
    if isinstance(error, WorkerError):
        log.info("job %s failed: %s: %s", job_id, error.kind, error.message)
        return {"error": f"{error.kind}: {error.message}"}
    log.error("job %s failed with an internal error", job_id, exc_info=error)
    return {"error": f"internal_error: {INTERNAL_ERROR_MESSAGE}"}
