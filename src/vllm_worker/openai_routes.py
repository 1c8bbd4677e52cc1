"""RunPod's OpenAI-compatible routes, served in-process by vLLM's own OpenAI layer.

``/v1/chat/completions``, ``/v1/completions``, ``/v1/responses``, ``/v1/models``, the
Anthropic Messages API (``/v1/messages``, ``/v1/messages/count_tokens``) and
``/v1/tokenize``, ``/v1/detokenize`` go to the same serving classes ``vllm serve`` uses
(``OpenAIServingChat``, ``OpenAIServingCompletion``, ``OpenAIServingResponses``,
``OpenAIServingModels``, ``AnthropicServingMessages``, ``ServingTokenization``), built
once at start-up on the worker's shared engine, so that sampling, usage, ``n``, ``stop``,
``seed``, ``logprobs``, ``response_format``, tool calls (``TOOL_CALL_PARSER``,
``ENABLE_AUTO_TOOL_CHOICE``), reasoning output (``REASONING_PARSER``), LoRA adapters
(``LORA_MODULES``, by ``model``) and the response shapes are vLLM's and not a
re-implementation.

What a job yields, as RunPod's own vLLM worker (runpod-workers/worker-vllm) does so that
RunPod relays it to the HTTP client:

- a non-streaming request: one output, the response object (``chat.completion``,
  ``text_completion``, ``list``, ``message``, the token counts or ids);
- a streaming request: text holding the server-sent events ``data: {...}\\n\\n`` as vLLM
  writes them, ending with ``data: [DONE]\\n\\n`` (``/v1/responses``: ``event: <type>``
  and ``data: {...}`` per event, as ``vllm serve`` writes them); events that come within
  ``STREAM_MIN_INTERVAL_MS`` of the previous output are sent together, in one output;
- a refused request: an error (``errors.WorkerError``) that the handler turns into a
  FAILED job whose error is the OpenAI error object, status code included
  (``errors.openai_job_error``). An error after a stream began is vLLM's own error event
  in the stream.
"""

from __future__ import annotations

import re
import time
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from pydantic import TypeAdapter, ValidationError
from vllm.entrypoints.anthropic.protocol import (
    AnthropicCountTokensRequest,
    AnthropicMessagesRequest,
)
from vllm.entrypoints.anthropic.serving import AnthropicServingMessages
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
from vllm.entrypoints.openai.models.protocol import BaseModelPath
from vllm.entrypoints.openai.models.serving import OpenAIServingModels
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
from vllm.entrypoints.openai.responses.serving import OpenAIServingResponses
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.entrypoints.serve.exception_handling.handlers.validation import clean_loc_for_param
from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest, TokenizeRequest
from vllm.entrypoints.serve.tokenize.serving import ServingTokenization
from vllm.renderers.online_renderer import OnlineRenderer

from vllm_worker.engine import Engine
from vllm_worker.errors import EngineError, OpenAIRequestError, SettingsError, WorkerError
from vllm_worker.openai_input import (
    CHAT,
    COMPLETIONS,
    COUNT_TOKENS,
    DETOKENIZE,
    MESSAGES,
    MODELS,
    RESPONSES,
    TOKENIZE,
    OpenAIJob,
    served_model_name,
)
from vllm_worker.schema import MAX_PROBLEMS_SHOWN
from vllm_worker.settings import Settings
from vllm_worker.streaming import EmissionClock

# How the chat template reads message contents: vLLM's detection, as ``vllm serve``'s default.
_CONTENT_FORMAT = "auto"


# A route's serving call (an awaitable of a response, an error or a stream), the
# validator of its request body (TokenizeRequest is a union, not a model: a TypeAdapter)
# and the fields that body may have.
_Route = tuple[Callable[[Any], Awaitable[Any]], TypeAdapter[Any], frozenset[str]]


# The fields of OpenAI's API (its API reference) that vLLM 0.32's request models lack.
OPENAI_FIELDS_VLLM_LACKS: dict[str, frozenset[str]] = {
    CHAT: frozenset(
        {
            "audio",
            "function_call",
            "functions",
            "metadata",
            "modalities",
            "prediction",
            "prompt_cache_key",
            "safety_identifier",
            "service_tier",
            "store",
            "verbosity",
            "web_search_options",
        }
    ),
    COMPLETIONS: frozenset({"best_of"}),  # refused unless 1 (openai_input.check_body)
    RESPONSES: frozenset({"conversation", "safety_identifier", "stream_options"}),
}


