"""Bad input on the real engine: every malformed job fails alone, in one clear line.

A property-based fuzz (hypothesis, derandomized) sends hundreds of malformed inputs
through the real handler and engine: each must end as a job error naming the problem,
without a traceback or the prompt's text, and the engine must serve the next job. A
table then checks each input limit's message. Jobs for the OpenAI routes, which vLLM's
own OpenAI layer validates, are fuzzed too: refused with a 4xx error object, never a 5xx.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bad_inputs import MARKER, PROMPT, VOCAB_SIZE, check_input_error, fuzz, malformed_input
from helpers import TINY_ENGINE_ENV, collect
from vllm_worker.engine import Engine
from vllm_worker.engine_types import Handler
from vllm_worker.errors import INTERNAL_ERROR_MESSAGE
from vllm_worker.openai_input import CHAT, COMPLETIONS, RESPONSES, served_model_name
from vllm_worker.settings import Settings
from vllm_worker.startup import build

Run = Callable[..., Any]


def assert_one_line_input_error(chunks: list[Any], raw: Any) -> str:
    assert len(chunks) == 1, f"{raw!r:.200}: {chunks!r:.500}"
    assert set(chunks[0]) == {"error"}, chunks
    return check_input_error(chunks[0]["error"], raw)


def assert_engine_serves(run: Run, handler: Handler, engine: Engine) -> None:
    final = run(collect(handler, {"prompt": PROMPT, "sampling_params": {"max_tokens": 5}}))[-1]
    assert final["usage"]["completion_tokens"] >= 1, final
    assert not engine.client.errored
    assert engine.client.get_num_unfinished_requests() == 0


def test_fuzzed_malformed_inputs_each_fail_alone_in_one_line(
    run: Run, handler: Handler, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    assert engine.client.model_config.get_vocab_size() == VOCAB_SIZE
    kinds: Counter[str] = Counter()
    tried: set[str] = set()

    @fuzz(700)
    @given(malformed_input())
    def one(case: tuple[str, Any]) -> None:
        kind, raw = case
        assert_one_line_input_error(run(collect(handler, raw)), raw)
        kinds[kind] += 1
        tried.add(json.dumps(raw, sort_keys=True, default=repr))

    with caplog.at_level(logging.INFO):
        one()
    print(f"\nmalformed inputs tried: {len(tried)} distinct; by kind: {dict(kinds)}")
    assert len(tried) >= 500
    assert all(kinds[kind] >= 10 for kind in ("engine refused", "cross field", "too long"))
    assert not [record for record in caplog.records if MARKER in record.getMessage()]
    assert_engine_serves(run, handler, engine)


def _params(**sampling: Any) -> dict[str, Any]:
    return {"prompt": PROMPT, "sampling_params": sampling}


LONG_CHAT = [{"role": "user", "content": "story " * 600}]
# (name, job input, the error's expected text) for each input limit.
LIMIT_CASES = [
    (
        "prompt tokens",
        {"prompt": "story " * 600},
        "prompt: the prompt has 2401 tokens, but the model's "
        "context (MAX_MODEL_LEN) is 512 tokens: at most 511 prompt tokens fit",
    ),
    ("chat tokens", {"messages": LONG_CHAT}, "messages: the rendered conversation has "),
    ("n", _params(n=17), "sampling_params.n: must be between 1 and 16 (MAX_N), got 17"),
    ("best_of", _params(best_of=2), "sampling_params.best_of: not supported: vLLM 0.32"),
    (
        "stop count",
        _params(stop=["a"] * 17),
        "sampling_params.stop: List should have at most 16",
    ),
    (
        "stop empty",
        _params(stop=["a", ""]),
        "sampling_params.stop[1]: String should have at least 1 character",
    ),
    ("stop type", _params(stop=[1]), "sampling_params.stop[0]: Input should be a valid string"),
    (
        "stop ids",
        _params(stop_token_ids=[VOCAB_SIZE]),
        "sampling_params.stop_token_ids: "
        "token_id(s) [1024] in stop_token_ids contain out-of-vocab token ids",
    ),
    (
        "bad words",
        _params(bad_words=[" "]),
        "sampling_params.bad_words: bad_words entries must tokenize to at least one token",
    ),
    (
        "wrong type",
        _params(max_tokens="100"),
        "sampling_params.max_tokens: Input should be a valid integer (got '100')",
    ),
    (
        "nan",
        _params(temperature=float("nan")),
        "sampling_params.temperature: Input should be a finite number (got nan)",
    ),
    (
        "inf",
        _params(top_p=float("inf")),
        "sampling_params.top_p: Input should be a finite number (got inf)",
    ),
    (
        "negative max_tokens",
        _params(max_tokens=-1),
        "sampling_params.max_tokens: Input should be greater than or equal to 1 (got -1)",
    ),
    (
        "negative penalty",
        _params(presence_penalty=-2.5),
        "sampling_params.presence_penalty: Input should be greater than or equal to -2 (got -2.5)",
    ),
    (
        "negative seed",
        _params(seed=-1),
        "sampling_params.seed: Input should be greater than or equal to 0 (got -1)",
    ),
    (
        "top_k",
        _params(top_k=2**70),
        "sampling_params.top_k: Input should be less than or equal to 2147483647",
    ),
    (
        "greedy n",
        _params(n=2, temperature=0),
        "sampling_params.n: must be 1 when temperature is 0",
    ),
    (
        "min_tokens",
        _params(min_tokens=100),
        "sampling_params.min_tokens: 100 is more than the "
        f"{TINY_ENGINE_ENV['DEFAULT_MAX_TOKENS']} tokens this job may generate",
    ),
    (
        "min_tokens room",
        _params(min_tokens=510, max_tokens=1000),
        "sampling_params.min_tokens: 510 is more than the ",
    ),
]


@pytest.mark.parametrize(
    ("raw", "expected"), [case[1:] for case in LIMIT_CASES], ids=[case[0] for case in LIMIT_CASES]
)
def test_each_input_limit_fails_with_its_rule(
    run: Run, handler: Handler, engine: Engine, raw: dict[str, Any], expected: str
) -> None:
    error = assert_one_line_input_error(run(collect(handler, raw)), raw)
    assert expected in error
    assert_engine_serves(run, handler, engine)


def test_an_input_too_large_to_read_is_refused_before_it_is_read(
    run: Run, handler: Handler, engine: Engine
) -> None:
    # The tiny tokenizer's longest token has 14 characters: 512 x 14 fit, one more does not.
    limit = engine.max_model_len * 14
    fits = run(collect(handler, {"prompt": "x" * (limit - 6 - 1)}))  # the object and key count
    assert "MAX_INPUT_CHARS" not in json.dumps(fits)
    for size in (limit + 1, 50 * 2**20):  # one too many, and 50 MB
        error = assert_one_line_input_error(run(collect(handler, {"prompt": "x" * size})), size)
        assert error == (
            f"invalid_input: input: holds more than {limit} characters of text (keys and values "
            "together), the most a job may send (MAX_INPUT_CHARS)"
        )
    assert_engine_serves(run, handler, engine)


@pytest.fixture(scope="module")
def openai_handler(engine: Engine, settings: Settings) -> Handler:
    """The handler with the OpenAI routes too, as the worker builds it."""
    return build(engine, settings).handler


def test_no_job_can_choose_a_template_or_read_a_file(
    run: Run, engine: Engine, settings: Settings, openai_handler: Handler, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("c2-file-content-that-must-not-leak")
    handler = openai_handler
    user = {"role": "user", "content": PROMPT}
    image = {"type": "image_url", "image_url": {"url": f"file://{secret}"}}
    template = "{{ 'anything' }}"

    def openai(route: str, **body: Any) -> dict[str, Any]:
        body = {"model": served_model_name(settings), "max_tokens": 4, **body}
        return {"openai_route": route, "openai_input": body}

    refused = [
        # The worker's own input has no such fields, and content is text only.
        ({"prompt": PROMPT, "chat_template": template}, "chat_template: unknown field"),
        ({"messages": [{"role": "user", "content": [image]}]}, "Input should be a valid string"),
        # vLLM's OpenAI layer, as the worker builds it, trusts no template from a request.
        (openai(CHAT, messages=[user], chat_template=template), "untrusted chat template"),
        (
            openai(CHAT, messages=[user], chat_template_kwargs={"chat_template": template}),
            "untrusted chat template",
        ),
        (openai(CHAT, messages=[{"role": "user", "content": [image]}]), ""),
        (openai(COMPLETIONS, prompt=PROMPT, prompt_embeds="AAAA"), ""),
    ]
    for job_input, expected in refused:
        chunks = run(collect(handler, job_input))
        assert len(chunks) == 1 and set(chunks[0]) == {"error"}, f"{job_input}: {chunks}"
        error = chunks[0]["error"]
        assert expected in error, error
        assert "c2-file-content" not in error and MARKER not in error
    assert_engine_serves(run, handler, engine)


def test_an_internal_failure_is_a_stable_message_and_a_logged_traceback(
    run: Run,
    handler: Handler,
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken_tokenizer(text: str) -> list[int]:
        raise RuntimeError("injected tokenizer fault")

    monkeypatch.setattr(engine, "tokenize", broken_tokenizer)
    with caplog.at_level(logging.INFO):
        chunks = run(collect(handler, {"prompt": PROMPT}))
    assert chunks == [{"error": f"internal_error: {INTERNAL_ERROR_MESSAGE}"}]
    assert INTERNAL_ERROR_MESSAGE == (
        "Internal error in the worker; the details are in the worker log."
    )
    (record,) = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert "failed with an internal error" in record.getMessage()
    assert record.exc_info is not None
    assert "injected tokenizer fault" in caplog.text  # the traceback, in the log only
    assert "Traceback" in caplog.text
    monkeypatch.undo()
    assert_engine_serves(run, handler, engine)


def test_openai_route_errors_repeat_no_text(
    run: Run, engine: Engine, settings: Settings, openai_handler: Handler
) -> None:
    body = {"model": served_model_name(settings), "prompt": PROMPT, "max_tokens": 4}
    for bad in ({"bad_words": [MARKER, " "]}, {"stop_token_ids": [VOCAB_SIZE]}, {"logprobs": 50}):
        job = {"openai_route": COMPLETIONS, "openai_input": {**body, **bad}}
        (chunk,) = run(collect(openai_handler, job))
        error = json.loads(chunk["error"])["error"]
        assert error["code"] == 400 and error["param"] == next(iter(bad)), error
        assert MARKER not in error["message"] and "value=" not in error["message"], error
    # Beyond 64 bits, vLLM itself fails with an empty message (and leaks the request).
    job = {"openai_route": COMPLETIONS, "openai_input": {**body, "top_k": 2**70}}
    (chunk,) = run(collect(openai_handler, job))
    error = json.loads(chunk["error"])["error"]
    assert error["code"] == 400, error
    assert error["message"] == (
        "invalid_input: openai_input.top_k: an integer beyond 64 bits; integers must be between "
        "-2^63 and 2^64-1"
    )
    assert_engine_serves(run, openai_handler, engine)


OPENAI_FIELDS = [
    "prompt", "temperature", "top_p", "top_k", "min_p", "n", "max_tokens", "stop", "seed",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs", "echo",
    "stop_token_ids", "bad_words", "min_tokens", "ignore_eos", "logit_bias", "stream",
    "stream_options", "response_format", "user", "suffix", "include_stop_str_in_output",
    "skip_special_tokens", "truncate_prompt_tokens", "allowed_token_ids", "priority",
]  # fmt: skip
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=5,
)


def test_fuzzed_openai_requests_never_fail_inside_the_worker(
    run: Run, engine: Engine, settings: Settings, openai_handler: Handler
) -> None:
    """Whatever a completions request holds, vLLM's OpenAI layer answers or refuses it
    with a 4xx error object; never a 5xx, never an error inside a completed stream."""
    base = {"model": served_model_name(settings), "prompt": PROMPT, "max_tokens": 4}
    codes: Counter[int] = Counter()

    @fuzz(300)
    @given(st.dictionaries(st.sampled_from(OPENAI_FIELDS), JSON_VALUES, min_size=1, max_size=2))
    def one(fields: dict[str, Any]) -> None:
        job = {"openai_route": COMPLETIONS, "openai_input": {**base, **fields}}
        outputs = run(collect(openai_handler, job))
        last = outputs[-1]
        if isinstance(last, dict) and set(last) == {"error"}:
            error = json.loads(last["error"])["error"]
            assert 400 <= error["code"] < 500, f"{fields!r:.300}: {error}"
            assert "\n" not in error["message"] and MARKER not in error["message"]
            codes[error["code"]] += 1
        else:
            assert '"error"' not in json.dumps(outputs), f"{fields!r:.300}: {outputs!r:.500}"
            codes[200] += 1

    one()
    print(f"\nfuzzed OpenAI requests by answer: {dict(codes)}")
    assert codes[200] >= 10 and sum(codes.values()) - codes[200] >= 100
    assert_engine_serves(run, openai_handler, engine)


TOOL = {
    "type": "function",
    "function": {"name": "f", "parameters": {"type": "object", "properties": {}}},
}
NEW_FIELDS = {
    # chat completions: tool calling, and `model` naming an adapter or not
    CHAT: ["model", "tools", "tool_choice", "parallel_tool_calls", "max_tokens", "stream"],
    # the Responses API
    RESPONSES: [
        "model", "input", "instructions", "tools", "tool_choice", "max_output_tokens",
        "stream", "text", "reasoning", "previous_response_id", "store", "include",
    ],
}  # fmt: skip
FIELD_VALUES = JSON_VALUES | st.sampled_from(
    ["alpha", "required", "auto", [TOOL], [{"type": "web_search"}], {"type": "function"}]
)


@pytest.mark.parametrize("tool_calling", [False, True], ids=["no tool parser", "hermes"])
def test_fuzzed_tool_and_responses_requests_never_fail_inside_the_worker(
    run: Run, engine: Engine, settings: Settings, tool_calling: bool
) -> None:
    """The fields of tool calling and of the Responses API, fuzzed on a worker without a
    tool parser and on one with vLLM's hermes parser: a 4xx error object or an answer."""
    if tool_calling:
        settings = settings.model_copy(
            update={"tool_call_parser": "hermes", "enable_auto_tool_choice": True}
        )
    handler = build(engine, settings).handler
    bases = {
        CHAT: {
            "model": served_model_name(settings),
            "messages": [{"role": "user", "content": PROMPT}],
        },
        RESPONSES: {"model": served_model_name(settings), "input": PROMPT},
    }
    codes: Counter[int] = Counter()

    @fuzz(150)
    @given(
        st.sampled_from([CHAT, RESPONSES]).flatmap(
            lambda route: st.tuples(
                st.just(route),
                st.dictionaries(
                    st.sampled_from(NEW_FIELDS[route]), FIELD_VALUES, min_size=1, max_size=3
                ),
            )
        )
    )
    def one(case: tuple[str, dict[str, Any]]) -> None:
        route, fields = case
        limit = {"max_tokens": 4} if route == CHAT else {"max_output_tokens": 4}
        body = {**bases[route], **limit, **fields}
        outputs = run(collect(handler, {"openai_route": route, "openai_input": body}))
        last = outputs[-1]
        if isinstance(last, dict) and set(last) == {"error"}:
            error = json.loads(last["error"])["error"]
            assert 400 <= error["code"] < 500, f"{route} {fields!r:.300}: {error}"
            assert "\n" not in error["message"] and MARKER not in error["message"]
            codes[error["code"]] += 1
        else:
            codes[200] += 1

    one()
    print(f"\nfuzzed chat and Responses requests by answer: {dict(codes)}")
    assert codes[200] >= 5 and sum(codes.values()) - codes[200] >= 50
    assert_engine_serves(run, handler, engine)
