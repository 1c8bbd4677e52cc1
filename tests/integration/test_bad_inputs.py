"""Bad input on the real engine: every malformed job fails alone, in one clear line.

A property-based fuzz (hypothesis, derandomized) sends hundreds of malformed inputs
through the real handler and engine: each must end as a job error naming the problem,
without a traceback or the prompt's text, and the engine must serve the next job. A
table then checks each input limit's message.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import collect
from vllm_worker.engine import Engine
from vllm_worker.settings import Settings
from vllm_worker.worker import Handler

pytestmark = pytest.mark.engine

Run = Callable[..., Any]

# Every prompt sent here holds this text; no error message or log line may.
MARKER = "zebracorn quartz lullaby"
PROMPT = f"Tell me about the {MARKER} please."
VALID_SAMPLING = {"max_tokens": 4, "temperature": 0.5, "n": 2, "stop": ["\n\n"]}
VOCAB_SIZE = 1024  # the tiny model's embedding rows (tiny_model.py)

Allowed = Callable[[Any], bool]
FLOAT_RANGES: dict[str, Allowed] = {
    "temperature": lambda value: 0 <= value <= 2,
    "top_p": lambda value: 0 < value <= 1,
    "min_p": lambda value: 0 <= value <= 1,
    "presence_penalty": lambda value: -2 <= value <= 2,
    "frequency_penalty": lambda value: -2 <= value <= 2,
    "repetition_penalty": lambda value: 0 < value <= 10,
}
INT_RANGES: dict[str, Allowed] = {
    "n": lambda value: 1 <= value <= 16,  # MAX_N
    "top_k": lambda value: -1 <= value <= 2**31 - 1,
    "max_tokens": lambda value: value >= 1,
    "min_tokens": lambda value: value >= 0,
    "logprobs": lambda value: 0 <= value <= 20,
    "seed": lambda value: 0 <= value <= 2**63 - 1,
}
BOOL_FIELDS = [
    "ignore_eos",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
]
NOT_A_NUMBER = st.one_of(
    st.text(max_size=12), st.booleans(), st.none(), st.lists(st.integers(), max_size=2), st.just({})
)


def _bad_float(allowed: Allowed) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from([float("nan"), float("inf"), float("-inf")]),
        st.floats(-1e6, 1e6).filter(lambda value: not allowed(value)),
        st.floats(allow_nan=False, allow_infinity=False).filter(lambda value: not allowed(value)),
        NOT_A_NUMBER,  # None too: these fields are not optional
    )


def _bad_int(allowed: Allowed) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.integers(-(2**80), 2**80).filter(lambda value: not allowed(value)),
        st.integers(-100, 100).filter(lambda value: not allowed(value)),
        st.floats(),  # even 1.0: types are strict
        NOT_A_NUMBER.filter(lambda value: value is not None),  # None: the default
    )


def _bad_sampling_value() -> st.SearchStrategy[tuple[str, Any]]:
    """(field, a value our schema refuses for it)."""
    floats = [st.tuples(st.just(f), _bad_float(allowed)) for f, allowed in FLOAT_RANGES.items()]
    ints = [st.tuples(st.just(f), _bad_int(allowed)) for f, allowed in INT_RANGES.items()]
    bools = [
        st.tuples(st.sampled_from(BOOL_FIELDS), st.one_of(st.integers(), st.text(), st.none()))
    ]
    texts = st.text(min_size=1, max_size=8)
    lists = [
        st.tuples(
            st.sampled_from(["stop", "bad_words"]),
            st.one_of(
                st.lists(texts, min_size=1, max_size=3).map(lambda words: [*words, ""]),
                st.lists(st.integers(), min_size=1, max_size=3),
                st.integers(),
                st.just({"a": 1}),
            ),
        ),
        st.tuples(st.just("stop"), st.lists(texts, min_size=17, max_size=20)),
        st.tuples(st.just("bad_words"), st.lists(texts, min_size=65, max_size=70)),
        st.tuples(
            st.just("stop_token_ids"),
            st.one_of(
                st.lists(st.integers(max_value=-1), min_size=1, max_size=3),
                st.lists(st.integers(0, 1000), min_size=17, max_size=20),
                st.lists(texts, min_size=1, max_size=2),
                st.integers(),
            ),
        ),
    ]
    return st.one_of(*floats, *ints, *bools, *lists)


def _engine_refused() -> st.SearchStrategy[dict[str, Any]]:
    """Sampling params our schema accepts but the engine or the context refuses."""
    return st.one_of(
        # Token ids outside the vocabulary: only the engine knows its vocabulary.
        st.lists(st.integers(VOCAB_SIZE, 2**70), min_size=1, max_size=3).map(
            lambda ids: {"stop_token_ids": ids}
        ),
        # Words that tokenize to nothing.
        st.lists(st.sampled_from([" ", "  ", "\t", " \n"]), min_size=1, max_size=3).map(
            lambda words: {"bad_words": words}
        ),
        # More tokens required than fit after the prompt (max_tokens unset: DEFAULT_MAX_TOKENS).
        st.integers(600, 2**40).map(lambda tokens: {"min_tokens": tokens}),
    )


def _malformed_input() -> st.SearchStrategy[tuple[str, Any]]:
    """(kind, a job input that must fail)."""
    identifier = st.from_regex(r"[a-z_]{1,12}", fullmatch=True)
    sampling_fields = {"best_of", "use_beam_search", "length_penalty", "logit_bias"}
    unknown_sampling = st.one_of(
        identifier.filter(lambda key: key not in _sampling_fields()),
        st.sampled_from(sorted(sampling_fields)),
    )
    return st.one_of(
        st.tuples(
            st.just("sampling value"),
            _bad_sampling_value().map(
                lambda bad: {
                    "prompt": PROMPT,
                    "sampling_params": {**VALID_SAMPLING, bad[0]: bad[1]},
                }
            ),
        ),
        st.tuples(
            st.just("engine refused"),
            _engine_refused().map(lambda params: {"prompt": PROMPT, "sampling_params": params}),
        ),
        st.tuples(
            st.just("unknown key"),
            st.one_of(
                st.tuples(unknown_sampling, st.integers()).map(
                    lambda kv: {"prompt": PROMPT, "sampling_params": {kv[0]: kv[1]}}
                ),
                st.tuples(identifier.filter(lambda key: key not in _top_fields()), st.none()).map(
                    lambda kv: {"prompt": PROMPT, kv[0]: kv[1]}
                ),
            ),
        ),
        st.tuples(st.just("top level"), _bad_top_level()),
        st.tuples(
            st.just("cross field"),
            st.one_of(
                st.integers(2, 16).map(
                    lambda n: {"prompt": PROMPT, "sampling_params": {"n": n, "temperature": 0}}
                ),
                st.tuples(st.integers(1, 50), st.integers(1, 50)).map(
                    lambda pair: {
                        "prompt": PROMPT,
                        "sampling_params": {"max_tokens": pair[0], "min_tokens": pair[0] + pair[1]},
                    }
                ),
            ),
        ),
        st.tuples(
            st.just("too long"),
            st.integers(600, 1100).map(lambda words: {"prompt": f"{PROMPT} " + "story " * words}),
        ),
    )


def _bad_top_level() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.one_of(
            st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2)
        ),
        st.just({}),
        st.one_of(st.integers(), st.none(), st.just(""), st.lists(st.text(), max_size=2)).map(
            lambda prompt: {"prompt": prompt}
        ),
        st.sampled_from(["\ud800", "\udfff"]).map(lambda s: {"prompt": PROMPT + s}),
        st.one_of(st.integers(), st.text(max_size=3), st.none()).map(
            lambda value: {"prompt": PROMPT, "stream": value}
        ),
        st.text(max_size=8)
        .filter(lambda m: m not in ("cumulative", "delta"))
        .map(lambda mode: {"prompt": PROMPT, "stream_mode": mode}),
        st.one_of(st.integers(), st.text(max_size=3), st.lists(st.integers(), max_size=2)).map(
            lambda params: {"prompt": PROMPT, "sampling_params": params}
        ),
        st.just({"prompt": PROMPT, "messages": [{"role": "user", "content": PROMPT}]}),
        st.sampled_from(
            [
                [],
                [{"role": "assistant", "content": PROMPT}],
                [{"role": "user", "content": PROMPT}, {"role": "user", "content": PROMPT}],
                [{"role": "user", "content": 5}],
                [{"role": "user"}],
                [{"role": "robot", "content": PROMPT}],
                [{"role": "user", "content": PROMPT, "name": "x"}],
                PROMPT,
            ]
        ).map(lambda messages: {"messages": messages}),
    )


def _sampling_fields() -> set[str]:
    from vllm_worker.schema import SamplingParamsInput

    return set(SamplingParamsInput.model_fields)


def _top_fields() -> set[str]:
    from vllm_worker.schema import JobInput

    return set(JobInput.model_fields)


def assert_one_line_input_error(chunks: list[Any], raw: Any) -> str:
    assert len(chunks) == 1, f"{raw!r:.200}: {chunks!r:.500}"
    assert set(chunks[0]) == {"error"}, chunks
    error = chunks[0]["error"]
    assert isinstance(error, str)
    assert error.startswith("invalid_input: "), f"{raw!r:.200}: {error}"
    assert "\n" not in error
    assert "Traceback" not in error
    assert MARKER not in error and "zebracorn" not in error
    assert len(error) < 2000
    return error


def assert_engine_serves(run: Run, handler: Handler, engine: Engine) -> None:
    final = run(collect(handler, {"prompt": PROMPT, "sampling_params": {"max_tokens": 5}}))[-1]
    assert final["usage"]["completion_tokens"] >= 1, final
    assert not engine.async_llm.errored
    assert engine.async_llm.get_num_unfinished_requests() == 0


def test_fuzzed_malformed_inputs_each_fail_alone_in_one_line(
    run: Run, handler: Handler, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    assert engine.async_llm.model_config.get_vocab_size() == VOCAB_SIZE
    kinds: Counter[str] = Counter()
    tried: set[str] = set()

    @settings(
        max_examples=700,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(_malformed_input())
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
    assert not [record for record in caplog.records if "zebracorn" in record.getMessage()]
    assert_engine_serves(run, handler, engine)


def _limit_cases(settings: Settings) -> list[tuple[str, dict[str, Any], str]]:
    """(name, job input, the error's expected text) for each input limit."""
    long_chat = [{"role": "user", "content": "story " * 600}]
    return [
        (
            "prompt tokens",
            {"prompt": "story " * 600},
            "prompt: the prompt has 2401 tokens, but the model's "
            "context (MAX_MODEL_LEN) is 512 tokens: at most 511 prompt tokens fit",
        ),
        ("chat tokens", {"messages": long_chat}, "messages: the rendered conversation has "),
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
            "sampling_params.presence_penalty: "
            "Input should be greater than or equal to -2 (got -2.5)",
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
            f"{settings.default_max_tokens} tokens this job may generate",
        ),
        (
            "min_tokens room",
            _params(min_tokens=510, max_tokens=1000),
            "sampling_params.min_tokens: 510 is more than the ",
        ),
    ]


def _params(**sampling: Any) -> dict[str, Any]:
    return {"prompt": PROMPT, "sampling_params": sampling}


def test_each_input_limit_fails_with_its_rule(
    run: Run, handler: Handler, engine: Engine, settings: Settings
) -> None:
    for name, raw, expected in _limit_cases(settings):
        error = assert_one_line_input_error(run(collect(handler, raw)), raw)
        assert expected in error, f"{name}: {error}"
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
