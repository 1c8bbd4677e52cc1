"""The job input of RunPod's OpenAI-compatible routes: which route, which request.

RunPod serves ``https://api.runpod.ai/v2/<endpoint_id>/openai/v1/<path>`` by queueing a job
whose input is ``{"openai_route": "/v1/<path>", "openai_input": <the request body>}``.
This module checks that input and names the model the routes serve; it needs no vLLM
(``openai_routes`` runs the requests through vLLM's OpenAI layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_worker.errors import OpenAIRequestError
from vllm_worker.input_size import check_input_size, check_integers
from vllm_worker.schema import UNSUPPORTED_FIELDS
from vllm_worker.settings import Settings

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MODELS = "/v1/models"
RESPONSES = "/v1/responses"
# The Anthropic Messages API, as vLLM serves it (``vllm serve``'s /v1/messages).
MESSAGES = "/v1/messages"
COUNT_TOKENS = "/v1/messages/count_tokens"
# vLLM's /tokenize and /detokenize, under RunPod's /openai/v1 as every route here is.
TOKENIZE = "/v1/tokenize"
DETOKENIZE = "/v1/detokenize"
ROUTES = (CHAT, COMPLETIONS, RESPONSES, MODELS, MESSAGES, COUNT_TOKENS, TOKENIZE, DETOKENIZE)

_KEYS = ("openai_route", "openai_input")


@dataclass(frozen=True)
class OpenAIJob:
    route: str
    body: dict[str, Any]

    @property
    def stream(self) -> bool:
        return self.route in (CHAT, COMPLETIONS, RESPONSES, MESSAGES) and (
            self.body.get("stream") is True
        )


def is_openai_job(job_input: Any) -> bool:
    """Whether a job input is for the OpenAI routes rather than the worker's own input."""
    return isinstance(job_input, dict) and "openai_route" in job_input


def parse_openai_job(
    job_input: dict[str, Any], *, max_n: int, tool_calling: bool = True
) -> OpenAIJob:
    """The route and request body; ``OpenAIRequestError`` (400, or 404 for a route not
    served) when the input is not one this worker answers."""
    unknown = sorted(set(job_input) - set(_KEYS))
    if unknown:
        raise _bad_request(f"{', '.join(unknown)}: unknown key; allowed: {', '.join(_KEYS)}")
    route = job_input["openai_route"]
    if not isinstance(route, str) or route.rstrip("/") not in ROUTES:
        raise OpenAIRequestError(
            f"openai_route: {route!r} is not served; served: {', '.join(ROUTES)}",
            status=404,
            error_type="NotFoundError",
            param=None,
        )
    route = route.rstrip("/")
    body = job_input.get("openai_input")
    if body is None and route == MODELS:
        body = {}
    if not isinstance(body, dict):
        raise _bad_request(f"openai_input: must be a JSON object (got {type(body).__name__})")
    check_body(body, max_n=max_n, tool_calling=tool_calling)
    return OpenAIJob(route=route, body=body)


def check_request(raw: object, max_chars: int) -> None:
    """The checks of an OpenAI request's input before vLLM reads it: its size
    (MAX_INPUT_CHARS, before anything reads the text) and its integers (64 bits)."""
    check_input_size(raw, max_chars)
    check_integers(raw)


def check_body(body: dict[str, Any], *, max_n: int, tool_calling: bool) -> None:
    """What the worker refuses that vLLM's OpenAI layer would take: ``n`` over MAX_N,
    ``best_of`` (ignored by vLLM), ``tools`` without a tool parser."""
    _check_n(body, max_n)
    _check_best_of(body)
    if body.get("tools") and not tool_calling:
        raise _bad_request(
            "tools: this worker serves no tool calling: set TOOL_CALL_PARSER and "
            "ENABLE_AUTO_TOOL_CHOICE=true to serve it",
            param="tools",
        )


def _check_n(body: dict[str, Any], max_n: int) -> None:
    # vLLM has no bound of its own on n; the worker's MAX_N applies to every input.
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > max_n:
        raise _bad_request(f"n: must be at most {max_n} (MAX_N) (got {n})", param="n")


def _check_best_of(body: dict[str, Any]) -> None:
    # vLLM's OpenAI layer ignores fields it does not know, best_of among them: refused
    # instead, as the worker's own input refuses it, so no client believes it applied.
    if body.get("best_of") not in (None, 1):
        raise _bad_request(
            f"best_of: not supported: {UNSUPPORTED_FIELDS['best_of']}", param="best_of"
        )


def _bad_request(message: str, param: str | None = None) -> OpenAIRequestError:
    return OpenAIRequestError(message, status=400, error_type="BadRequestError", param=param)


def served_model_name(settings: Settings) -> str:
    """The model name the routes answer to: ``SERVED_MODEL_NAME``, else ``MODEL_NAME``
    when it is a Hugging Face repo id, else (a local directory: absolute, ``./``, ``~``) the
    directory's name, so that no filesystem path of the worker is shown to clients."""
    if settings.served_model_name:
        return settings.served_model_name
    name = settings.model_name
    if name.startswith(("/", ".", "~")):
        return Path(name.rstrip("/")).name or name
    return name
