"""The real demo model (SmolLM2-135M-Instruct) through the worker: answers, not shapes.

One local endpoint and its worker (RunPod's production job loop, vLLM's CPU build) serve
the module, with the model served under its public name and vLLM's hermes tool parser.
Greedy requests (temperature 0) make the answers the same on every run; the checks are
on what a reader would check: English, on the subject, the one right answer.

What this 135M model cannot do, and no test asks of it: follow a long instruction
precisely, know many facts, or decide by itself (``tool_choice: "auto"``) to call a tool
(asked for Paris's weather, it writes prose about a `get_weather` API). With a forced
tool choice (``"required"`` or a named tool) and ``strict: true``, vLLM's grammar pins the
call to the schema and the model fills it with the right values.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import jsonschema
import openai
import pytest

from endpoint_process import JOB_TIMEOUT_S, EndpointProcess, start_endpoint
from helpers import (
    SEED_INPUT,
    SEED_SAMPLING_SHORT,
    WEATHER_PARAMETERS,
    assert_english,
    assert_on_the_seeds_subject,
    streamed_tool_call,
)
from vllm_worker.client import EndpointClient
from vllm_worker.demo_model import SERVED_NAME

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "max_tokens": 32}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather forecast of a city for a number of days",
        # Without it (vLLM's TOOL_STRICT_LEVEL=auto) only the call's envelope is pinned, and
        # this model fills the arguments with a list of "greet_greet_greet...".
        "strict": True,
        "parameters": WEATHER_PARAMETERS,
    },
}
# The model knows of a tool only from its prompt: its ChatML template has no tool section.
TOOL_SYSTEM = (
    "You can call the function get_weather(city, days) that returns the weather forecast "
    "of a city for a number of days."
)
TOOL_QUESTION = [
    {"role": "system", "content": TOOL_SYSTEM},
    {"role": "user", "content": "What will the weather be in Paris for the next 3 days?"},
]


@pytest.fixture(scope="module")
def endpoint(
    real_worker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EndpointProcess]:
    tools = {"ENABLE_AUTO_TOOL_CHOICE": "true", "TOOL_CALL_PARSER": "hermes"}
    with start_endpoint(real_worker_env, tmp_path_factory.mktemp("real"), tools) as process:
        yield process


@pytest.fixture(scope="module")
def runpod(endpoint: EndpointProcess) -> EndpointClient:
    return EndpointClient(endpoint.url, timeout_s=30)


@pytest.fixture(scope="module")
def client(endpoint: EndpointProcess) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{endpoint.url}/openai/v1", api_key="unused", max_retries=0, timeout=JOB_TIMEOUT_S
    )


def run(runpod: EndpointClient, job_input: dict[str, Any]) -> list[dict[str, Any]]:
    """Every chunk of a job, as a client polling /stream reads them."""
    return list(runpod.stream(runpod.submit(job_input), deadline_s=JOB_TIMEOUT_S))


def test_the_seeds_request_streams_an_english_essay(runpod: EndpointClient) -> None:
    chunks = run(runpod, {**SEED_INPUT, "sampling_params": SEED_SAMPLING_SHORT})
    assert len(chunks) > 2
    text = ""
    for chunk in chunks:  # cumulative: each chunk extends the last, prompt first
        [current] = chunk["text"]
        assert current.startswith(text) and current.startswith(SEED_INPUT["prompt"])
        text = current
    answer = text[len(SEED_INPUT["prompt"]) :]
    assert_english(answer)
    assert_on_the_seeds_subject(answer)
    final = chunks[-1]
    usage = final["usage"]
    assert final["finish_reason"] in (["length"], ["stop"])
    if final["finish_reason"] == ["length"]:
        assert usage["completion_tokens"] == SEED_SAMPLING_SHORT["max_tokens"]
    assert usage["prompt_tokens"] > 10
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_messages_get_the_models_chatml_template_and_the_right_answer(
    runpod: EndpointClient,
) -> None:
    [*_, final] = run(runpod, {"messages": CAPITAL, "sampling_params": GREEDY, "echo": True})
    [text] = final["text"]
    # The model's own ChatML (its default system line included), not Llama 2's [INST].
    assert text.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" in text
    assert "[INST]" not in text
    answer = text.split("<|im_start|>assistant\n", 1)[1]
    assert "Paris" in answer
    assert final["finish_reason"] == ["stop"]  # it ended by itself (<|im_end|>)


def test_the_openai_chat_route_gives_the_same_answer(
    client: openai.OpenAI, runpod: EndpointClient
) -> None:
    assert [model.id for model in client.models.list()] == [SERVED_NAME]
    response = client.chat.completions.create(
        model=SERVED_NAME, messages=CAPITAL, temperature=0, max_tokens=32
    )
    answer = response.choices[0].message.content
    [*_, native] = run(runpod, {"messages": CAPITAL, "sampling_params": GREEDY})
    assert answer is not None and "Paris" in answer
    assert native["text"] == [answer]  # one template, one engine: the same greedy text


def test_a_stop_string_ends_the_text_before_it(runpod: EndpointClient) -> None:
    count = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    [*_, whole] = run(runpod, {"messages": count, "sampling_params": GREEDY})
    assert "4, 5" in whole["text"][0]  # the greedy answer counts; then stop it at 5
    stopped = {**GREEDY, "stop": ["5"]}
    [*_, final] = run(runpod, {"messages": count, "sampling_params": stopped})
    [text] = final["text"]
    assert final["finish_reason"] == ["stop"]
    assert text == whole["text"][0].split("5", 1)[0]
    assert text.rstrip().endswith("4,")


def test_the_anthropic_api_answers_and_stops_at_a_stop_sequence(endpoint: EndpointProcess) -> None:
    claude = anthropic.Anthropic(
        base_url=f"{endpoint.url}/openai", auth_token="unused", max_retries=0, timeout=JOB_TIMEOUT_S
    )
    question = {"model": SERVED_NAME, "max_tokens": 32, "extra_body": {"temperature": 0}}
    answer = claude.messages.create(**question, messages=CAPITAL)  # type: ignore[arg-type]
    assert "Paris" in answer.content[0].text  # type: ignore[union-attr]
    count = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    stopped = claude.messages.create(**question, messages=count, stop_sequences=["5"])  # type: ignore[arg-type]
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "5")
    assert stopped.content[0].text.rstrip().endswith("4,")  # type: ignore[union-attr]
    cut = claude.messages.create(**{**question, "max_tokens": 5}, messages=count)  # type: ignore[arg-type]
    assert (cut.stop_reason, cut.usage.output_tokens) == ("max_tokens", 5)


def test_n_2_with_a_seed_is_reproducible(runpod: EndpointClient) -> None:
    sampling = {"n": 2, "seed": 1234, "temperature": 0.8, "max_tokens": 32}
    job_input = {"messages": [{"role": "user", "content": "Describe a sunny day."}]}
    job_input["sampling_params"] = sampling
    [*_, first] = run(runpod, job_input)
    [*_, second] = run(runpod, job_input)
    assert first["text"] == second["text"]
    for text in first["text"]:
        assert_english(text, min_words=10)


def test_a_greedy_tokens_logprob_is_the_largest_of_its_top_list(runpod: EndpointClient) -> None:
    sampling = {**GREEDY, "logprobs": 5}
    [*_, final] = run(runpod, {"messages": CAPITAL, "sampling_params": sampling})
    [entries] = final["logprobs"]
    assert len(entries) == final["usage"]["completion_tokens"]
    for entry in entries:
        assert len(entry["top_logprobs"]) >= 5
        assert entry["logprob"] == max(entry["top_logprobs"].values())
        assert entry["top_logprobs"][entry["token"]] == entry["logprob"]
    assert "Paris" in "".join(entry["token"] for entry in entries)


CAPITAL_SCHEMA = {
    "type": "object",
    "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
    "required": ["country", "capital"],
    "additionalProperties": False,
}
CAPITAL_IN_JSON = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]


def test_a_json_schema_gets_valid_json_with_the_right_answer(runpod: EndpointClient) -> None:
    schema, question = CAPITAL_SCHEMA, CAPITAL_IN_JSON
    sampling = {"temperature": 0, "max_tokens": 64, "structured_outputs": {"json": schema}}
    [*_, final] = run(runpod, {"messages": question, "sampling_params": sampling})
    assert final["finish_reason"] == ["stop"]  # the JSON ended, not max_tokens
    answer = json.loads(final["text"][0])
    jsonschema.validate(answer, schema)
    assert "Paris" in answer["capital"]
    # Any JSON object (json_object): the model chooses the keys.
    sampling = {"temperature": 0, "max_tokens": 64, "structured_outputs": {"json_object": True}}
    [*_, final] = run(runpod, {"messages": question, "sampling_params": sampling})
    assert final["finish_reason"] == ["stop"]
    assert "Paris" in json.dumps(json.loads(final["text"][0]))


def test_the_openai_chat_routes_json_schema_response_format(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=SERVED_NAME,
        messages=CAPITAL_IN_JSON,  # type: ignore[arg-type]
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "capital", "schema": CAPITAL_SCHEMA, "strict": True},
        },
        temperature=0,
        max_tokens=64,
    )
    answer = json.loads(response.choices[0].message.content or "")
    jsonschema.validate(answer, CAPITAL_SCHEMA)
    assert "Paris" in answer["capital"]


def check_weather_call(name: str, arguments: str) -> None:
    """The model's call: the right tool, for Paris, with valid arguments."""
    assert name == "get_weather"
    called = json.loads(arguments)
    assert called == {"city": "Paris", "days": 3}


def test_a_required_tool_choice_calls_the_tool_for_the_city_asked(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=SERVED_NAME,
        messages=TOOL_QUESTION,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=100,
    )
    [call] = response.choices[0].message.tool_calls or []
    assert call.type == "function"
    check_weather_call(call.function.name, call.function.arguments)


def test_a_named_tool_choice_streams_the_call(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=SERVED_NAME,
        messages=TOOL_QUESTION,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=100,
        stream=True,
    )
    check_weather_call(*streamed_tool_call(stream))
