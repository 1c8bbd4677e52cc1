"""The handler on the real vLLM engine (CPU build) with the tiny model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from vllm import SamplingParams
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind

from helpers import SEED_INPUT, collect, handler_for, until_no_request
from vllm_worker.engine import Engine
from vllm_worker.engine_types import Handler
from vllm_worker.settings import Settings
from vllm_worker.streaming import Chunk

Run = Callable[..., Any]
PROMPT = "Hello there, please tell me a story about the sea."


def job(prompt: str = PROMPT, **sampling: Any) -> dict[str, Any]:
    return {"prompt": prompt, "sampling_params": sampling}


def completions(chunk: Chunk, prompt: str = PROMPT) -> list[str]:
    """The generated part of each cumulative text."""
    assert all(text.startswith(prompt) for text in chunk["text"])
    return [text[len(prompt) :] for text in chunk["text"]]


def test_seed_request_streams_growing_cumulative_chunks(
    run: Run, handler: Handler, engine: Engine
) -> None:
    request = {**SEED_INPUT, "sampling_params": {**SEED_INPUT["sampling_params"]}}
    request["sampling_params"].update(max_tokens=100, ignore_eos=True)
    chunks = run(collect(handler, request))

    prompt = request["prompt"]
    assert len(chunks) > 2, "a 100-token answer must stream in several chunks"
    previous = ""
    for chunk in chunks:
        assert len(chunk["text"]) == 1  # n = 1
        text = chunk["text"][0]
        assert text.startswith(prompt)
        assert text.startswith(previous)
        previous = text
    final = chunks[-1]
    assert final["finish_reason"] == ["length"]
    prompt_tokens = len(engine.tokenize(prompt))
    assert final["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 100,
        "total_tokens": prompt_tokens + 100,
    }
    assert all("usage" not in chunk for chunk in chunks[:-1])


def test_n_sequences_each_get_their_own_text(run: Run, handler: Handler) -> None:
    chunks = run(collect(handler, job(n=3, max_tokens=12, ignore_eos=True, temperature=1.0)))
    for chunk in chunks:
        assert len(chunk["text"]) == 3
    final = chunks[-1]
    assert final["finish_reason"] == ["length"] * 3
    assert final["usage"]["completion_tokens"] == 36
    assert len(set(completions(final))) > 1, "sampled sequences should differ"


def test_same_seed_same_text_and_equal_to_the_raw_engine(
    run: Run, handler: Handler, engine: Engine
) -> None:
    sampling = {"seed": 1234, "temperature": 1.0, "max_tokens": 24, "ignore_eos": True}
    first = run(collect(handler, job(**sampling)))[-1]
    second = run(collect(handler, job(**sampling)))[-1]
    other_seed = run(collect(handler, job(**{**sampling, "seed": 99})))[-1]
    assert first["text"] == second["text"]
    assert first["text"] != other_seed["text"]

    async def raw_engine_text() -> str:
        params = SamplingParams(
            seed=1234,
            temperature=1.0,
            max_tokens=24,
            ignore_eos=True,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        prompt = TokensPrompt(prompt_token_ids=engine.tokenize(PROMPT))
        async for output in engine.client.generate(prompt, params, "raw-seed"):
            final = output
        return str(final.outputs[0].text)

    assert completions(first) == [run(raw_engine_text())]


def test_stop_string_ends_the_completion_before_it(run: Run, handler: Handler) -> None:
    greedy = {"temperature": 0.0, "max_tokens": 40, "ignore_eos": True}
    free_text = completions(run(collect(handler, job(**greedy)))[-1])[0]
    stop = _printable_substring(free_text, start=len(free_text) // 2)
    expected = free_text[: free_text.index(stop)]

    stopped = run(collect(handler, job(**greedy, stop=[stop])))[-1]
    assert completions(stopped) == [expected]
    assert stopped["finish_reason"] == ["stop"]

    kept = run(collect(handler, job(**greedy, stop=stop, include_stop_str_in_output=True)))[-1]
    assert completions(kept) == [expected + stop]


def test_stream_false_sends_one_final_chunk(run: Run, handler: Handler) -> None:
    sampling = {"seed": 5, "max_tokens": 20, "ignore_eos": True}
    streamed = run(collect(handler, job(**sampling)))
    single = run(collect(handler, {**job(**sampling), "stream": False}))
    assert len(single) == 1
    del single[0]["metrics"], streamed[-1]["metrics"]  # the times differ; the rest may not
    assert single[0] == streamed[-1]


def test_echo_false_returns_only_the_completion(run: Run, handler: Handler) -> None:
    sampling = {"seed": 6, "max_tokens": 20, "ignore_eos": True}
    echoed = run(collect(handler, job(**sampling)))[-1]
    bare = run(collect(handler, {**job(**sampling), "echo": False}))
    assert bare[-1]["text"] == completions(echoed)
    assert not any(chunk["text"][0].startswith(PROMPT) for chunk in bare)


def test_delta_chunks_add_up_to_the_cumulative_text(run: Run, handler: Handler) -> None:
    sampling = {"seed": 7, "n": 2, "max_tokens": 30, "ignore_eos": True}
    cumulative = run(collect(handler, job(**sampling)))[-1]
    deltas = run(collect(handler, {**job(**sampling), "stream_mode": "delta"}))
    assert len(deltas) > 2
    joined = ["".join(chunk["text"][i] for chunk in deltas) for i in range(2)]
    assert joined == cumulative["text"]
    assert deltas[-1]["usage"] == cumulative["usage"]


def test_logprobs_come_with_the_final_chunk(run: Run, handler: Handler) -> None:
    final = run(collect(handler, job(max_tokens=10, ignore_eos=True, logprobs=2)))[-1]
    (entries,) = final["logprobs"]
    assert len(entries) == 10
    for entry in entries:
        assert entry["logprob"] <= 0.0
        assert 1 <= len(entry["top_logprobs"]) <= 3  # the top 2 plus the sampled token


def test_default_max_tokens_applies_when_none_is_sent(
    run: Run, handler: Handler, settings: Settings
) -> None:
    final = run(collect(handler, job(ignore_eos=True)))[-1]
    assert final["usage"]["completion_tokens"] == settings.default_max_tokens


def test_max_tokens_beyond_the_context_is_clipped_to_fit(
    run: Run, handler: Handler, engine: Engine
) -> None:
    final = run(collect(handler, job(max_tokens=100_000, ignore_eos=True)))[-1]
    prompt_tokens = final["usage"]["prompt_tokens"]
    assert final["finish_reason"] == ["length"]
    assert final["usage"]["completion_tokens"] == engine.max_model_len - prompt_tokens


def test_prompt_longer_than_the_context_fails_with_its_size(run: Run, handler: Handler) -> None:
    chunks = run(collect(handler, job(prompt="story " * 600)))  # 2401 tokens, 3600 chars
    assert len(chunks) == 1
    error = chunks[0]["error"]
    assert error.startswith("invalid_input: prompt: the prompt has 2401 tokens")
    assert "MAX_MODEL_LEN" in error
    assert "511 prompt tokens fit" in error


def test_invalid_input_fails_with_one_line_and_the_next_job_works(
    run: Run, handler: Handler
) -> None:
    chunks = run(collect(handler, job(temperature=5, max_tokenz=3)))
    assert len(chunks) == 1
    error = chunks[0]["error"]
    assert error.startswith("invalid_input: ")
    assert "sampling_params.temperature: Input should be less than or equal to 2" in error
    assert "sampling_params.max_tokenz: unknown field" in error
    assert "\n" not in error
    assert run(collect(handler, job(max_tokens=3)))[-1]["finish_reason"]


def test_value_only_the_engine_can_check_is_an_input_error(run: Run, handler: Handler) -> None:
    chunks = run(collect(handler, job(stop_token_ids=[50_000])))
    assert len(chunks) == 1
    error = chunks[0]["error"]
    assert error.startswith("invalid_input: sampling_params.stop_token_ids:")
    assert "out-of-vocab" in error
    assert run(collect(handler, job(max_tokens=3)))[-1]["usage"]["completion_tokens"] >= 1


def test_coalescing_never_holds_back_the_first_or_final_chunk(
    run: Run, engine: Engine, settings: Settings
) -> None:
    slow_stream = handler_for(engine, settings.model_copy(update={"stream_min_interval_ms": 1e4}))
    chunks = run(collect(slow_stream, job(max_tokens=40, ignore_eos=True)))
    assert len(chunks) == 2
    assert len(completions(chunks[0])[0]) < len(completions(chunks[1])[0])
    assert chunks[1]["usage"]["completion_tokens"] == 40


def test_concurrent_jobs_are_batched_and_each_is_right(run: Run, handler: Handler) -> None:
    # (n, max_tokens): the shortest job is long enough (100 engine steps) that all 12 are
    # in the engine before it ends, however fast the machine.
    shapes = [(1 + i % 3, 100 + 8 * i) for i in range(12)]
    first_chunk_at: list[float] = [0.0] * len(shapes)
    done_at: list[float] = [0.0] * len(shapes)

    async def one(index: int, n: int, max_tokens: int) -> list[Chunk]:
        chunks = []
        request = {
            "id": f"concurrent-{index}",
            "input": job(n=n, max_tokens=max_tokens, ignore_eos=True),
        }
        async for chunk in handler(request):
            if not chunks:
                first_chunk_at[index] = time.perf_counter()
            chunks.append(chunk)
        done_at[index] = time.perf_counter()
        return chunks

    async def all_jobs() -> list[list[Chunk]]:
        return await asyncio.gather(*(one(i, n, m) for i, (n, m) in enumerate(shapes)))

    results = run(all_jobs())
    for (n, max_tokens), chunks in zip(shapes, results, strict=True):
        final = chunks[-1]
        assert len(final["text"]) == n
        assert final["usage"]["completion_tokens"] == n * max_tokens
        assert final["finish_reason"] == ["length"] * n
    # Batched, not one after the other: every job started before the first one finished.
    assert max(first_chunk_at) < min(done_at)


def _printable_substring(text: str, start: int, length: int = 3) -> str:
    for position in range(start, len(text) - length):
        candidate = text[position : position + length]
        if candidate.isalpha() and candidate.isascii():
            return candidate
    pytest.fail(f"no plain-letter run of {length} in the generated text {text!r}")


def test_cancelling_a_job_aborts_its_engine_request(
    run: Run, handler: Handler, engine: Engine
) -> None:
    """RunPod cancels a job by cancelling the handler's task: the engine must stop on it."""
    request = {"id": "to-cancel", "input": job(max_tokens=400, ignore_eos=True)}
    received: list[Chunk] = []

    async def consume() -> None:
        async for chunk in handler(request):
            received.append(chunk)

    async def cancel_after_two_chunks() -> int:
        task = asyncio.ensure_future(consume())
        while len(received) < 2:
            await asyncio.sleep(0.005)
        assert engine.client.get_num_unfinished_requests() == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await until_no_request(engine)

    assert run(cancel_after_two_chunks()) == 0
    assert "finish_reason" not in received[-1]
    assert run(collect(handler, job(max_tokens=5)))[-1]["usage"]["completion_tokens"] >= 1


def test_the_final_chunk_has_the_jobs_metrics_from_the_engine(run: Run, handler: Handler) -> None:
    """vLLM's own figures reach the final chunk: its queue time, and its prefix cache's
    hits when the same long prompt comes twice."""
    prompt = PROMPT + " And then" * 60  # several KV-cache blocks
    request = job(prompt, max_tokens=4, ignore_eos=True)
    first, second = (run(collect(handler, request))[-1]["metrics"] for _ in range(2))
    for metrics in (first, second):
        assert metrics["time_in_queue_ms"] is not None and metrics["time_in_queue_ms"] >= 0
        assert metrics["time_to_first_token_ms"] > 0 and metrics["generation_ms"] >= 0
        assert metrics["tokens_per_s"] > 0
    assert second["cached_prompt_tokens"] > first["cached_prompt_tokens"]
