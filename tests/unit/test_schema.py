"""Job input validation: strict types, ranges, unknown keys named, one-line messages."""

from typing import Any

import pytest

from helpers import SEED_INPUT
from vllm_worker.errors import InvalidInputError
from vllm_worker.schema import JobInput, parse_job_input


def parse(raw: Any) -> JobInput:
    return parse_job_input(raw, max_n=16)


def rejected(raw: Any) -> str:
    with pytest.raises(InvalidInputError) as raised:
        parse(raw)
    message = str(raised.value)
    assert "\n" not in message
    return message


def with_params(**params: Any) -> dict[str, Any]:
    return {"prompt": "Hello there", "sampling_params": params}


def test_the_seed_request_is_accepted_with_its_values() -> None:
    job = parse(SEED_INPUT)
    assert job.prompt == SEED_INPUT["prompt"]
    params = job.sampling_params
    assert (params.max_tokens, params.n, params.temperature) == (1000, 1, 0.3)
    assert (params.presence_penalty, params.frequency_penalty) == (0.2, 0.7)
    assert (job.stream, job.echo, job.stream_mode) == (True, True, "cumulative")


def test_defaults_when_only_a_prompt_is_sent() -> None:
    job = parse({"prompt": "Hi"})
    assert job.sampling_params.max_tokens is None  # the worker applies DEFAULT_MAX_TOKENS
    assert job.sampling_params.n == 1
    assert job.sampling_params.stop is None


def test_stop_accepts_a_string_or_a_list() -> None:
    assert parse(with_params(stop="###")).sampling_params.stop == ["###"]
    assert parse(with_params(stop=["a", "b"])).sampling_params.stop == ["a", "b"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({}, "prompt: required (or 'messages' for a chat conversation)"),
        ({"prompt": ""}, "prompt: String should have at least 1 character"),
        ({"prompt": 42}, "prompt: Input should be a valid string (got 42)"),
        (
            with_params(temperature=3.5),
            "sampling_params.temperature: Input should be less than or equal to 2 (got 3.5)",
        ),
        (
            with_params(temperature="hot"),
            "sampling_params.temperature: Input should be a valid number",
        ),
        (
            with_params(temperature=float("nan")),
            "sampling_params.temperature: Input should be a finite number",
        ),
        (with_params(top_p=0), "sampling_params.top_p: Input should be greater than 0"),
        (
            with_params(top_k=-2),
            "sampling_params.top_k: Input should be greater than or equal to -1",
        ),
        (
            with_params(max_tokens=0),
            "sampling_params.max_tokens: Input should be greater than or equal to 1",
        ),
        (
            with_params(max_tokens="100"),
            "sampling_params.max_tokens: Input should be a valid integer",
        ),
        (with_params(seed="abc"), "sampling_params.seed: Input should be a valid integer"),
        (with_params(seed=-1), "sampling_params.seed: Input should be greater than or equal to 0"),
        (with_params(n=0), "sampling_params.n: Input should be greater than or equal to 1"),
        (
            with_params(presence_penalty=2.5),
            "sampling_params.presence_penalty: Input should be less than or equal to 2",
        ),
        (
            with_params(logprobs=21),
            "sampling_params.logprobs: Input should be less than or equal to 20",
        ),
        (
            with_params(stop=[1, 2]),
            "sampling_params.stop[0]: Input should be a valid string (got 1)",
        ),
        (with_params(stop=5), "sampling_params.stop: Input should be a valid list (got 5)"),
        (
            with_params(stop=[""]),
            "sampling_params.stop[0]: String should have at least 1 character",
        ),
        (with_params(stop=["x"] * 17), "sampling_params.stop: List should have at most 16 items"),
        (
            with_params(stop_token_ids=[-1]),
            "sampling_params.stop_token_ids[0]: Input should be greater than or equal to 0",
        ),
        (
            with_params(ignore_eos="yes"),
            "sampling_params.ignore_eos: Input should be a valid boolean",
        ),
        (
            with_params(min_tokens=10, max_tokens=5),
            "min_tokens (10) must be at most max_tokens (5)",
        ),
        (
            {"prompt": "x", "stream_mode": "words"},
            "stream_mode: Input should be 'cumulative' or 'delta'",
        ),
        (
            {"prompt": "x", "sampling_params": "hot"},
            "sampling_params: Input should be a valid dictionary",
        ),
    ],
)
def test_invalid_values_name_the_field_and_the_rule(raw: Any, expected: str) -> None:
    assert expected in rejected(raw)


def test_unknown_keys_are_named_never_dropped() -> None:
    message = rejected(with_params(max_token=100, best_of=2))
    assert "sampling_params.max_token: unknown field" in message
    assert "sampling_params.best_of: not supported: vLLM 0.32's engine has no best_of" in message
    assert "allowed: n, temperature" in message
    assert "max_tokens" in message
    top_level = rejected({"prompt": "x", "temprature": 0.5})
    assert "temprature: unknown field; allowed: prompt, messages, sampling_params" in top_level


