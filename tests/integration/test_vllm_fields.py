"""vLLM's own sampling fields in the native input, on the real engine with the tiny model:
structured outputs, logit_bias, allowed_token_ids, prompt_logprobs, truncate_prompt_tokens.

The tiny model writes noise: the checks are on what the fields guarantee whatever the
model writes (the constraint holds, the tokens are the allowed ones, the counts), greedy
so that every run is the same. The shared engine (conftest.py) uses the xgrammar backend
without free whitespace, set as ENGINE_ARGS: with it, this model fills a JSON object
with blanks until ``max_tokens``. What the constraints mean on a model that speaks, with
the default backend (``auto``), is in tests/real.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest
from hypothesis import given

from bad_inputs import (
    PROMPT,
    VOCAB_SIZE,
    check_input_error,
    check_structured_output_error,
    fuzz,
    structured_output_jobs,
)
from helpers import collect
from vllm_worker.engine import Engine
from vllm_worker.engine_types import Handler

Run = Callable[..., Any]
GREEDY = {"temperature": 0, "max_tokens": 48}
ANSWER = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "stars": {"enum": [1, 2, 3]}},
    "required": ["answer", "stars"],
    "additionalProperties": False,
}


def final_of(run: Run, handler: Handler, sampling: dict[str, Any], **job: Any) -> Any:
    chunks = run(
        collect(handler, {"prompt": PROMPT, "echo": False, **job, "sampling_params": sampling})
    )
    assert "error" not in chunks[-1], chunks[-1]
    return chunks[-1]


def structured(run: Run, handler: Handler, form: str, value: Any) -> str:
    final = final_of(run, handler, {**GREEDY, "structured_outputs": {form: value}})
    assert final["finish_reason"] == ["stop"], final  # the constraint ended it, not the length
    return str(final["text"][0])


def test_a_json_schema_gives_json_valid_for_it(run: Run, handler: Handler) -> None:
    jsonschema.validate(json.loads(structured(run, handler, "json", ANSWER)), ANSWER)
    # Its JSON text, as vLLM's own API also takes it.
    text = structured(run, handler, "json", json.dumps(ANSWER))
    jsonschema.validate(json.loads(text), ANSWER)


def test_a_regex_a_choice_and_a_grammar_hold(run: Run, handler: Handler) -> None:
    assert re.fullmatch(
        r"[0-9]{3}-[a-c]{2}", structured(run, handler, "regex", r"[0-9]{3}-[a-c]{2}")
    )
    assert structured(run, handler, "choice", ["left", "right"]) in ("left", "right")
    grammar = 'root ::= "go " direction\ndirection ::= "north" | "south"'
    assert structured(run, handler, "grammar", grammar) in ("go north", "go south")
    # json_object (any object: this model's keys never end) is checked on the real model.


@pytest.mark.parametrize(
    "case",
    [
        ("regex", "(", "Failed to transform regex into a grammar"),
        ("json", {"type": 5}, "Failed to transform json schema into a grammar"),
        ("grammar", "root ::= (", "Invalid grammar specification"),
    ],
    ids=["regex", "json", "grammar"],
)
def test_a_constraint_the_backend_cannot_compile_fails_the_job_alone(
    run: Run, handler: Handler, engine: Engine, case: tuple[str, Any, str]
) -> None:
    form, value, why = case
    job = {"prompt": PROMPT, "sampling_params": {"structured_outputs": {form: value}}}
    [chunk] = run(collect(handler, job))
    error = check_input_error(chunk["error"], job)
    assert error.startswith(f"invalid_input: sampling_params.structured_outputs.{form}: {why}")
    assert_serves(run, handler, engine)


def test_logit_bias_and_allowed_token_ids_steer_every_token(
    run: Run, handler: Handler, engine: Engine
) -> None:
    chosen = engine.tokenize(" sea")[-1]
    biased = final_of(run, handler, {**GREEDY, "max_tokens": 6, "logit_bias": {str(chosen): 100}})
    assert biased["text"] == [engine.tokenizer.decode([chosen] * 6)]
    # One allowed token: every token sampled (a text's ids are not unique to check more).
    only = engine.tokenize(" sky")[-1]
    sampling = {"max_tokens": 5, "seed": 3, "allowed_token_ids": [only], "ignore_eos": True}
    sampled = final_of(run, handler, sampling)
    assert sampled["text"] == [engine.tokenizer.decode([only] * 5)]


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        ({"logit_bias": {str(VOCAB_SIZE): 5.0}}, "sampling_params.logit_bias: "),
        ({"allowed_token_ids": [1, VOCAB_SIZE + 7]}, "sampling_params.allowed_token_ids: "),
    ],
)
def test_a_token_outside_the_vocabulary_is_named(
    run: Run, handler: Handler, engine: Engine, sampling: dict[str, Any], field: str
) -> None:
    job = {"prompt": PROMPT, "sampling_params": sampling}
    [chunk] = run(collect(handler, job))
    assert check_input_error(chunk["error"], job).startswith(f"invalid_input: {field}")
    assert_serves(run, handler, engine)


def test_prompt_logprobs_come_in_the_final_chunk_one_per_prompt_token(
    run: Run, handler: Handler, engine: Engine
) -> None:
    for stream in (True, False):
        final = final_of(run, handler, {**GREEDY, "prompt_logprobs": 2}, stream=stream)
        entries = final["prompt_logprobs"]
        assert len(entries) == final["usage"]["prompt_tokens"] == len(engine.tokenize(PROMPT))
        assert entries[0] is None  # nothing comes before the first token
        for entry in entries[1:]:
            assert entry["top_logprobs"][entry["token"]] == entry["logprob"]
            assert 2 <= len(entry["top_logprobs"]) <= 3  # the top 2, and the token itself
    assert "prompt_logprobs" not in final_of(run, handler, GREEDY)


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(
    run: Run, handler: Handler, engine: Engine
) -> None:
    ids = engine.tokenize(PROMPT)
    final = final_of(run, handler, {**GREEDY, "truncate_prompt_tokens": 4}, echo=True)
    assert final["usage"]["prompt_tokens"] == 4
    assert final["text"][0].startswith(engine.tokenizer.decode(ids[-4:]))
    whole = final_of(run, handler, {**GREEDY, "truncate_prompt_tokens": len(ids) + 5})
    assert whole["usage"]["prompt_tokens"] == len(ids)  # shorter already: as it is


def test_fuzzed_structured_outputs_never_wedge_the_engine(
    run: Run, handler: Handler, engine: Engine
) -> None:
    """Regexes, grammars and schemas drawn at random: each job ends with its constrained
    text or with one line naming the form, and the engine serves the next job."""

    @fuzz(60)
    @given(structured_output_jobs())
    def one(job: dict[str, Any]) -> None:
        final = run(collect(handler, job))[-1]
        if "error" in final:
            check_structured_output_error(final["error"], job)
        else:
            assert final["finish_reason"][0] in ("stop", "length")

    one()
    assert_serves(run, handler, engine)


def assert_serves(run: Run, handler: Handler, engine: Engine) -> None:
    final = final_of(run, handler, {"max_tokens": 4, "ignore_eos": True})
    assert final["usage"]["completion_tokens"] == 4
    assert not engine.client.errored
    assert engine.client.get_num_unfinished_requests() == 0
