"""openai_routes without an engine: stream coalescing and request-validation errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from pydantic import ValidationError
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest

from vllm_worker.openai_routes import _fields_of, coalesce, invalid_request
from vllm_worker.streaming import EmissionClock

EVENTS = [f'data: {{"n": {i}}}\n\n' for i in range(5)] + ["data: [DONE]\n\n"]


async def events() -> AsyncIterator[str]:
    for event in EVENTS:
        yield event


def coalesced(clock: EmissionClock) -> list[str]:
    async def collect() -> list[str]:
        return [text async for text in coalesce(events(), clock)]

    return asyncio.run(collect())


def test_without_an_interval_every_event_goes_alone() -> None:
    assert coalesced(EmissionClock(0.0)) == EVENTS


def test_events_held_back_go_together_and_the_last_always_goes() -> None:
    # The first at once; within an hour of it, nothing else until the stream ends.
    assert coalesced(EmissionClock(3600.0)) == [EVENTS[0], "".join(EVENTS[1:])]


def validation_error(model: type[CompletionRequest | ChatCompletionRequest], body: object) -> str:
    with pytest.raises(ValidationError) as invalid:
        model.model_validate(body)
    error = invalid_request(invalid.value.errors(include_url=False))
    assert error.status == 400
    assert error.error_type == "BadRequestError"
    return f"{error.param} | {error.message}"


def test_a_wrong_type_names_the_field() -> None:
    body = {"model": "m", "prompt": "x", "temperature": "hot"}
    assert validation_error(CompletionRequest, body) == (
        "temperature | temperature: Input should be a valid number, unable to parse string as "
        "a number"
    )


def test_a_missing_field_is_named_and_every_problem_listed() -> None:
    text = validation_error(ChatCompletionRequest, {"model": "m", "max_tokens": "many"})
    assert text.startswith("messages | messages: Field required; max_tokens: ")


def test_the_param_is_the_requests_field_not_a_path_into_a_union() -> None:
    text = validation_error(CompletionRequest, {"model": "m", "prompt": "x", "stop": [1]})
    # pydantic's markers of a union's branches (stop.str, stop.list[str].0) left out
    assert (
        text
        == "stop | stop: Input should be a valid string; stop.0: Input should be a valid string"
    )


def test_fastapis_errors_name_the_field_and_invalid_json_says_where() -> None:
    error = invalid_request(
        [
            {"type": "missing", "loc": ("body", "messages"), "msg": "Field required"},
            {
                "type": "json_invalid",
                "loc": ("body", 23),
                "msg": "JSON decode error",
                "ctx": {"error": "Expecting ',' delimiter"},
            },
        ]
    )
    assert error.message == (
        "messages: Field required; body: not valid JSON (Expecting ',' delimiter at character 23)"
    )
    assert error.param == "messages"


def test_at_most_five_problems_are_listed() -> None:
    details = [
        {"type": "missing", "loc": ("body", f"f{n}"), "msg": "Field required"} for n in range(8)
    ]
    assert invalid_request(details).message.endswith("f4: Field required; and 3 more")


def test_the_fields_of_a_union_are_those_of_each_model() -> None:
    from vllm.entrypoints.serve.tokenize.protocol import TokenizeRequest

    fields = _fields_of(TokenizeRequest)
    assert {"prompt", "messages", "add_special_tokens"} <= fields
    assert {"model", "messages", "max_tokens", "ignore_eos"} <= _fields_of(ChatCompletionRequest)