def test_n_is_capped_by_max_n() -> None:
    assert parse_job_input(with_params(n=4), max_n=4).sampling_params.n == 4
    with pytest.raises(InvalidInputError, match=r"sampling_params.n: must be between 1 and 4"):
        parse_job_input(with_params(n=5), max_n=4)


@pytest.mark.parametrize("raw", [None, "a prompt", ["prompt"], 3])
def test_input_that_is_not_an_object(raw: Any) -> None:
    assert "input must be a JSON object" in rejected(raw)


def test_long_offending_values_are_shortened_in_the_message() -> None:
    message = rejected(with_params(temperature="x" * 5000))
    assert len(message) < 1000


# --- chat messages --------------------------------------------------------------------

USER = {"role": "user", "content": "Hello!"}
ASSISTANT = {"role": "assistant", "content": "Hi, how can I help?"}
SYSTEM = {"role": "system", "content": "Be brief."}


def chat(*messages: Any, **fields: Any) -> dict[str, Any]:
    return {"messages": list(messages), **fields}


@pytest.mark.parametrize(
    "messages",
    [[USER], [SYSTEM, USER], [USER, ASSISTANT, USER], [SYSTEM, USER, ASSISTANT, USER]],
)
def test_conversations_of_llama2s_shape_are_accepted(messages: list[dict[str, str]]) -> None:
    job = parse({"messages": messages, "sampling_params": {"max_tokens": 5, "n": 2}})
    assert job.prompt is None
    assert [message.model_dump() for message in job.messages or []] == messages
    assert (job.sampling_params.max_tokens, job.sampling_params.n) == (5, 2)


def test_echo_is_off_by_default_for_messages_and_on_for_a_prompt() -> None:
    assert parse(chat(USER)).echo is False
    assert parse(chat(USER, echo=True)).echo is True
    assert parse({"prompt": "Hi"}).echo is True
    assert parse({"prompt": "Hi", "echo": False}).echo is False
    assert parse({"prompt": "Hi", "messages": None}).echo is True  # null: no messages


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (chat(), "messages: List should have at least 1 item after validation, not 0"),
        ({"messages": "Hello"}, "messages: Input should be a valid list"),
        (
            chat(ASSISTANT, USER),
            "messages[0].role: must be 'user': after an optional system message, roles "
            "alternate user, assistant, user, ... (got 'assistant')",
        ),
        (chat(USER, USER), "messages[1].role: must be 'assistant': after an optional"),
        (
            chat(USER, ASSISTANT, SYSTEM, USER),
            "messages[2].role: must be 'user': a system message may only come first (got 'system')",
        ),
        (chat(SYSTEM, SYSTEM, USER), "messages[1].role: must be 'user': a system message"),
        (
            chat(USER, ASSISTANT),
            "messages[1].role: the last message must be from the 'user' (got 'assistant')",
        ),
        (chat(SYSTEM), "messages[0].role: the last message must be from the 'user' (got 'system')"),
        (
            chat(USER, {"role": "assistant", "content": ""}, USER),
            "messages[1].content: must not be empty or only whitespace",
        ),
        (
            chat({"role": "user", "content": " \n "}),
            "messages[0].content: must not be empty or only whitespace",
        ),
        (
            chat({"role": "tool", "content": "x"}),
            "messages[0].role: Input should be 'system', 'user' or 'assistant'",
        ),
        (
            chat({"role": "user", "content": "x", "name": "bob"}),
            "messages[0].name: unknown field; allowed: role, content",
        ),
        (chat({"role": "user"}), "messages[0].content: Field required"),
        (
            chat({"role": "user", "content": ["x"]}),
            "messages[0].content: Input should be a valid string",
        ),
        (chat("Hello"), "messages[0]: Input should be a valid dictionary"),
        (
            chat(USER, prompt="Hi"),
            "messages: send either 'prompt' or 'messages', not both",
        ),
    ],
)
def test_invalid_conversations_name_the_message_and_the_rule(raw: Any, expected: str) -> None:
    assert expected in rejected(raw)


def test_conversation_problems_come_with_the_others_in_one_line() -> None:
    message = rejected(chat(USER, ASSISTANT, sampling_params={"temperature": 9}))
    assert "messages[1].role: the last message must be from the 'user'" in message
    assert "sampling_params.temperature: Input should be less than or equal to 2" in message


# --- what an error shows, and limits vLLM checks too late (issue 5) ------------------


def test_string_values_are_described_not_repeated() -> None:
    # Errors are logged: a prompt sent in the wrong place must not reach the log.
    message = rejected(with_params(temperature="my private words", stop="ok"))
    assert "sampling_params.temperature: Input should be a valid number" in message
    assert "(got a string of 16 characters)" in message
    assert "private" not in message
    assert "(got 'hot')" in rejected(with_params(temperature="hot"))  # a short word is shown


