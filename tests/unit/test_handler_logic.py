"""The handler's own logic, against a scripted engine at its seam (``ServingEngine``).

What needs no generation: how ``max_tokens`` is defaulted and clipped, the ``min_tokens``
and context checks, the chunks' shapes in each mode, and that a bad job leaves the
handler serving. The scripted engine records the request it is given and answers with
a fixed text; the tokenizer is the tiny model's real one. Generation, streaming,
cancellation and concurrency are proven on the real engine (tests/integration,
tests/e2e), never here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from vllm_worker.engine_types import (
    EngineLoad,
    EngineUpdate,
    GenerationRequest,
    Handler,
    SequenceDelta,
)
from vllm_worker.settings import Settings
from vllm_worker.tiny_model import build_tokenizer
from vllm_worker.worker import make_handler

CONTEXT = 64  # MAX_MODEL_LEN of the scripted engine
QUEUE_S = 0.0025  # the scripted engine's time in its queue


class ScriptedEngine:
    """Writes ``words`` (one a step, per sequence) whatever it is asked; records requests."""

    def __init__(self, tokenizer: Any, words: tuple[str, ...] = (" a", " b", " c")) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = CONTEXT
        self.words = words
        self.requests: list[GenerationRequest] = []

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    async def generate(
        self, request: GenerationRequest, emit: Callable[[float], bool] | None = None
    ) -> AsyncIterator[EngineUpdate]:
        self.requests.append(request)
        prompt_tokens = len(request.prompt_token_ids)
        steps = min(len(self.words), request.max_tokens)
        for step in range(steps):
            last = step == steps - 1
            reason = "length" if last else None
            deltas = tuple(
                SequenceDelta(index, self.words[step], 1, reason)
                for index in range(request.sampling.n)
            )
            # vLLM's own figures come with the last update.
            stats = {"queue_s": QUEUE_S, "cached_prompt_tokens": 2} if last else {}
            yield EngineUpdate(prompt_tokens, deltas, finished=last, **stats)
            await asyncio.sleep(0)

    def load(self) -> EngineLoad | None:
        return None

    def add_load_listener(self, listener: Callable[[EngineLoad], None]) -> None:
        pass

    def is_dead(self) -> bool:
        return False


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer()


def settings(**values: str) -> Settings:
    # A chunk per engine output: the shapes, not the coalescing, are under test here.
    env = {"STREAM_MIN_INTERVAL_MS": "0", "STREAM_INTERVAL_GROWTH": "0", "MAX_MODEL_LEN": "64"}
    return Settings.from_env({**env, **values})


def run(handler: Handler, job_input: Any) -> list[Any]:
    async def collect() -> list[Any]:
        return [chunk async for chunk in handler({"id": "job-1", "input": job_input})]

    return asyncio.run(collect())


def test_max_tokens_defaults_to_the_setting_and_is_clipped_to_the_context(tokenizer: Any) -> None:
    engine = ScriptedEngine(tokenizer)
    handler = make_handler(engine, settings(DEFAULT_MAX_TOKENS="10"), None)
    run(handler, {"prompt": "Hello there"})
    prompt_tokens = len(engine.tokenize("Hello there"))
    run(handler, {"prompt": "Hello there", "sampling_params": {"max_tokens": 1000}})
    assert [request.max_tokens for request in engine.requests] == [10, CONTEXT - prompt_tokens]


def test_min_tokens_above_what_fits_in_the_context_is_refused(tokenizer: Any) -> None:
    # max_tokens 1000 is clipped to the room the context leaves: min_tokens no longer fits.
    handler = make_handler(ScriptedEngine(tokenizer), settings(), None)
    sampling = {"max_tokens": 1000, "min_tokens": CONTEXT - 1}
    (error,) = run(handler, {"prompt": "Hi", "sampling_params": sampling})
    room = CONTEXT - len(tokenizer.encode("Hi"))
    assert error["error"] == (
        f"invalid_input: sampling_params.min_tokens: {CONTEXT - 1} is more than the {room} "
        "tokens this job may generate (max_tokens, or what fits in MAX_MODEL_LEN after the "
        "prompt)"
    )


def test_a_prompt_longer_than_the_context_fails_with_its_size(tokenizer: Any) -> None:
    engine = ScriptedEngine(tokenizer)
    handler = make_handler(engine, settings(), None)
    prompt = "word " * 60  # within MAX_INPUT_CHARS, beyond the context
    (error,) = run(handler, {"prompt": prompt})
    tokens = len(engine.tokenize(prompt))
    assert error == {
        "error": f"invalid_input: prompt: the prompt has {tokens} tokens, but the model's "
        f"context (MAX_MODEL_LEN) is {CONTEXT} tokens: at most {CONTEXT - 1} prompt tokens fit"
    }
    assert engine.requests == []  # the engine never saw it


def test_cumulative_chunks_hold_the_prompt_and_all_text_so_far(tokenizer: Any) -> None:
    handler = make_handler(ScriptedEngine(tokenizer), settings(), None)
    chunks = run(handler, {"prompt": "Q:", "sampling_params": {"n": 2}})
    assert chunks[:-1] == [{"text": ["Q: a", "Q: a"]}, {"text": ["Q: a b", "Q: a b"]}]
    prompt_tokens = len(tokenizer.encode("Q:"))
    del chunks[-1]["metrics"]  # test_the_final_chunk_has_the_jobs_metrics
    assert chunks[-1] == {
        "text": ["Q: a b c", "Q: a b c"],
        "finish_reason": ["length", "length"],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": 6,
            "total_tokens": prompt_tokens + 6,
        },
    }


def test_delta_chunks_hold_only_what_is_new(tokenizer: Any) -> None:
    handler = make_handler(ScriptedEngine(tokenizer), settings(), None)
    chunks = run(handler, {"prompt": "Q:", "echo": False, "stream_mode": "delta"})
    assert [chunk["text"] for chunk in chunks] == [[" a"], [" b"], [" c"]]
    assert chunks[-1]["finish_reason"] == ["length"]


def test_a_job_that_is_not_streamed_gets_its_final_chunk_only(tokenizer: Any) -> None:
    handler = make_handler(ScriptedEngine(tokenizer), settings(), None)
    (final,) = run(handler, {"prompt": "Q:", "stream": False})
    assert final["text"] == ["Q: a b c"]
    assert set(final) == {"text", "finish_reason", "usage", "metrics"}


def test_the_final_chunk_has_the_jobs_metrics(tokenizer: Any) -> None:
    handler = make_handler(ScriptedEngine(tokenizer), settings(), None)
    *chunks, final = run(handler, {"prompt": "Q:", "sampling_params": {"n": 2}})
    assert all("metrics" not in chunk for chunk in chunks)
    metrics = final["metrics"]
    assert metrics["time_in_queue_ms"] == QUEUE_S * 1000  # vLLM's, as it gave it
    assert metrics["cached_prompt_tokens"] == 2
    assert metrics["time_to_first_token_ms"] >= 0 and metrics["generation_ms"] >= 0
    assert metrics["tokens_per_s"] > 0  # 6 tokens in the job's time
    assert set(metrics) == {
        "time_in_queue_ms",
        "time_to_first_token_ms",
        "generation_ms",
        "tokens_per_s",
        "cached_prompt_tokens",
    }


def test_a_bad_job_fails_alone_and_the_next_job_is_served(tokenizer: Any) -> None:
    engine = ScriptedEngine(tokenizer)
    handler = make_handler(engine, settings(), None)
    (error,) = run(handler, {"prompt": "Q:", "sampling_params": {"temperature": 5}})
    assert error["error"].startswith("invalid_input: sampling_params.temperature")
    assert "\n" not in error["error"]
    assert run(handler, {"prompt": "Q:"})[-1]["text"] == ["Q: a b c"]
    assert len(engine.requests) == 1  # the bad one never reached the engine
