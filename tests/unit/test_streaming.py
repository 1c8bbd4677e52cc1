"""Chunk rendering from engine deltas (cumulative, delta, echo, the final chunk) and the
emission rule (when chunks go: the first at once, growing gaps, the cap, the byte budget),
with an injected clock: every time here is a number the test chooses."""

from __future__ import annotations

import json

import pytest
from bench.streaming import SimulatedStream, polls_with_new_text, simulate

from vllm_worker.engine_types import EngineUpdate, SequenceDelta, TokenLogprob
from vllm_worker.schema import StreamMode
from vllm_worker.settings import Settings
from vllm_worker.streaming import (
    RUNPOD_MAX_CHUNK_BYTES,
    ChunkBuilder,
    EmissionClock,
    JobStream,
)


def update(*deltas: SequenceDelta, finished: bool = False) -> EngineUpdate:
    return EngineUpdate(prompt_tokens=5, sequences=deltas, finished=finished)


def test_cumulative_chunks_repeat_the_prompt_and_all_text_so_far() -> None:
    builder = ChunkBuilder(prompt="Q: ", n=2, echo=True, mode="cumulative")
    builder.add(update(SequenceDelta(0, "a", 1), SequenceDelta(1, "x", 1)))
    assert builder.chunk() == {"text": ["Q: a", "Q: x"]}
    builder.add(update(SequenceDelta(1, "y", 1)))  # only sequence 1 progressed
    assert builder.chunk() == {"text": ["Q: a", "Q: xy"]}


def test_delta_chunks_concatenate_to_the_cumulative_text() -> None:
    builder = ChunkBuilder(prompt="Q: ", n=1, echo=True, mode="delta")
    builder.add(update(SequenceDelta(0, "a", 1)))
    builder.add(update(SequenceDelta(0, "b", 1)))  # held back, then sent together
    first = builder.chunk()
    builder.add(update(SequenceDelta(0, "c", 1, finish_reason="stop"), finished=True))
    final = builder.final_chunk(with_logprobs=False)
    assert first["text"] == ["Q: ab"]
    assert final["text"] == ["c"]
    assert first["text"][0] + final["text"][0] == "Q: abc"


def test_echo_false_leaves_the_prompt_out() -> None:
    builder = ChunkBuilder(prompt="Q: ", n=1, echo=False, mode="cumulative")
    builder.add(update(SequenceDelta(0, "a", 1)))
    assert builder.chunk() == {"text": ["a"]}


def test_final_chunk_has_finish_reasons_and_usage() -> None:
    builder = ChunkBuilder(prompt="Q", n=2, echo=True, mode="cumulative")
    builder.add(update(SequenceDelta(0, "ab", 2, "length"), SequenceDelta(1, "c", 1, "stop")))
    final = builder.final_chunk(with_logprobs=False)
    assert final == {
        "text": ["Qab", "Qc"],
        "finish_reason": ["length", "stop"],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }


def test_logprobs_are_collected_for_the_final_chunk() -> None:
    builder = ChunkBuilder(prompt="Q", n=1, echo=False, mode="cumulative")
    first = TokenLogprob(token="a", logprob=-0.5, top_logprobs={"a": -0.5, "b": -1.0})
    second = TokenLogprob(token="c", logprob=-0.1, top_logprobs={"c": -0.1})
    builder.add(update(SequenceDelta(0, "a", 1, logprobs=(first,))))
    builder.add(update(SequenceDelta(0, "c", 1, "length", logprobs=(second,)), finished=True))
    final = builder.final_chunk(with_logprobs=True)
    assert final["logprobs"] == [
        [
            {"token": "a", "logprob": -0.5, "top_logprobs": {"a": -0.5, "b": -1.0}},
            {"token": "c", "logprob": -0.1, "top_logprobs": {"c": -0.1}},
        ]
    ]


def test_pending_bytes_is_the_size_of_the_post_the_sdk_makes() -> None:
    for mode in ("cumulative", "delta"):
        builder = ChunkBuilder(prompt='Q "é"\n', n=3, echo=True, mode=mode)
        for text in ("a", "ü\t", "😀 x", ""):
            builder.add(update(*(SequenceDelta(i, text * (i + 1), 1) for i in range(3))))
            expected = builder.pending_bytes()
            posted = json.dumps({"output": builder.chunk()}, ensure_ascii=False).encode()
            assert expected == len(posted), mode


