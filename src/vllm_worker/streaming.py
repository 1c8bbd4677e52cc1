"""Turn the engine's per-step deltas into the chunks a job streams.

The wire format is the ``llama2-7b-chat`` endpoint's: every chunk is
``{"text": [<text of sequence 0>, ..., <text of sequence n-1>]}`` where each text is
cumulative (the prompt, then everything generated so far). ``stream_mode: "delta"``
sends only what is new in each chunk instead; concatenating a sequence's deltas gives
its cumulative text. The final chunk adds ``finish_reason`` (one per sequence) and
``usage``, and ``logprobs`` when they were asked for.

Nothing here knows about vLLM: ``engine.py`` converts its outputs to ``EngineUpdate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from vllm_worker.engine_types import EngineUpdate, TokenLogprob

if TYPE_CHECKING:
    from vllm_worker.settings import Settings

StreamMode = Literal["cumulative", "delta"]
Chunk = dict[str, Any]


@dataclass
class _Sequence:
    # Text arrives in pieces that are joined once per chunk, never once per token; delta
    # mode keeps only the pieces not yet sent, cumulative mode also the text sent so far.
    sent: str = ""
    unsent: list[str] = field(default_factory=list)
    num_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


class ChunkBuilder:
    """Accumulates engine updates for one job and renders its chunks."""

    def __init__(self, *, prompt: str, n: int, echo: bool, mode: StreamMode) -> None:
        start = [prompt] if echo and prompt else []
        self._sequences = [_Sequence(unsent=list(start)) for _ in range(n)]
        self._mode = mode
        self.prompt_tokens = 0

    def add(self, update: EngineUpdate) -> None:
        self.prompt_tokens = update.prompt_tokens
        for delta in update.sequences:
            sequence = self._sequences[delta.index]
            sequence.unsent.append(delta.text)
            sequence.num_tokens += delta.num_tokens
            sequence.logprobs.extend(delta.logprobs)
            if delta.finish_reason is not None:
                sequence.finish_reason = delta.finish_reason

    @property
    def completion_tokens(self) -> int:
        return sum(sequence.num_tokens for sequence in self._sequences)

    def chunk(self) -> Chunk:
        """A streamed chunk with what has arrived since the previous chunk."""
        return {"text": self._texts()}

    def final_chunk(self, *, with_logprobs: bool) -> Chunk:
        """The last chunk: the remaining text, why each sequence stopped, and usage."""
        chunk = self.chunk()
        chunk["finish_reason"] = [sequence.finish_reason for sequence in self._sequences]
        chunk["usage"] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
        if with_logprobs:
            chunk["logprobs"] = [
                [vars(entry) for entry in sequence.logprobs] for sequence in self._sequences
            ]
        return chunk

    def _texts(self) -> list[str]:
        texts = []
        for sequence in self._sequences:
            new = "".join(sequence.unsent)
            sequence.unsent.clear()
            if self._mode == "cumulative":
                sequence.sent += new
                new = sequence.sent
            texts.append(new)
        return texts


class EmissionClock:
    """Decides when to send a chunk: the first at once, then gaps that grow with the job's age.

    After the first chunk, the next goes no sooner than ``growth`` x the job's age when the
    previous one went (its age: time since the first chunk), and never sooner than
    ``min_interval_s``; ``max_interval_s`` caps that gap. Uncapped, the chunks of a job are
    spaced geometrically (ratio ``1 + growth``), so a job of any length sends about
    ``log(age / min_interval) / log(1 + growth)`` chunks and a cumulative stream, which
    repeats all text so far in every chunk, costs at most about ``1 + (1 + growth) / growth``
    times the final text (3x at 1: gaps of 50, 50, 100, 200, 400 ms, ...) instead of growing
    with the square of its length.
    A chunk held back is not lost: its text is in the next chunk, and the final chunk is
    never held (the caller sends it without asking).
    """

    def __init__(
        self, min_interval_s: float, growth: float = 0.0, max_interval_s: float | None = None
    ) -> None:
        self._min_interval_s = min_interval_s
        self._growth = growth
        self._max_interval_s = max_interval_s
        self._first_sent: float | None = None
        self._last_sent = 0.0

    @classmethod
    def for_job(cls, settings: Settings, mode: StreamMode) -> EmissionClock:
        """The clock the settings give a job streamed in ``mode``.

        Only delta streams are capped: a delta chunk costs ~30 bytes of JSON whatever its
        length, so a cap costs little; a capped cumulative stream re-sends the whole text
        every cap, which grows with the square of the answer's length again.
        """
        cap_ms = settings.stream_delta_max_interval_ms if mode == "delta" else 0.0
        return cls(
            settings.stream_min_interval_ms / 1000,
            growth=settings.stream_interval_growth,
            max_interval_s=cap_ms / 1000 if cap_ms > 0 else None,
        )

    def interval(self) -> float:
        """The gap the next chunk must wait for, after the previous one (seconds)."""
        first = self._last_sent if self._first_sent is None else self._first_sent
        age = self._last_sent - first
        gap = self._growth * age
        if self._max_interval_s is not None:
            gap = min(gap, self._max_interval_s)
        return max(gap, self._min_interval_s)

    def should_send(self, now: float) -> bool:
        if self._first_sent is None:
            self._first_sent = now
        elif now - self._last_sent < self.interval():
            return False
        self._last_sent = now
        return True