class OpenAIRoutes:
    """vLLM's serving objects for the OpenAI routes, on the worker's engine."""

    def __init__(self, servers: Servers, *, stream_min_interval_s: float) -> None:
        self.servers: Servers | None = servers
        self.models = servers.models
        self._routes = _route_table(servers)
        self._stream_min_interval_s = stream_min_interval_s

    @classmethod
    def build(cls, engine: Engine, settings: Settings, chat_template: str | None) -> OpenAIRoutes:
        """The routes on ``engine``, once, at start-up, rendering conversations with
        ``chat_template`` (the one ``messages`` jobs use). Nothing here needs an event loop
        (the SDK runs the jobs in its own)."""
        llm = engine.client  # vLLM's EngineClient, which its serving classes take
        name = served_model_name(settings)
        # model_path is only shown as the model's "root": the public name, never a path.
        models = OpenAIServingModels(
            engine_client=llm,
            base_model_paths=[BaseModelPath(name=name, model_path=name)],
            lora_modules=None,
        )
        # The adapters the native input serves too (the same requests): vLLM loads each
        # the first time it is asked for (init_static_loras would need an event loop).
        models.lora_requests.update(engine.adapters)
        # Tool calling and reasoning output, as `vllm serve`'s flags set them: the renderer
        # checks `tool_choice` and the serving classes parse the model's output.
        parsers: dict[str, Any] = {
            "enable_auto_tools": settings.enable_auto_tool_choice,
            "tool_parser": settings.tool_call_parser,
            "tool_strict_level": settings.tool_strict_level,
            "reasoning_parser": settings.reasoning_parser or "",  # vLLM's "none"
        }
        shared: dict[str, Any] = {
            "request_logger": None,  # never log prompts
            "chat_template": chat_template,  # `messages` jobs and these routes render alike
            "chat_template_content_format": _CONTENT_FORMAT,
            **parsers,
        }
        # Before vLLM's own classes, which refuse a parser that does not fit with a bare
        # TypeError: start-up names the setting.
        _check_parsers_fit(engine.tokenizer, llm.model_config, settings)
        renderer = OnlineRenderer(model_config=llm.model_config, renderer=llm.renderer, **shared)
        renderer.warmup()
        return cls(
            Servers.build(llm, models, renderer, shared),
            stream_min_interval_s=settings.stream_min_interval_ms / 1000,
        )

    def close(self) -> None:
        """Let go of vLLM's serving objects (each holds the engine) once it has stopped."""
        self._routes.clear()
        self.servers = None
        del self.models

    async def serve(self, job: OpenAIJob) -> AsyncIterator[Any]:
        """The job's outputs (see the module docstring); ``WorkerError`` when refused."""
        if job.route == MODELS:
            yield await self.list_models()
            return
        result = await self._start(job)
        if isinstance(result, ErrorResponse):
            raise _to_worker_error(result)
        if not isinstance(result, AsyncIterator):
            yield _dumped(job.route, result)  # as vLLM's own API server answers each route
            return
        events = _sse(result) if job.route == RESPONSES else result
        async for text in coalesce(events, EmissionClock(self._stream_min_interval_s)):
            yield text

    async def list_models(self) -> dict[str, Any]:
        """/v1/models' answer: the served name and the adapters, by name only."""
        models = await self.models.show_available_models()
        for card in models.data:
            if card.id in self.models.lora_requests:
                card.root = card.id  # an adapter's "root" is its folder: never a path
        dumped: dict[str, Any] = models.model_dump()
        return dumped

    def check_fields(self, route: str, body: Mapping[str, Any]) -> None:
        """Refuse a field that neither vLLM's request model of ``route`` nor OpenAI's API
        has (a typo such as ``temprature``): vLLM would ignore it, with a line in the log,
        and the client believe it applied. Fields of OpenAI's API that vLLM lacks are
        ignored as vLLM ignores them: clients written for OpenAI send them."""
        if route not in self._routes or route in (MESSAGES, COUNT_TOKENS):
            return  # Anthropic's API: its clients (Claude Code) send its newest fields
        known = self._routes[route][2] | OPENAI_FIELDS_VLLM_LACKS.get(route, frozenset())
        unknown = sorted(set(body) - known)
        if unknown:
            raise OpenAIRequestError(
                f"{', '.join(unknown[:MAX_PROBLEMS_SHOWN])}: unknown field; vLLM's {route} "
                "does not take it",
                status=400,
                error_type="BadRequestError",
                param=unknown[0],
            )

    async def _start(self, job: OpenAIJob) -> Any:
        """vLLM's answer: a response, an ErrorResponse, or the stream's event generator."""
        serve, request_model, _fields = self._routes[job.route]
        self.check_fields(job.route, job.body)
        try:
            return await serve(request_model.validate_python(job.body))
        except ValidationError as error:
            raise invalid_request(error.errors(include_url=False)) from None
        except Exception as error:  # what vLLM's API server turns into an error response
            raise _to_worker_error(create_error_response(error)) from error


@dataclass(frozen=True)
class Servers:
    """vLLM's serving objects, one of each, built once on the worker's engine; the
    load-balancing server hands them to vLLM's own FastAPI routes (http_app.py)."""

    models: OpenAIServingModels
    chat: OpenAIServingChat
    completion: OpenAIServingCompletion
    responses: OpenAIServingResponses
    messages: AnthropicServingMessages
    tokenization: ServingTokenization

    @classmethod
    def build(
        cls, llm: Any, models: OpenAIServingModels, renderer: OnlineRenderer, shared: dict[str, Any]
    ) -> Servers:
        return cls(
            models=models,
            chat=OpenAIServingChat(llm, models, "assistant", online_renderer=renderer, **shared),
            completion=OpenAIServingCompletion(
                llm, models, online_renderer=renderer, request_logger=None
            ),
            responses=OpenAIServingResponses(llm, models, renderer, **shared),
            messages=AnthropicServingMessages(
                llm, models, "assistant", online_renderer=renderer, **shared
            ),
            tokenization=ServingTokenization(
                models,
                renderer,
                chat_template=shared["chat_template"],
                chat_template_content_format=_CONTENT_FORMAT,
                request_logger=None,
            ),
        )