# --- the clock alone ------------------------------------------------------------------------


def sent_times(clock: EmissionClock, ticks: int, size: int = 0) -> list[int]:
    """The ticks (from 0) at which the clock lets a chunk of ``size`` bytes go, asked every
    tick. Whole numbers keep the arithmetic exact; the clock does not care about the unit."""
    return [tick for tick in range(ticks + 1) if clock.due(tick) and clock.admit(tick, size)]


def test_the_first_chunk_goes_at_once_then_one_per_interval() -> None:
    assert sent_times(EmissionClock(5), 22) == [0, 5, 10, 15, 20]
    assert sent_times(EmissionClock(0), 3) == [0, 1, 2, 3]  # 0: every engine output


def test_gaps_grow_with_the_jobs_age() -> None:
    # growth 1: each gap is the job's age at the previous chunk (doubling), at least 5.
    assert sent_times(EmissionClock(5, growth=1.0), 170) == [0, 5, 10, 20, 40, 80, 160]


def test_the_cap_bounds_every_gap_in_every_mode() -> None:
    clock = EmissionClock(5, growth=1.0, max_interval_s=50)
    assert sent_times(clock, 500) == [0, 5, 10, 20, 40, 80, 130, 180, 230, 280, 330, 380, 430, 480]


def test_a_cap_below_the_minimum_leaves_the_minimum() -> None:
    assert sent_times(EmissionClock(10, growth=1.0, max_interval_s=2), 50) == [
        0,
        10,
        20,
        30,
        40,
        50,
    ]


def test_the_settings_give_one_clock_for_both_modes_in_milliseconds() -> None:
    settings = Settings(
        stream_min_interval_ms=5000, stream_interval_growth=1.0, stream_max_interval_ms=50000
    )
    assert sent_times(EmissionClock.for_job(settings), 500)[-3:] == [380, 430, 480]
    no_cap = settings.model_copy(update={"stream_max_interval_ms": 0.0})
    assert sent_times(EmissionClock.for_job(no_cap), 500)[-3:] == [80, 160, 320]


def test_a_chunk_over_half_the_budget_left_is_held_and_tried_again_a_gap_later() -> None:
    clock = EmissionClock(1, budget_bytes=1000)
    assert clock.due(0) and clock.admit(0, 400)  # 600 left
    assert clock.due(1) and not clock.admit(1, 301)  # over 300: held
    assert not clock.due(1.5)  # no retry until a gap has passed
    assert clock.due(2) and clock.admit(2, 300)
    assert clock.spent_bytes == 700


def test_a_chunk_over_runpods_1_mb_is_never_sent() -> None:
    clock = EmissionClock(1)
    assert not clock.admit(0, RUNPOD_MAX_CHUNK_BYTES + 1)
    assert clock.admit(1, RUNPOD_MAX_CHUNK_BYTES)


def test_gaps_widen_so_that_the_budget_left_lasts_until_the_jobs_estimated_end() -> None:
    clock = EmissionClock(0.1, budget_bytes=10_000)
    clock.admit(0, 1000, done=0.1)  # the first chunk: no pace yet, the time rule alone
    assert clock.due(0.1)
    clock.admit(1, 1000, done=0.2)  # a fifth done after 1: the end is 4 away; 8,000 left
    assert not clock.due(1.49)  # at 1,000 a chunk, 8,000 last 8 chunks: 4 / 8 = 0.5 apart
    assert clock.due(1.5)
    clock.admit(2, 1000, done=0.9)  # the end is near: the time rule again
    assert clock.due(2.1)


# --- a whole job: builder + clock, as the handler runs them ---------------------------------


# The cap (1 s) plus the wait for the next engine output at 30 tokens/s (and rounding).
ONE_S_AND_A_TOKEN = 1.0 + 1 / 30 + 1e-9


def llama2_answer(mode: StreamMode = "cumulative", n: int = 1) -> SimulatedStream:
    """1,000 tokens at 30 tokens/s (a Llama 2 7B answer on a GPU), default settings."""
    return simulate(
        EmissionClock.for_job(Settings()),
        tokens=1000,
        tokens_per_s=30.0,
        text_per_token=" tok",
        n=n,
        mode=mode,
    )


