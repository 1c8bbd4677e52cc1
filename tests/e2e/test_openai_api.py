"""End to end: the official ``openai`` client against the local endpoint's OpenAI API.

One endpoint (with an API key) and its real worker (production mode, vLLM's CPU build,
the tiny model) serve the module; the client only has its ``base_url`` changed, as for
RunPod's ``https://api.runpod.ai/v2/<endpoint_id>/openai/v1``. The tiny model's weights
are random, so the tests check shapes, counts and equalities, never words; greedy
requests (temperature 0) make two runs comparable.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import jsonschema
import openai
import pytest
import requests

from endpoint_process import JOB_TIMEOUT_S, EndpointProcess, start_endpoint, submit, wait_final
from helpers import WEATHER_PARAMETERS, lora_modules, streamed_tool_call

API_KEY = "test-key"
MESSAGES: list[Any] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three rivers of Europe."},
]
# Generate exactly max_tokens (a random model may sample EOS early): vLLM's extra parameter.
IGNORE_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def endpoint(
    worker_env: dict[str, str],
    tiny_adapters: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[EndpointProcess]:
    workdir = tmp_path_factory.mktemp("openai-endpoint")
    settings = {
        # Tool calling (vLLM's hermes parser) and the tiny model's two LoRA adapters.
        "ENABLE_AUTO_TOOL_CHOICE": "true",
        "TOOL_CALL_PARSER": "hermes",
        "LORA_MODULES": lora_modules(tiny_adapters),
        "MAX_LORAS": "2",
    }
    with start_endpoint(worker_env, workdir, settings, api_key=API_KEY) as process:
        yield process


@pytest.fixture(scope="module")
def client(endpoint: EndpointProcess) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{endpoint.url}/openai/v1",
        api_key=API_KEY,
        max_retries=0,  # a retry would hide a failure
        timeout=JOB_TIMEOUT_S,
    )


@pytest.fixture(scope="module")
def model(client: openai.OpenAI, tiny_model_dir: Path) -> str:
    """The served name: the model directory's name, as MODEL_NAME is a local path."""
    return tiny_model_dir.name


def test_models_lists_the_served_name_never_a_path(client: openai.OpenAI, model: str) -> None:
    models = client.models.list()
    assert [entry.id for entry in models.data] == [model, "alpha", "beta"]  # and the adapters
    assert "/" not in json.dumps(models.model_dump())  # no path anywhere, "root" included


def test_chat_completion_with_usage(client: openai.OpenAI, model: str) -> None:
    response = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=12, extra_body=IGNORE_EOS
    )
    assert response.object == "chat.completion"
    assert response.model == model
    [choice] = response.choices
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert response.usage is not None
    assert response.usage.completion_tokens == 12
    assert response.usage.prompt_tokens > 5  # the system prompt and the question, templated
    total = response.usage.prompt_tokens + response.usage.completion_tokens
    assert response.usage.total_tokens == total


