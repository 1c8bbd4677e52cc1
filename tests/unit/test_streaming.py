"""Chunk rendering from engine deltas: cumulative, delta, echo, final chunk, coalescing clock."""

from vllm_worker.engine_types import EngineUpdate, SequenceDelta, TokenLogprob
from vllm_worker.settings import Settings
from vllm_worker.streaming import ChunkBuilder, EmissionClock


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


def test_clock_sends_the_first_chunk_at_once_then_one_per_interval() -> None:
    clock = EmissionClock(min_interval_s=0.05)
    assert clock.should_send(10.0) is True
    assert clock.should_send(10.01) is False
    assert clock.should_send(10.049) is False
    assert clock.should_send(10.05) is True
    assert clock.should_send(10.06) is False


def test_clock_with_zero_interval_sends_everything() -> None:
    clock = EmissionClock(min_interval_s=0.0)
    assert all(clock.should_send(10.0) for _ in range(5))


def sent_times(clock: EmissionClock, ticks: int) -> list[int]:
    """The ticks (10 ms each, from 0) at which the clock lets a chunk go, asked every tick.

    Whole numbers keep the clock's arithmetic exact; it does not care about the unit.
    """
    return [tick for tick in range(ticks + 1) if clock.should_send(float(tick))]


def test_growing_clock_sends_the_first_chunk_at_once_and_spaces_the_rest_by_age() -> None:
    # growth 1: each gap is the job's age at the previous chunk (doubling), at least 50 ms.
    clock = EmissionClock(min_interval_s=5, growth=1.0)
    assert sent_times(clock, 170) == [0, 5, 10, 20, 40, 80, 160]


def test_growing_clock_sends_logarithmically_many_chunks() -> None:
    short = sent_times(EmissionClock(5, growth=0.75), 200)
    long = sent_times(EmissionClock(5, growth=0.75), 2000)
    fixed = sent_times(EmissionClock(5), 2000)
    assert len(fixed) == 401
    # Ten times longer costs a few chunks more (log(10) / log(1.75) = 4.1), not ten times.
    assert len(long) - len(short) in {4, 5}
    assert len(long) <= 20


def test_growing_clock_bounds_a_cumulative_streams_bytes() -> None:
    # Text grows steadily with age; a cumulative chunk repeats all of it. At growth 0.75
    # the stream, final chunk included, stays within 1 + 1.75 / 0.75 = 3.3x the text.
    for end in (100, 370, 1700, 6000):
        sent = sent_times(EmissionClock(5, growth=0.75), end)
        if sent[-1] == end:
            sent.pop()  # the job's last output is the final chunk, sent without asking
        repeated = sum(sent) + end
        assert repeated / end <= 1 + 1.75 / 0.75, end


def test_capped_clock_never_waits_longer_than_its_cap() -> None:
    clock = EmissionClock(min_interval_s=5, growth=1.0, max_interval_s=50)
    assert sent_times(clock, 500) == [0, 5, 10, 20, 40, 80, 130, 180, 230, 280, 330, 380, 430, 480]


def test_cap_below_the_minimum_interval_leaves_the_minimum() -> None:
    clock = EmissionClock(min_interval_s=10, growth=1.0, max_interval_s=2)
    assert sent_times(clock, 50) == [0, 10, 20, 30, 40, 50]


def test_clock_for_a_job_caps_delta_streams_only() -> None:
    # for_job converts milliseconds to seconds: here one tick is a second.
    settings = Settings(
        stream_min_interval_ms=5000, stream_interval_growth=1.0, stream_delta_max_interval_ms=50000
    )
    assert sent_times(EmissionClock.for_job(settings, "delta"), 500)[-3:] == [380, 430, 480]
    assert sent_times(EmissionClock.for_job(settings, "cumulative"), 500)[-3:] == [80, 160, 320]
    no_cap = settings.model_copy(update={"stream_delta_max_interval_ms": 0.0})
    assert sent_times(EmissionClock.for_job(no_cap, "delta"), 500)[-3:] == [80, 160, 320]


def test_default_settings_give_a_growing_clock() -> None:
    clock = EmissionClock.for_job(Settings(), "cumulative")
    sent = [now for now in (i / 100 for i in range(1001)) if clock.should_send(now)]
    assert sent[0] == 0.0  # the first chunk at once
    assert 5 <= len(sent) < 20  # not 200, as at a fixed 50 ms: the gaps grew