@pytest.mark.parametrize("mode", ["cumulative", "delta"])
def test_default_streams_move_at_least_every_second_and_the_first_chunk_at_once(
    mode: StreamMode,
) -> None:
    job = llama2_answer(mode)
    assert job.times[0] == pytest.approx(1 / 30)  # the first token's output: sent at once
    assert max(job.gaps) <= ONE_S_AND_A_TOKEN
    assert job.times[-1] > 1000 / 30 - ONE_S_AND_A_TOKEN  # and until the end
    # A client polling every second gets new text at every poll.
    assert polls_with_new_text(job.times, job.duration_s) == 1.0


@pytest.mark.parametrize("mode", ["cumulative", "delta"])
def test_no_text_is_lost_however_the_chunks_were_spaced(mode: StreamMode) -> None:
    job = llama2_answer(mode, n=2)
    texts = ["A prompt. " + " tok" * 1000] * 2
    assert job.texts(mode) == texts
    if mode == "cumulative":
        assert all(texts[0].startswith(chunk["text"][0]) for chunk in job.chunks)


def test_a_cumulative_stream_stays_within_the_budget_by_widening_its_gaps() -> None:
    # 16 sequences x 4,000 tokens at 30 tokens/s (133 s): a chunk a second would cost
    # about 18 MB; the default budget is 4 MB.
    clock = EmissionClock.for_job(Settings())
    job = simulate(clock, tokens=4000, tokens_per_s=30.0, text_per_token=" tok", n=16)
    assert sum(job.sizes) == clock.spent_bytes <= Settings().stream_max_job_bytes
    assert max(job.gaps[:20]) <= ONE_S_AND_A_TOKEN  # fresh while the budget is ample ...
    assert 1.5 < max(job.gaps) < 15  # ... then wider apart, ...
    assert job.times[-1] > 0.8 * 4000 / 30  # ... until near the end, not stopped early
    assert job.final["text"][0] == "A prompt. " + " tok" * 4000  # nothing lost


def test_a_budget_smaller_than_the_answer_holds_the_late_chunks_back() -> None:
    clock = EmissionClock(0.05, growth=1.0, max_interval_s=1.0, budget_bytes=100_000)
    job = simulate(clock, tokens=4000, tokens_per_s=30.0, text_per_token=" tok", n=16)
    assert clock.spent_bytes <= 100_000  # the answer itself is 256 kB: no late chunk fits
    assert job.final["text"][0] == "A prompt. " + " tok" * 4000


def test_a_delta_stream_is_not_slowed_by_the_budget() -> None:
    job = simulate(
        EmissionClock.for_job(Settings()), tokens=4000, tokens_per_s=30.0, n=16, mode="delta"
    )
    assert max(job.gaps) <= ONE_S_AND_A_TOKEN


def test_a_job_that_is_not_streamed_sends_only_its_final_chunk() -> None:
    builder = ChunkBuilder(prompt="Q", n=1, echo=True, mode="cumulative")
    stream = JobStream(builder, None, max_tokens=2)
    assert not stream.due(0.0)
    assert stream.add(update(SequenceDelta(0, "a", 1)), 0.0) is None
    assert stream.add(update(SequenceDelta(0, "b", 1, "stop"), finished=True), 1.0) is None
    assert builder.final_chunk(with_logprobs=False)["text"] == ["Qab"]


def test_prompt_logprobs_come_once_and_only_in_the_final_chunk_asked_for() -> None:
    builder = ChunkBuilder(prompt="Q", n=1, echo=False, mode="delta")
    second = TokenLogprob(token="b", logprob=-2.0, top_logprobs={"b": -2.0, "z": -0.1})
    first_output = EngineUpdate(
        prompt_tokens=2,
        sequences=(SequenceDelta(0, "a", 1),),
        finished=False,
        prompt_logprobs=(None, second),
    )
    builder.add(first_output)
    assert "prompt_logprobs" not in builder.chunk()
    builder.add(update(SequenceDelta(0, "c", 1, "length"), finished=True))
    final = builder.final_chunk(with_logprobs=False, with_prompt_logprobs=True)
    assert final["prompt_logprobs"] == [
        None,  # nothing comes before the prompt's first token
        {"token": "b", "logprob": -2.0, "top_logprobs": {"b": -2.0, "z": -0.1}},
    ]
    assert "prompt_logprobs" not in builder.final_chunk(with_logprobs=False)