def test_streamed_chat_equals_the_whole_answer(client: openai.OpenAI, model: str) -> None:
    request: dict[str, Any] = {
        "model": model,
        "messages": MESSAGES,
        "max_tokens": 24,
        "temperature": 0,
        "extra_body": IGNORE_EOS,
    }
    whole = client.chat.completions.create(**request)
    chunks = list(
        client.chat.completions.create(
            **request, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    deltas = [chunk.choices[0] for chunk in chunks if chunk.choices]
    assert deltas[0].delta.role == "assistant"
    assert "".join(choice.delta.content or "" for choice in deltas) == (
        whole.choices[0].message.content
    )
    assert [choice.finish_reason for choice in deltas][-1] == "length"
    assert chunks[-1].usage == whole.usage


def test_streaming_is_server_sent_events_ending_with_done(endpoint: EndpointProcess) -> None:
    reply = requests.post(
        f"{endpoint.url}/openai/v1/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"prompt": "Once upon a time", "max_tokens": 8, "stream": True, **IGNORE_EOS},
        stream=True,
        timeout=JOB_TIMEOUT_S,
    )
    assert reply.status_code == 200
    assert reply.headers["Content-Type"].startswith("text/event-stream")
    events = [line.decode() for line in reply.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"text_completion"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_completion_n_2_and_max_tokens(client: openai.OpenAI, model: str) -> None:
    response = client.completions.create(
        model=model, prompt="The capital of France is", n=2, max_tokens=6, extra_body=IGNORE_EOS
    )
    assert response.object == "text_completion"
    assert sorted(choice.index for choice in response.choices) == [0, 1]
    assert [choice.finish_reason for choice in response.choices] == ["length", "length"]
    assert response.usage is not None
    assert response.usage.completion_tokens == 2 * 6
    assert response.usage.total_tokens == response.usage.prompt_tokens + 12


def test_stop_ends_the_completion_before_the_stop_string(client: openai.OpenAI, model: str) -> None:
    request: dict[str, Any] = {"model": model, "prompt": "Hello", "temperature": 0}
    free = client.completions.create(**request, max_tokens=32, extra_body=IGNORE_EOS)
    text = free.choices[0].text
    # A stop string from the middle of the greedy answer: the same answer ends before it.
    stop = text[len(text) // 2 :][:3]
    assert stop.strip(), f"no stop string to take from {text!r}"
    stopped = client.completions.create(
        **request, max_tokens=32, stop=[stop], extra_body=IGNORE_EOS
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(stop)]


def test_seed_makes_sampling_repeatable(client: openai.OpenAI, model: str) -> None:
    def sample(seed: int) -> str:
        response = client.completions.create(
            model=model, prompt="Hello", max_tokens=16, temperature=1.0, seed=seed
        )
        return response.choices[0].text

    assert sample(7) == sample(7)


def test_logprobs(client: openai.OpenAI, model: str) -> None:
    response = client.completions.create(
        model=model, prompt="Hello", max_tokens=4, logprobs=2, extra_body=IGNORE_EOS
    )
    logprobs = response.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None
    assert len(logprobs.token_logprobs) == 4
    assert logprobs.top_logprobs is not None
    assert all(1 <= len(top) <= 3 for top in logprobs.top_logprobs)  # 2, plus the sampled one
    chat = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=3, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs
    assert content is not None and content.content is not None
    assert all(len(entry.top_logprobs) == 2 for entry in content.content)


def test_response_format_json_object(client: openai.OpenAI, model: str) -> None:
    response = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=16, response_format={"type": "json_object"}
    )
    # Structured output: even random weights must start a JSON object.
    assert (response.choices[0].message.content or "").lstrip().startswith("{")


def test_a_bad_request_is_a_400_with_an_openai_error(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=model, prompt="Hello", max_tokens=100_000)
    assert refused.value.status_code == 400
    body = refused.value.body
    assert isinstance(body, dict)
    assert body["code"] == 400
    assert body["type"] == "BadRequestError"
    assert body["param"] == "max_tokens"
    assert "max_tokens" in body["message"]


def test_a_wrong_type_is_a_400_naming_the_field(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=model, messages=MESSAGES, extra_body={"temperature": "hot"}
        )
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["param"] == "temperature"


def test_a_streaming_bad_request_is_a_400_too(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[], stream=True)


def test_an_unknown_model_is_a_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as refused:
        client.chat.completions.create(model="gpt-4", messages=MESSAGES, max_tokens=4)
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["param"] == "model"


def test_an_unknown_route_is_refused(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.NotFoundError) as refused:
        client.embeddings.create(model=model, input="hello")
    assert isinstance(refused.value.body, dict)
    message = refused.value.body["message"]
    assert "'/v1/embeddings' is not served" in message
    assert "/v1/chat/completions, /v1/completions, /v1/responses, /v1/models" in message


def test_a_wrong_api_key_is_refused(endpoint: EndpointProcess, model: str) -> None:
    stranger = openai.OpenAI(
        base_url=f"{endpoint.url}/openai/v1", api_key="wrong", max_retries=0, timeout=30
    )
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()


def test_the_worker_still_serves_after_the_errors(client: openai.OpenAI, model: str) -> None:
    response = client.completions.create(model=model, prompt="Hello", max_tokens=2)
    assert response.choices[0].finish_reason in {"length", "stop"}


def test_chat_renders_as_a_messages_job_does(
    endpoint: EndpointProcess, client: openai.OpenAI, model: str
) -> None:
    """The route and the worker's own ``messages`` input share the chat template: same
    prompt tokens, and (greedy) the same answer."""
    sampling = {"max_tokens": 16, "temperature": 0, "ignore_eos": True}
    job = submit(endpoint, {"messages": MESSAGES, "sampling_params": sampling, "stream": False})
    final = wait_final(endpoint, job)
    assert final["status"] == "COMPLETED", final
    native = final["output"][-1]
    response = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=16,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert response.usage is not None
    assert response.usage.prompt_tokens == native["usage"]["prompt_tokens"]
    assert response.choices[0].message.content == native["text"][0]


def test_a_client_that_goes_away_cancels_its_job(endpoint: EndpointProcess, model: str) -> None:
    reply = requests.post(
        f"{endpoint.url}/openai/v1/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": model, "prompt": "Hello", "max_tokens": 2000, "stream": True, **IGNORE_EOS},
        stream=True,
        timeout=JOB_TIMEOUT_S,
    )
    assert reply.status_code == 200
    next(reply.iter_lines())  # the stream has begun
    reply.close()
    endpoint.wait_for_log(r"job (sync-\S+): the client went away; the job is CANCELLED", 60)


# --- tools, the Responses API, LoRA adapters ---------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather forecast of a city.",
        # Structured output pins the arguments to the schema (vLLM's TOOL_STRICT_LEVEL=auto).
        "strict": True,
        "parameters": WEATHER_PARAMETERS,
    },
}
ASK = [{"role": "user", "content": "What will the weather be in Paris?"}]


