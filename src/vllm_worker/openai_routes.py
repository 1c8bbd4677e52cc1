"""RunPod's OpenAI-compatible routes, served in-process by vLLM's own OpenAI layer.

``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models`` go to the same serving
classes ``vllm serve`` uses (``OpenAIServingChat``, ``OpenAIServingCompletion``,
``OpenAIServingModels``), built once at start-up on the worker's shared engine, so that
sampling, usage, ``n``, ``stop``, ``seed``, ``logprobs``, ``response_format`` and the
response shapes are vLLM's and not a re-implementation.

What a job yields, as RunPod's own vLLM worker (runpod-workers/worker-vllm) does so that
RunPod relays it to the HTTP client:

- a non-streaming request: one output, the response object (``chat.completion``,
  ``text_completion``, ``list``);
- a streaming request: text holding the server-sent events ``data: {...}\\n\\n`` as vLLM
  writes them, ending with ``data: [DONE]\\n\\n``; events that come within
  ``STREAM_MIN_INTERVAL_MS`` of the previous output are sent together, in one output;
- a refused request: an error (``errors.WorkerError``) that the handler turns into a
  FAILED job whose error is the OpenAI error object, status code included
  (``errors.openai_job_error``). An error after a stream began is vLLM's own error event
  in the stream.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
from vllm.entrypoints.openai.models.protocol import BaseModelPath
from vllm.entrypoints.openai.models.serving import OpenAIServingModels
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.renderers.online_renderer import OnlineRenderer

from vllm_worker.engine import Engine
from vllm_worker.errors import EngineError, OpenAIRequestError, WorkerError
from vllm_worker.openai_input import CHAT, MODELS, OpenAIJob, served_model_name
from vllm_worker.settings import Settings
from vllm_worker.streaming import EmissionClock

# How the chat template reads message contents: vLLM's detection, as ``vllm serve``'s default.
_CONTENT_FORMAT = "auto"


class OpenAIRoutes:
    """vLLM's serving objects for the OpenAI routes, on the worker's engine."""

    def __init__(
        self,
        models: OpenAIServingModels,
        chat: OpenAIServingChat,
        completion: OpenAIServingCompletion,
        stream_min_interval_s: float,
    ) -> None:
        self.models = models
        self.chat = chat
        self.completion = completion
        self._stream_min_interval_s = stream_min_interval_s

    @classmethod
    def build(cls, engine: Engine, settings: Settings, chat_template: str | None) -> OpenAIRoutes:
        """The routes on ``engine``, once, at start-up, rendering conversations with
        ``chat_template`` (the one ``messages`` jobs use). Nothing here needs an event loop
        (the SDK runs the jobs in its own)."""
        llm = engine.client  # vLLM's EngineClient, which its serving classes take
        name = served_model_name(settings)
        # model_path is only shown as the model's "root": the public name, never a path.
        # No LoRA modules, so there are no static LoRAs to load (init_static_loras).
        models = OpenAIServingModels(
            engine_client=llm,
            base_model_paths=[BaseModelPath(name=name, model_path=name)],
            lora_modules=None,
        )
        # The worker's chat template, so that `messages` jobs and this route render alike.
        template = chat_template
        renderer = OnlineRenderer(
            model_config=llm.model_config,
            renderer=llm.renderer,
            request_logger=None,  # never log prompts
            chat_template=template,
            chat_template_content_format=_CONTENT_FORMAT,
        )
        renderer.warmup()
        chat = OpenAIServingChat(
            llm,
            models,
            "assistant",
            online_renderer=renderer,
            request_logger=None,
            chat_template=template,
            chat_template_content_format=_CONTENT_FORMAT,
        )
        completion = OpenAIServingCompletion(
            llm, models, online_renderer=renderer, request_logger=None
        )
        return cls(models, chat, completion, settings.stream_min_interval_ms / 1000)

    def close(self) -> None:
        """Let go of vLLM's serving objects (each holds the engine) once it has stopped."""
        del self.models, self.chat, self.completion

    async def serve(self, job: OpenAIJob) -> AsyncIterator[Any]:
        """The job's outputs (see the module docstring); ``WorkerError`` when refused."""
        if job.route == MODELS:
            yield (await self.models.show_available_models()).model_dump()
            return
        result = await self._start(job)
        if isinstance(result, ErrorResponse):
            raise _to_worker_error(result)
        if not isinstance(result, AsyncIterator):
            yield result.model_dump()
            return
        async for text in coalesce(result, EmissionClock(self._stream_min_interval_s)):
            yield text

    async def _start(self, job: OpenAIJob) -> Any:
        """vLLM's answer: a response, an ErrorResponse, or the stream's event generator."""
        try:
            if job.route == CHAT:
                chat_request = ChatCompletionRequest.model_validate(job.body)
                return await self.chat.create_chat_completion(chat_request)
            request = CompletionRequest.model_validate(job.body)
            return await self.completion.create_completion(request)
        except ValidationError as error:
            raise _invalid_request(error) from None
        except Exception as error:  # what vLLM's API server turns into an error response
            raise _to_worker_error(create_error_response(error)) from error


async def coalesce(events: AsyncIterator[str], clock: EmissionClock) -> AsyncIterator[str]:
    """The events, joined into one text while ``clock`` holds them back; the last always
    goes (vLLM's stream ends with ``data: [DONE]``)."""
    held: list[str] = []
    async for event in events:
        held.append(event)
        if clock.should_send(time.perf_counter()):
            yield "".join(held)
            held = []
    if held:
        yield "".join(held)


def _invalid_request(error: ValidationError) -> OpenAIRequestError:
    """A request body that does not match vLLM's request model: every problem, one line."""
    problems = []
    param = None
    for detail in error.errors(include_url=False):
        field = ".".join(str(part) for part in detail["loc"]) or "body"
        # OpenAI's "param" is the request's field, not pydantic's path into a union.
        param = param or (str(detail["loc"][0]) if detail["loc"] else None)
        problems.append(f"{field}: {detail['msg']}")
    return OpenAIRequestError(
        "; ".join(problems), status=400, error_type="BadRequestError", param=param
    )


# vLLM's validation errors end with "(parameter=..., value=...)"; the value may be the
# client's text (all of bad_words), and errors are logged: it is cut off.
_VALUE_SUFFIX = re.compile(r" \((?:parameter=[^,()]*, )?value=.*\)$", re.DOTALL)


def _to_worker_error(response: ErrorResponse) -> WorkerError:
    """vLLM's error response as the worker's error: its status, type and parameter kept
    for client errors; a server error is the engine's."""
    info = response.error
    message = _VALUE_SUFFIX.sub("", info.message)
    if info.code < 500:
        return OpenAIRequestError(message, status=info.code, error_type=info.type, param=info.param)
    return EngineError(message)
