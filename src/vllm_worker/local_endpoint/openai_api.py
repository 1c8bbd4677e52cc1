"""RunPod's OpenAI-compatible API: ``/v2/<endpoint_id>/openai/v1/<path>``, as jobs.

As RunPod does, each request becomes a job ``{"openai_route": "/v1/<path>",
"openai_input": <the JSON body>}`` (a GET, such as ``/models``, has no body) in the
endpoint's queue, and the job's output is relayed as the HTTP answer, so the official
``openai`` client works with ``base_url=http://127.0.0.1:<port>/v2/<endpoint_id>/openai/v1``
and the API key as its bearer token:

- a non-streaming request (no ``"stream": true``) waits for the job; its one output (the
  response object) is the JSON body;
- a streaming request is answered ``text/event-stream``; each output the worker streams
  (the server-sent-event text ``data: {...}\\n\\n``) is written as it arrives, up to
  ``data: [DONE]``;
- a FAILED job whose error is an OpenAI error object (``{"error": {..., "code": 400}}``,
  the worker's ``errors.openai_job_error``) is answered with that body and ``code`` as the
  status; any other failure is a 500 (504 for a timeout) with an OpenAI error body. A job
  that fails after its stream began ends the stream with an error event.

The route itself is not checked here: the worker refuses the routes it does not serve.
A client that goes away cancels its job.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from vllm_worker.local_endpoint.context import Context
from vllm_worker.local_endpoint.jobs import Job, JobStatus

log = logging.getLogger(__name__)


def error_body(message: str, status: int, error_type: str) -> dict[str, Any]:
    """An OpenAI error object."""
    return {"error": {"message": message, "type": error_type, "param": None, "code": status}}


def failure(job: Job) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI error body for a job that did not complete."""
    error = job.error or f"the job ended {job.status.value}"
    try:
        body = json.loads(error)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = body["error"].get("code")
        if isinstance(code, int) and 400 <= code <= 599:
            return code, body
    if job.status is JobStatus.TIMED_OUT:
        return 504, error_body(error, 504, "TimeoutError")
    return 500, error_body(error, 500, "InternalServerError")


class OpenAIRelay:
    """Turns OpenAI API requests into jobs of the endpoint and relays their outputs."""

    PATH = "/openai/v1/{route:.*}"  # under /v2/<endpoint_id>

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def handle(self, request: web.Request) -> web.StreamResponse:
        route = "/v1/" + request.match_info["route"]
        job_input: dict[str, Any] = {"openai_route": route}
        if request.can_read_body:
            try:
                job_input["openai_input"] = json.loads(await request.read())
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                message = f"the body is not JSON: {error}"
                return web.json_response(error_body(message, 400, "BadRequestError"), status=400)
        body = job_input.get("openai_input")
        streaming = isinstance(body, dict) and body.get("stream") is True
        job = self.ctx.store.submit(job_input, sync=True)
        log.info("job %s queued (OpenAI %s %s)", job.id, request.method, route)
        try:
            if streaming:
                return await self._stream(request, job)
            return await self._answer(job)
        except (asyncio.CancelledError, ConnectionResetError):
            self.ctx.store.cancel(job.id)  # the client went away: stop generating for it
            log.info("job %s: the client went away; the job is %s", job.id, job.status.value)
            raise

    async def _wait(self, job: Job, ready: Callable[[], bool]) -> bool:
        """Wait until ``ready()``; False when the job's time ran out first (then cancelled)."""
        # The job's own execution timeout ends it (TIMED_OUT) sooner; this bounds the
        # wait of a job that never leaves the queue.
        deadline = time.monotonic() + job.execution_timeout_s + self.ctx.config.runsync_wait_s
        remaining = deadline - time.monotonic()
        if await self.ctx.changes.wait_for(lambda: ready() or self.ctx.draining, remaining):
            return ready()
        self.ctx.store.cancel(job.id)
        return False

    async def _answer(self, job: Job) -> web.StreamResponse:
        await self._wait(job, lambda: job.status.final)
        if job.status is JobStatus.COMPLETED:
            output = job.output
            # The aggregated stream (return_aggregate_stream): one response object.
            if isinstance(output, list) and len(output) == 1:
                output = output[0]
            return web.json_response(output)
        status, body = failure(job)
        return web.json_response(body, status=status)

    async def _stream(self, request: web.Request, job: Job) -> web.StreamResponse:
        # The status is not known until the job either streams or fails.
        await self._wait(job, lambda: bool(job.stream) or job.status.final)
        if not job.stream and job.status is not JobStatus.COMPLETED:
            status, body = failure(job)
            return web.json_response(body, status=status)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        sent = 0
        while True:
            while sent < len(job.stream):  # entries may come while one is written
                await response.write(_event_text(job.stream[sent].output).encode())
                sent += 1
            if job.status.final or self.ctx.draining:
                break
            if not await self._wait(job, _news_after(job, sent)):
                break
        if job.status is not JobStatus.COMPLETED:
            _status, body = failure(job)
            await response.write(_event_text(body).encode())
        await response.write_eof()
        return response


def _news_after(job: Job, sent: int) -> Callable[[], bool]:
    """Whether the job streamed more than ``sent`` outputs, or ended."""
    return lambda: len(job.stream) > sent or job.status.final


def _event_text(output: Any) -> str:
    """What the worker streamed, as server-sent events: its text as is (it is events
    already), anything else as one ``data:`` event."""
    if isinstance(output, str):
        return output
    return f"data: {json.dumps(output)}\n\n"
