"""The client's delta computation from the worker's chunks (pure; the client's HTTP side is
tested against the local endpoint in tests/e2e)."""

from vllm_worker.client import DeltaTracker, TextDelta


def test_cumulative_chunks_become_deltas() -> None:
    tracker = DeltaTracker(cumulative=True)
    assert tracker.feed({"text": ["Q: a", "Q: x"]}) == [TextDelta(0, "Q: a"), TextDelta(1, "Q: x")]
    assert tracker.feed({"text": ["Q: ab", "Q: x"]}) == [TextDelta(0, "b")]
    final = {"text": ["Q: abc", "Q: xy"], "finish_reason": ["stop", "length"], "usage": {}}
    assert tracker.feed(final) == [TextDelta(0, "c"), TextDelta(1, "y")]
    assert tracker.texts == {0: "Q: abc", 1: "Q: xy"}
    assert tracker.final == final


def test_delta_chunks_pass_through_and_accumulate() -> None:
    tracker = DeltaTracker(cumulative=False)
    assert tracker.feed({"text": ["Q: a"]}) == [TextDelta(0, "Q: a")]
    assert tracker.feed({"text": [""]}) == []
    assert tracker.feed({"text": ["bc"], "usage": {"total_tokens": 3}}) == [TextDelta(0, "bc")]
    assert tracker.texts == {0: "Q: abc"}
    assert tracker.final is not None