def check_tool_call(name: str, arguments: str) -> None:
    """A call of the weather tool whose arguments validate against its JSON schema."""
    assert name == "get_weather"
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])


def test_required_tool_choice_calls_a_tool_with_valid_arguments(
    client: openai.OpenAI, model: str
) -> None:
    # "required" is enforced by structured output: even the random tiny model complies.
    response = client.chat.completions.create(
        model=model,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,  # one call: the grammar ends it, not max_tokens
        max_tokens=200,
    )
    [choice] = response.choices
    assert choice.finish_reason == "tool_calls", response
    [call] = choice.message.tool_calls or []
    check_tool_call(call.function.name, call.function.arguments)


def test_a_named_tool_choice_streams_a_valid_call(client: openai.OpenAI, model: str) -> None:
    stream = client.chat.completions.create(
        model=model,
        messages=ASK,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=200,
        stream=True,
    )
    check_tool_call(*streamed_tool_call(stream))


def test_responses_api_answers_streamed_and_not(client: openai.OpenAI, model: str) -> None:
    request: dict[str, Any] = {"model": model, "input": "Say hello.", "max_output_tokens": 12}
    response = client.responses.create(**request, temperature=0)
    assert response.object == "response"
    assert response.status in {"completed", "incomplete"}
    assert response.usage is not None and response.usage.output_tokens >= 1
    events = list(client.responses.create(**request, temperature=0, stream=True))
    assert events[0].type == "response.created"
    assert events[-1].type in {"response.completed", "response.incomplete"}
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == response.output_text  # greedy: the same text, streamed


