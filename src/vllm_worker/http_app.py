"""The load-balancing server's routes on the engine: vLLM's own, and the native one.

``build_app(serving)`` is a FastAPI app made of vLLM's API routers (the functions
``vllm serve`` answers with: ``/v1/chat/completions``, ``/v1/completions``,
``/v1/responses``, ``/v1/messages``, ``/v1/messages/count_tokens``, ``/tokenize``,
``/detokenize``, the last two under ``/v1`` too as the queue's OpenAI route serves them)
on the worker's one set of vLLM serving objects (``openai_routes.Servers``: the chat
template, parsers and adapters of both endpoint types). It adds:

- the worker's checks of a request body (``openai_input.check_request``/``check_body``:
  MAX_INPUT_CHARS, 64-bit integers, MAX_N, ``best_of``, ``tools``; unknown fields,
  ``OpenAIRoutes.check_fields``), as a dependency of every vLLM route, so both endpoint
  types refuse the same requests;
- ``/v1/models`` as the queue answers it (adapters by name, never by folder);
- ``POST /generate``, the native input ``{"input": {...}}``: server-sent events, one
  ``data:`` event per chunk the queue yields (the last is the final chunk), or one JSON
  object (the final chunk) with ``"stream": false``;
- vLLM's exception handlers (its OpenAI error objects), and one for the worker's errors
  (``errors.http_error``), of the same shape.

Not vLLM's whole ``build_app``: it builds a second set of serving objects from ``vllm
serve``'s command-line arguments (a second wiring of the chat template, parsers and
adapters), and registers routes a public endpoint must not have (``/scale_elastic_ep``,
SageMaker's ``/ping`` and ``/invocations``, which would shadow RunPod's health check).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from argparse import Namespace
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from vllm.entrypoints.anthropic import api_router as anthropic_routes
from vllm.entrypoints.openai.chat_completion import api_router as chat_routes
from vllm.entrypoints.openai.completion import api_router as completion_routes
from vllm.entrypoints.openai.responses import api_router as responses_routes
from vllm.entrypoints.serve.exception_handling.register import init_exception_handler
from vllm.entrypoints.serve.tokenize import api_router as tokenize_routes
from vllm.entrypoints.serve.utils.api_utils import with_cancellation

from vllm_worker.errors import InvalidInputError, WorkerError, http_error
from vllm_worker.openai_input import check_body, check_request
from vllm_worker.openai_routes import invalid_request
from vllm_worker.startup import Serving
from vllm_worker.streaming import Chunk

NATIVE_PATH = "/generate"


def build_app(serving: Serving) -> FastAPI:
    servers = serving.openai_routes.servers
    assert servers is not None, "the routes were closed"
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    state = app.state
    # What vLLM's routes and handlers read from the app's state (its init_app_state).
    state.args = Namespace(
        log_error_stack=False, sse_keep_alive_interval=0, enable_tokenizer_info_endpoint=False
    )
    state.engine_client = serving.engine.client
    state.openai_serving_models = servers.models
    state.openai_serving_chat = servers.chat
    state.openai_serving_chat_batch = None
    state.openai_serving_completion = servers.completion
    state.openai_serving_responses = servers.responses
    state.anthropic_serving_messages = servers.messages
    state.serving_tokenization = servers.tokenization
    state.enable_server_load_tracking = False
    state.worker = serving

    checked = [Depends(_worker_checks)]
    for routes in (chat_routes, completion_routes, responses_routes, anthropic_routes):
        app.include_router(routes.router, dependencies=checked)
    app.include_router(tokenize_routes.router, dependencies=checked)
    app.include_router(tokenize_routes.router, prefix="/v1", dependencies=checked)
    app.add_api_route("/v1/models", _models, methods=["GET"])
    app.add_api_route(NATIVE_PATH, with_cancellation(_generate), methods=["POST"])
    init_exception_handler(app)
    app.add_exception_handler(WorkerError, _worker_error)
    # One line naming the field, as the queue's OpenAI route answers (vLLM's own handler
    # writes pydantic's errors on several lines, each with the value sent).
    app.add_exception_handler(RequestValidationError, _invalid_body)
    return app


async def _worker_checks(request: Request) -> None:
    """The worker's checks of an OpenAI request body, before vLLM reads it. A body that is
    not JSON is left to vLLM's validation, which answers it."""
    try:
        body = json.loads(await request.body())
    except ValueError:
        return
    serving: Serving = request.app.state.worker
    check_request(body, serving.jobs.max_chars)
    if isinstance(body, dict):
        settings = serving.jobs.settings
        check_body(body, max_n=settings.max_n, tool_calling=settings.tool_call_parser is not None)
        path = request.url.path
        serving.openai_routes.check_fields(path if path.startswith("/v1/") else "/v1" + path, body)


