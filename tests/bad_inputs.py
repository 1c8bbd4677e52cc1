"""Malformed job inputs for the fuzz tests: hypothesis strategies and the error check.

Every input a strategy here draws must fail: a wrong type, a value out of its range, an
unknown key, a rule between fields, or a value only the engine or the context refuses.
Every prompt holds ``MARKER``, which no error (and no log line) may repeat.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

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
    "prompt_logprobs": lambda value: 0 <= value <= 20,
    "truncate_prompt_tokens": lambda value: value >= 1,
}
BOOL_FIELDS = [
    "ignore_eos",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
]
NOT_A_NUMBER: st.SearchStrategy[Any] = st.one_of(
    st.text(max_size=12), st.booleans(), st.none(), st.lists(st.integers(), max_size=2), st.just({})
)


def fuzz(max_examples: int) -> settings:
    """Hypothesis settings for a fuzz on the real engine: the same examples on every run
    (they change only with the test's source), no per-example deadline on a loaded machine."""
    return settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
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
        st.tuples(
            st.just("allowed_token_ids"),
            st.one_of(
                st.just([]),
                st.lists(st.integers(max_value=-1), min_size=1, max_size=3),
                st.lists(texts, min_size=1, max_size=2),
            ),
        ),
        st.tuples(
            st.just("logit_bias"),
            st.one_of(
                st.just({}),
                st.dictionaries(
                    st.from_regex(r"[a-z]{1,5}", fullmatch=True), st.just(1.0), min_size=1
                ),
                st.floats(101, 1e9).map(lambda bias: {"1": bias}),
                st.sampled_from([{"1": "up"}, {"1": float("nan")}, [1, 2], {"-1": 5.0}]),
            ),
        ),
        st.tuples(st.just("structured_outputs"), _bad_structured_outputs()),
    ]
    return st.one_of(*floats, *ints, *bools, *lists)


def _bad_structured_outputs() -> st.SearchStrategy[Any]:
    """What our schema refuses: not exactly one form, a form of the wrong shape."""
    return st.one_of(
        st.sampled_from(
            [
                {},
                {"regex": "a", "choice": ["a"]},
                {"json": "{not json"},
                {"json": "  "},
                {"json": 3},
                {"choice": []},
                {"choice": [""]},
                {"json_object": False},
                {"grammar": " "},
                {"regex": 5},
                {"structural_tag": ""},
                {"regex": "a", "disable_any_whitespace": True},
                "a regex",
            ]
        ),
        st.dictionaries(
            st.sampled_from(["json", "regex", "choice", "grammar", "json_object"]),
            st.just("x"),
            min_size=2,
        ),
    )


def _engine_refused() -> st.SearchStrategy[dict[str, Any]]:
    """Sampling params our schema accepts but the engine or the context refuses."""
    return st.one_of(
        # Token ids outside the vocabulary: only the engine knows its vocabulary.
        st.lists(st.integers(VOCAB_SIZE, 2**70), min_size=1, max_size=3).map(
            lambda ids: {"stop_token_ids": ids}
        ),
        st.lists(st.integers(VOCAB_SIZE, 2**40), min_size=1, max_size=3).map(
            lambda ids: {"allowed_token_ids": ids}
        ),
        st.integers(VOCAB_SIZE, 10**9).map(lambda id_: {"logit_bias": {str(id_): 1.0}}),
        # Constraints vLLM's structured output backend cannot compile (its frontend says so).
        st.sampled_from(
            [
                {"regex": "("},
                {"regex": "a{2,1}"},
                {"json": {"type": 5}},
                {"json": '{"type": "object", "properties": 3}'},
                {"grammar": "root ::= ("},
                {"grammar": "this is no grammar"},
            ]
        ).map(lambda form: {"structured_outputs": form}),
        # Words that tokenize to nothing.
        st.lists(st.sampled_from([" ", "  ", "\t", " \n"]), min_size=1, max_size=3).map(
            lambda words: {"bad_words": words}
        ),
        # More tokens required than fit after the prompt (max_tokens unset: DEFAULT_MAX_TOKENS).
        st.integers(600, 2**40).map(lambda tokens: {"min_tokens": tokens}),
    )


def malformed_input() -> st.SearchStrategy[tuple[str, Any]]:
    """(kind, a job input that must fail)."""
    identifier = st.from_regex(r"[a-z_]{1,12}", fullmatch=True)
    sampling_fields = {"best_of", "use_beam_search", "length_penalty", "early_stopping"}
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
        # `model`: a name neither the served model's nor an adapter's (LORA_MODULES), or
        # not a name at all.
        st.one_of(
            st.sampled_from(["", "gamma", "gpt-4", "Alpha", "alpha ", "base/../alpha"]),
            st.integers(),
            st.lists(st.text(max_size=3), max_size=2),
        ).map(lambda model: {"prompt": PROMPT, "model": model}),
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


def check_input_error(error: Any, raw: Any) -> str:
    """The job's error is one short line naming the problem, and repeats no prompt."""
    assert isinstance(error, str), f"{raw!r:.200}: {error!r:.500}"
    assert error.startswith("invalid_input: "), f"{raw!r:.200}: {error}"
    assert "\n" not in error
    assert "Traceback" not in error
    assert MARKER not in error and MARKER.split(maxsplit=1)[0] not in error
    assert len(error) < 2000
    return error


def structured_output_jobs() -> st.SearchStrategy[dict[str, Any]]:
    """Jobs with a regex, a grammar, a JSON schema or choices drawn at random: valid or not,
    compilable or not (``check_structured_output_error`` for those that fail)."""
    texts = st.text(alphabet="()[]{}|*+?.^$\\-:=\"' azAZ09,", max_size=12)
    schemas = st.recursive(
        st.sampled_from([{"type": "string"}, {"type": "integer"}, {"enum": [1, "a"]}, {}]),
        lambda inner: (
            st.fixed_dictionaries({"type": st.just("array"), "items": inner})
            | st.fixed_dictionaries(
                {
                    "type": st.sampled_from(["object", 5, "nothing"]),
                    "properties": st.dictionaries(st.sampled_from("abc"), inner, max_size=2),
                }
            )
        ),
        max_leaves=4,
    )
    forms = st.one_of(
        st.tuples(st.just("regex"), texts),
        st.tuples(st.just("grammar"), texts.map(lambda body: f"root ::= {body}")),
        st.tuples(st.just("json"), schemas),
        st.tuples(st.just("choice"), st.lists(texts.filter(bool), min_size=1, max_size=3)),
    )
    return forms.map(
        lambda form: {
            "prompt": PROMPT,
            "sampling_params": {
                "max_tokens": 8,
                "temperature": 0,
                "structured_outputs": {form[0]: form[1]},
            },
        }
    )


def check_structured_output_error(error: Any, job: dict[str, Any]) -> None:
    """A job of ``structured_output_jobs`` that failed: refused before the engine core, in
    one line naming its form, or (compiled in the engine core only) failed there alone."""
    if isinstance(error, str) and error.startswith("engine_error: "):
        assert error.startswith("engine_error: the engine could not serve its structured output")
        return
    [form] = job["sampling_params"]["structured_outputs"]
    message = check_input_error(error, job)
    assert message.startswith(f"invalid_input: sampling_params.structured_outputs.{form}")
