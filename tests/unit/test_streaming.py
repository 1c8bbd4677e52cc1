"""Chunk rendering from engine deltas: cumulative, delta, echo, final chunk, coalescing clock."""

from vllm_worker.engine_types import EngineUpdate, SequenceDelta, TokenLogprob
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