def _route_table(servers: Servers) -> dict[str, _Route]:
    """The serving call of each route (but /v1/models) and the model of its request."""
    tokenization = servers.tokenization
    # vLLM's tokenization calls take the HTTP request `vllm serve` has (only to name the
    # request's id; without it they make one up).
    calls: dict[str, tuple[Any, Any]] = {
        CHAT: (servers.chat.create_chat_completion, ChatCompletionRequest),
        COMPLETIONS: (servers.completion.create_completion, CompletionRequest),
        RESPONSES: (servers.responses.create_responses, ResponsesRequest),
        MESSAGES: (servers.messages.create_messages, AnthropicMessagesRequest),
        COUNT_TOKENS: (servers.messages.count_tokens, AnthropicCountTokensRequest),
        TOKENIZE: (partial(tokenization.create_tokenize, raw_request=None), TokenizeRequest),
        DETOKENIZE: (partial(tokenization.create_detokenize, raw_request=None), DetokenizeRequest),
    }
    return {
        route: (call, TypeAdapter(request), _fields_of(request))
        for route, (call, request) in calls.items()
    }


def _fields_of(request: Any) -> frozenset[str]:
    """The fields of a request model, or of each model of a union, by name and alias."""
    names: set[str] = set()
    for model in typing.get_args(request) or (request,):
        for name, field in model.model_fields.items():
            names.add(name)
            names.update(alias for alias in (field.alias, field.validation_alias) if alias)
    return frozenset(name for name in names if isinstance(name, str))


def _dumped(route: str, response: Any) -> Any:
    """A response object as ``vllm serve`` writes it: the Responses API by its aliases,
    the Anthropic API without its unset fields."""
    if route == RESPONSES:
        return response.model_dump(by_alias=True)
    if route in (MESSAGES, COUNT_TOKENS):
        return response.model_dump(exclude_none=True)
    return response.model_dump()


def _check_parsers_fit(tokenizer: Any, model_config: Any, settings: Settings) -> None:
    """Each parser set is built once with the model's tokenizer, as every request builds it:
    one that needs tokens the model lacks (a reasoning parser's ``<think>``) stops start-up
    here, ``SettingsError``, not each request later."""
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    checks: tuple[tuple[str, str | None, Any, dict[str, Any]], ...] = (
        ("TOOL_CALL_PARSER", settings.tool_call_parser, ToolParserManager.get_tool_parser, {}),
        (
            "REASONING_PARSER",
            settings.reasoning_parser,
            ReasoningParserManager.get_reasoning_parser,
            {"model_config": model_config},
        ),
    )
    for variable, name, parser_class, extra in checks:
        if name is None:
            continue
        try:
            parser_class(name)(tokenizer, **extra)
        except Exception as error:
            first_line = (str(error).strip().splitlines() or [""])[0][:300]
            raise SettingsError(
                f"{variable}={name!r} does not fit the model's tokenizer: "
                f"{type(error).__name__}: {first_line}"
            ) from None


async def _sse(events: AsyncIterator[Any]) -> AsyncIterator[str]:
    """The Responses API's stream events as server-sent events, as ``vllm serve`` writes
    them (``event: <type>`` and ``data: <json>``)."""
    async for event in events:
        data = event.model_dump_json(indent=None, by_alias=True)
        yield f"event: {getattr(event, 'type', 'unknown')}\ndata: {data}\n\n"


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


def invalid_request(details: Sequence[Mapping[str, Any]]) -> OpenAIRequestError:
    """A request body that does not match vLLM's request model (pydantic's errors, or
    FastAPI's, whose locations start with "body"): one line, at most
    ``MAX_PROBLEMS_SHOWN`` problems, each its field and what is wrong, never the value."""
    problems = []
    param = None
    for detail in details:
        loc = tuple(detail["loc"])
        loc = loc[1:] if loc[:1] == ("body",) else loc
        if detail["type"] == "json_invalid":  # FastAPI's: the location is a character's
            reason = detail.get("ctx", {}).get("error", "")
            problems.append(f"body: not valid JSON ({reason} at character {loc[-1]})")
            continue
        field = clean_loc_for_param(loc) if loc else "body"
        # OpenAI's "param" is the request's field, not pydantic's path into a union.
        param = param or (field.split(".")[0] if loc else None)
        problems.append(f"{field}: {detail['msg']}")
    more = len(problems) - MAX_PROBLEMS_SHOWN
    shown = problems[:MAX_PROBLEMS_SHOWN] + ([f"and {more} more"] if more > 0 else [])
    return OpenAIRequestError(
        "; ".join(shown), status=400, error_type="BadRequestError", param=param
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