def test_keys_that_are_not_field_names_are_not_repeated() -> None:
    message = rejected({"prompt": "x", "tell me about my secret": 1})
    assert "<a key of 23 characters>: unknown field" in message
    assert "secret" not in message


def test_many_problems_make_one_short_line() -> None:
    message = rejected({"prompt": "x", **{f"key{i}": i for i in range(1000)}})
    assert message.endswith("; and 995 more")
    assert len(message) < 1000


def test_n_above_one_needs_sampling() -> None:
    assert "sampling_params.n: must be 1 when temperature is 0" in rejected(
        with_params(n=2, temperature=0)
    )
    assert parse(with_params(n=2, temperature=0.5)).sampling_params.n == 2


def test_top_k_fits_the_engine_s_integers() -> None:
    assert parse(with_params(top_k=2**31 - 1)).sampling_params.top_k == 2**31 - 1
    assert "sampling_params.top_k: Input should be less than or equal to 2147483647" in rejected(
        with_params(top_k=2**70)
    )


@pytest.mark.parametrize(
    "field", ["best_of", "use_beam_search", "length_penalty", "early_stopping"]
)
def test_fields_vllm_has_but_this_worker_refuses_say_why(field: str) -> None:
    assert f"sampling_params.{field}: not supported: " in rejected(with_params(**{field: 2}))


def test_vllms_token_fields_are_taken_with_its_names() -> None:
    params = parse(
        with_params(
            logit_bias={"12": -100, "7": 2.5},
            allowed_token_ids=[1, 2, 3],
            prompt_logprobs=0,
            truncate_prompt_tokens=8,
        )
    ).sampling_params
    assert params.logit_bias == {"12": -100.0, "7": 2.5}
    assert (params.allowed_token_ids, params.prompt_logprobs) == ([1, 2, 3], 0)
    assert params.truncate_prompt_tokens == 8


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"logit_bias": {"x": 1}}, "sampling_params.logit_bias: each key must be a token id"),
        ({"logit_bias": {"5": 101}}, 'sampling_params.logit_bias["5"]: Input should be less'),
        ({"logit_bias": {}}, "sampling_params.logit_bias: Dictionary should have at least 1"),
        ({"allowed_token_ids": []}, "sampling_params.allowed_token_ids: List should have at"),
        ({"allowed_token_ids": [-1]}, "sampling_params.allowed_token_ids[0]: Input should be"),
        ({"prompt_logprobs": 21}, "sampling_params.prompt_logprobs: Input should be less than"),
        ({"truncate_prompt_tokens": 0}, "sampling_params.truncate_prompt_tokens: Input should"),
    ],
)
def test_token_fields_out_of_range_are_named(params: dict[str, Any], expected: str) -> None:
    assert rejected(with_params(**params)).startswith(expected)


@pytest.mark.parametrize(
    ("form", "value"),
    [
        ("json", {"type": "object", "properties": {"city": {"type": "string"}}}),
        ("json", '{"type": "integer"}'),  # its JSON text, as vLLM takes it too
        ("regex", r"[0-9]{3}"),
        ("choice", ["yes", "no"]),
        ("grammar", 'root ::= "yes" | "no"'),
        ("json_object", True),
        ("structural_tag", '{"type": "structural_tag"}'),
    ],
)
def test_each_structured_output_form_is_taken(form: str, value: Any) -> None:
    wanted = parse(with_params(structured_outputs={form: value})).sampling_params
    assert wanted.structured_outputs is not None
    assert wanted.structured_outputs.form == form
    assert wanted.structured_outputs.form_value(form) == value


@pytest.mark.parametrize(
    ("structured", "expected"),
    [
        ({}, "sampling_params.structured_outputs: set exactly one of json, regex, choice, "),
        ({"regex": "a", "choice": ["a"]}, "(got regex, choice)"),
        ({"json": "{nope"}, "sampling_params.structured_outputs.json: not valid JSON"),
        ({"json": 7}, "structured_outputs.json: must be a JSON schema: an object, or its JSON"),
        ({"choice": []}, "sampling_params.structured_outputs.choice: List should have at least"),
        ({"grammar": "  "}, "structured_outputs.grammar: must not be empty or only whitespace"),
        ({"json_object": False}, "sampling_params.structured_outputs.json_object: Input should"),
        ({"regexp": "a"}, "structured_outputs.regexp: unknown field; allowed: json, regex, "),
        (
            {"regex": "a", "whitespace_pattern": " "},
            "structured_outputs.whitespace_pattern: not supported: vLLM 0.32 takes it from",
        ),
    ],
)
def test_a_structured_output_of_the_wrong_shape_is_named(
    structured: dict[str, Any], expected: str
) -> None:
    assert expected in rejected(with_params(structured_outputs=structured))