async def _models(request: Request) -> JSONResponse:
    serving: Serving = request.app.state.worker
    return JSONResponse(await serving.openai_routes.list_models())


async def _generate(body: Annotated[dict[str, Any], Body()], raw_request: Request) -> Response:
    """The native route: the queue's job input, its chunks as server-sent events."""
    extra = sorted(set(body) - {"input"})
    if extra:
        raise InvalidInputError(
            f'{", ".join(extra)}: unknown field; the body is {{"input": {{...}}}}'
        )
    job_input = body.get("input")
    serving: Serving = raw_request.app.state.worker
    job_id = f"http-{uuid.uuid4().hex[:12]}"
    job = _Job(serving.jobs.run(job_id, job_input))
    try:
        # The first chunk (the final one when not streamed) comes after every check, the
        # engine's included: a bad input is a 4xx before anything is sent.
        first = await job.next()
        assert first is not None
        if isinstance(job_input, dict) and job_input.get("stream") is False:
            return JSONResponse(await _last(first, job))  # the final chunk (the only one)
    except BaseException:
        job.cancel()  # the client left (with_cancellation), or the input was refused
        raise
    return StreamingResponse(_events(job_id, first, job), media_type="text/event-stream")


_END = object()


class _Job:
    """A native job run in a task of its own, its chunks read through a queue.

    The engine aborts a request when the task that started it ends, and the route's
    task ends once it returns the response, whose body another task sends. So the job
    runs in its own task, read by both; cancelling it aborts the vLLM request. The
    queue holds one chunk: while the client reads slowly, vLLM merges the outputs.
    """

    def __init__(self, chunks: AsyncGenerator[Chunk, None]) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)
        self._task = asyncio.create_task(self._pump(chunks))

    async def _pump(self, chunks: AsyncGenerator[Chunk, None]) -> None:
        try:
            async for chunk in chunks:
                await self._queue.put(chunk)
        except Exception as error:
            await self._queue.put(error)
            return
        await self._queue.put(_END)

    async def next(self) -> Chunk | None:
        """The next chunk; None at the end; the job's error raised."""
        item = await self._queue.get()
        if isinstance(item, Exception):
            raise item
        return None if item is _END else item

    def cancel(self) -> None:
        self._task.cancel()


async def _last(first: Chunk, job: _Job) -> Chunk:
    last = first
    while (chunk := await job.next()) is not None:
        last = chunk
    return last


async def _events(job_id: str, first: Chunk, job: _Job) -> AsyncIterator[str]:
    """Each chunk as one event; an error after the stream began as an ``error`` event.
    A client that leaves cancels this, which cancels the job (vLLM aborts it)."""
    try:
        yield _event(first)
        while (chunk := await job.next()) is not None:
            yield _event(chunk)
    except Exception as error:
        _status, body = http_error(error, job_id)
        yield f"event: error\ndata: {json.dumps(body)}\n\n"
    finally:
        job.cancel()


def _event(chunk: Chunk) -> str:
    return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"


async def _worker_error(_request: Request, error: Exception) -> JSONResponse:
    status, body = http_error(error)
    return JSONResponse(body, status_code=status)


async def _invalid_body(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    return await _worker_error(request, invalid_request(error.errors()))