def test_an_adapter_is_chosen_by_model_in_both_apis(
    client: openai.OpenAI, endpoint: EndpointProcess, model: str
) -> None:
    sampling = {"max_tokens": 16, "temperature": 0, "ignore_eos": True}
    native = {"prompt": "Once upon a time", "echo": False, "sampling_params": sampling}
    texts = {}
    for name in (model, "alpha"):
        final = wait_final(endpoint, submit(endpoint, {**native, "model": name}))
        completion = client.completions.create(
            model=name,
            prompt="Once upon a time",
            max_tokens=16,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert completion.choices[0].text == final["output"][-1]["text"][0]
        texts[name] = completion.choices[0].text
    assert texts["alpha"] != texts[model]  # the adapter answers, not the base model


# --- the Anthropic Messages API and tokenization, through the same route ---------------


@pytest.fixture(scope="module")
def claude(endpoint: EndpointProcess) -> anthropic.Anthropic:
    """The official ``anthropic`` client, with RunPod's key as its bearer token."""
    return anthropic.Anthropic(
        base_url=f"{endpoint.url}/openai",
        auth_token=API_KEY,
        max_retries=0,
        timeout=JOB_TIMEOUT_S,
    )


def test_anthropic_messages_answer_streamed_and_not(
    claude: anthropic.Anthropic, model: str
) -> None:
    request: dict[str, Any] = {
        "model": model,
        "system": "You are terse.",
        "messages": [{"role": "user", "content": "Name three rivers of Europe."}],
        "max_tokens": 12,
        # Greedy: the client (2.x) has no temperature argument; vLLM's request has one.
        "extra_body": {"temperature": 0},
    }
    message = claude.messages.create(**request)
    assert message.type == "message" and message.role == "assistant"
    [block] = message.content
    assert block.type == "text"
    if message.stop_reason == "max_tokens":  # the random model may end by itself
        assert message.usage.output_tokens == 12
    assert message.usage.input_tokens > 10  # the system prompt and the question, templated
    with claude.messages.stream(**request) as stream:
        events = list(stream)
        streamed = stream.get_final_message()
    assert events[0].type == "message_start" and events[-1].type == "message_stop"
    assert streamed.content[0].text == block.text  # type: ignore[union-attr]  # greedy: the same
    assert streamed.stop_reason == message.stop_reason
    counted = claude.messages.count_tokens(
        model=model, system=request["system"], messages=request["messages"]
    )  # the same conversation, templated alike
    assert counted.input_tokens == message.usage.input_tokens


def test_anthropic_errors_are_status_codes(claude: anthropic.Anthropic, model: str) -> None:
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=-3
        )
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(
            model="no-such-model", messages=[{"role": "user", "content": "Hi"}], max_tokens=3
        )


def curl(endpoint: EndpointProcess, route: str, body: dict[str, Any]) -> Any:
    """``curl`` as the docs show it (docs/openai.md): POST the JSON, read the JSON."""
    result = subprocess.run(
        [
            "curl", "-sS", "--fail-with-body", "--max-time", "60",
            f"{endpoint.url}/openai/v1{route}",
            "-H", f"Authorization: Bearer {API_KEY}", "-H", "Content-Type: application/json",
            "-d", json.dumps(body),
        ],
        capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def test_tokenize_and_detokenize_round_trip(endpoint: EndpointProcess, model: str) -> None:
    text = "Once upon a time"
    tokens = curl(endpoint, "/tokenize", {"model": model, "prompt": text})
    assert tokens["count"] == len(tokens["tokens"]) > 1
    assert tokens["max_model_len"] > 0
    back = curl(endpoint, "/detokenize", {"model": model, "tokens": tokens["tokens"]})
    assert back["prompt"].endswith(text)  # after the BOS token's text, if any
    messages = [{"role": "user", "content": text}]
    chat = curl(endpoint, "/tokenize", {"model": model, "messages": messages})
    assert chat["count"] > tokens["count"]  # the chat template's tokens too
