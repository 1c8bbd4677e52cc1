"""Tool calling and reasoning output through vLLM's OpenAI layer, on the session's engine:
the routes built as start-up builds them, with the settings that turn each on."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest

from helpers import WEATHER_PARAMETERS
from vllm_worker.engine import Engine
from vllm_worker.errors import SettingsError
from vllm_worker.openai_input import CHAT, RESPONSES, served_model_name
from vllm_worker.settings import Settings
from vllm_worker.startup import build

Run = Callable[..., Any]
ASK = [{"role": "user", "content": "What will the weather be in Paris?"}]
PARAMETERS = WEATHER_PARAMETERS
# No `strict`: only TOOL_STRICT_LEVEL=parameter pins its arguments.
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": PARAMETERS}}


def outputs(run: Run, engine: Engine, settings: Settings, route: str, body: Any) -> list[Any]:
    handler = build(engine, settings).handler
    job = {"openai_route": route, "openai_input": {"model": served_model_name(settings), **body}}
    return list(run(_collect(handler, job)))


async def _collect(handler: Any, job_input: dict[str, Any]) -> list[Any]:
    return [output async for output in handler({"id": "features", "input": job_input})]


@pytest.mark.parametrize("route", [CHAT, RESPONSES])
def test_tools_on_a_worker_without_tool_calling_are_refused_with_a_400(
    run: Run, engine: Engine, settings: Settings, route: str
) -> None:
    body = {"tools": [WEATHER], "max_tokens": 8}
    body |= {"messages": ASK} if route == CHAT else {"input": "Weather?"}
    (output,) = outputs(run, engine, settings, route, body)
    error = json.loads(output["error"])["error"]
    assert error["code"] == 400 and error["param"] == "tools"
    assert error["message"].startswith(
        "invalid_input: tools: this worker serves no tool calling: set TOOL_CALL_PARSER"
    )


@pytest.mark.parametrize("route", [CHAT, RESPONSES])
def test_a_field_vllm_would_ignore_is_refused_with_a_400_naming_it(
    run: Run, engine: Engine, settings: Settings, route: str
) -> None:
    body: dict[str, Any] = {"temprature": 0.5}
    body |= {"messages": ASK, "max_tokens": 8} if route == CHAT else {"input": "Weather?"}
    (output,) = outputs(run, engine, settings, route, body)
    error = json.loads(output["error"])["error"]
    assert error["code"] == 400 and error["param"] == "temprature"
    assert error["message"] == (
        f"invalid_input: temprature: unknown field; vLLM's {route} does not take it"
    )


def test_fields_of_openais_api_that_vllm_lacks_are_taken_as_vllm_takes_them(
    run: Run, engine: Engine, settings: Settings
) -> None:
    body = {"messages": ASK, "max_tokens": 2, "store": False, "metadata": {"user": "a"}}
    (output,) = outputs(run, engine, settings, CHAT, body)
    assert output["object"] == "chat.completion", output


def test_tool_strict_level_parameter_pins_a_plain_functions_arguments(
    run: Run, engine: Engine, settings: Settings
) -> None:
    strict = settings.model_copy(
        update={
            "tool_call_parser": "hermes",
            "enable_auto_tool_choice": True,
            "tool_strict_level": "parameter",
        }
    )
    body = {
        "messages": ASK,
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "max_tokens": 200,
    }
    (response,) = outputs(run, engine, strict, CHAT, body)
    assert "choices" in response, response
    [call] = response["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMETERS)


@pytest.mark.parametrize(
    ("variable", "name"), [("reasoning_parser", "deepseek_r1"), ("reasoning_parser", "olmo3")]
)
def test_a_parser_the_tokenizer_cannot_serve_stops_start_up(
    engine: Engine, settings: Settings, variable: str, name: str
) -> None:
    """The tiny model has no ``<think>`` token: each request would fail; start-up does."""
    with pytest.raises(SettingsError) as refused:
        build(engine, settings.model_copy(update={variable: name}))
    assert str(refused.value).startswith(
        f"{variable.upper()}={name!r} does not fit the model's tokenizer: "
    )
