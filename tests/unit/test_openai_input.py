"""The OpenAI routes' pure parts: the route table, the served model name, error objects."""

from __future__ import annotations

import json
from typing import Any

import pytest

from vllm_worker.errors import (
    INTERNAL_ERROR_MESSAGE,
    EngineError,
    InvalidInputError,
    OpenAIRequestError,
    job_error,
    openai_job_error,
)
from vllm_worker.openai_input import (
    CHAT,
    COMPLETIONS,
    MODELS,
    RESPONSES,
    is_openai_job,
    parse_openai_job,
    served_model_name,
)
from vllm_worker.settings import Settings

# --- the route table --------------------------------------------------------------------


@pytest.mark.parametrize("route", [CHAT, COMPLETIONS, RESPONSES, MODELS, CHAT + "/"])
def test_served_routes_are_accepted(route: str) -> None:
    job = parse_openai_job({"openai_route": route, "openai_input": {"model": "m"}}, max_n=4)
    assert job.route == route.rstrip("/")
    assert job.body == {"model": "m"}


@pytest.mark.parametrize(
    "route",
    ["/v1/embeddings", "/v1/responses/resp_1", "/v1/chat", "/chat/completions", "", 7, None],
)
def test_any_other_route_is_refused_with_a_404(route: Any) -> None:
    with pytest.raises(OpenAIRequestError) as refused:
        parse_openai_job({"openai_route": route, "openai_input": {}}, max_n=4)
    assert refused.value.status == 404
    assert refused.value.error_type == "NotFoundError"
    assert refused.value.message.startswith("openai_route: ")
    assert (
        "/v1/chat/completions, /v1/completions, /v1/responses, /v1/models" in refused.value.message
    )


def test_models_needs_no_body_and_never_streams() -> None:
    job = parse_openai_job({"openai_route": MODELS}, max_n=4)
    assert job.body == {}
    assert not job.stream


@pytest.mark.parametrize("body", [None, [], "text", 3])
def test_a_body_that_is_not_an_object_is_a_bad_request(body: Any) -> None:
    with pytest.raises(OpenAIRequestError) as refused:
        parse_openai_job({"openai_route": CHAT, "openai_input": body}, max_n=4)
    assert refused.value.status == 400
    assert refused.value.message.startswith("openai_input: must be a JSON object")


def test_unknown_keys_beside_the_route_are_refused() -> None:
    with pytest.raises(OpenAIRequestError, match="prompt: unknown key"):
        parse_openai_job({"openai_route": CHAT, "openai_input": {}, "prompt": "x"}, max_n=4)


def test_n_above_max_n_is_refused_naming_the_limit() -> None:
    parse_openai_job({"openai_route": COMPLETIONS, "openai_input": {"n": 4}}, max_n=4)
    with pytest.raises(OpenAIRequestError) as refused:
        parse_openai_job({"openai_route": COMPLETIONS, "openai_input": {"n": 5}}, max_n=4)
    assert (refused.value.status, refused.value.param) == (400, "n")
    assert refused.value.message == "n: must be at most 4 (MAX_N) (got 5)"


def test_best_of_is_refused_not_ignored() -> None:
    for best_of in (None, 1):
        parse_openai_job(
            {"openai_route": COMPLETIONS, "openai_input": {"best_of": best_of}}, max_n=4
        )
    with pytest.raises(OpenAIRequestError) as refused:
        parse_openai_job({"openai_route": COMPLETIONS, "openai_input": {"best_of": 3}}, max_n=4)
    assert (refused.value.status, refused.value.param) == (400, "best_of")
    assert refused.value.message.startswith("best_of: not supported: vLLM 0.32's engine")


@pytest.mark.parametrize(("stream", "expected"), [(True, True), (False, False), ("yes", False)])
def test_stream_is_read_from_the_body(stream: Any, expected: bool) -> None:
    job = parse_openai_job({"openai_route": CHAT, "openai_input": {"stream": stream}}, max_n=4)
    assert job.stream is expected


def test_only_inputs_with_an_openai_route_are_openai_jobs() -> None:
    assert is_openai_job({"openai_route": CHAT})
    assert not is_openai_job({"prompt": "hello"})
    assert not is_openai_job(None)
    assert not is_openai_job("openai_route")


# --- the served model name ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "meta-llama/Llama-2-7b-chat-hf"),
        ({"MODEL_NAME": "TheBloke/Llama-2-7B-Chat-AWQ"}, "TheBloke/Llama-2-7B-Chat-AWQ"),
        ({"MODEL_NAME": "/models/tiny-llama"}, "tiny-llama"),
        ({"MODEL_NAME": "/models/tiny-llama/"}, "tiny-llama"),
        ({"MODEL_NAME": "./tiny-llama"}, "tiny-llama"),
        ({"MODEL_NAME": "/models/tiny", "SERVED_MODEL_NAME": "llama2-7b-chat"}, "llama2-7b-chat"),
    ],
)
def test_served_model_name_is_public_never_a_path(env: dict[str, str], expected: str) -> None:
    assert served_model_name(Settings.from_env(env)) == expected


# --- error objects ------------------------------------------------------------------------


def openai_error(error: BaseException) -> dict[str, Any]:
    output = openai_job_error(error, "job-1")
    assert list(output) == ["error"]
    assert "\n" not in output["error"]  # one line, as every job error
    return dict(json.loads(output["error"]))


def test_a_refused_request_keeps_its_status_type_and_param() -> None:
    error = OpenAIRequestError(
        "The model `x` does not exist.", status=404, error_type="NotFoundError", param="model"
    )
    assert openai_error(error) == {
        "error": {
            "message": "invalid_input: The model `x` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }


def test_an_invalid_input_is_a_400_and_an_engine_error_a_500() -> None:
    assert openai_error(InvalidInputError("openai_route: no"))["error"] == {
        "message": "invalid_input: openai_route: no",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }
    assert openai_error(EngineError("engine died"))["error"]["code"] == 500


def test_an_internal_error_shows_only_the_stable_message() -> None:
    body = openai_error(RuntimeError("secret /path/in/a/traceback"))
    assert body["error"] == {
        "message": f"internal_error: {INTERNAL_ERROR_MESSAGE}",
        "type": "InternalServerError",
        "param": None,
        "code": 500,
    }


def test_multi_line_messages_become_one_line() -> None:
    error = OpenAIRequestError("1 validation error:\n  x", status=400, error_type="E", param=None)
    assert openai_error(error)["error"]["message"] == "invalid_input: 1 validation error: x"


def test_the_worker_job_error_is_unchanged() -> None:
    assert job_error(InvalidInputError("prompt: x")) == {"error": "invalid_input: prompt: x"}
    assert job_error(ValueError("x")) == {"error": f"internal_error: {INTERNAL_ERROR_MESSAGE}"}
