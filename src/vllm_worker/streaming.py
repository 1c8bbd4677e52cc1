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

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypedDict

from vllm_worker.engine_types import EngineUpdate, TokenLogprob
from vllm_worker.schema import StreamMode

if TYPE_CHECKING:
    from vllm_worker.settings import Settings


class Chunk(TypedDict):
    """A streamed chunk: one text per sequence (``n`` of them), cumulative or delta."""

    text: list[str]


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int  # all sequences together
    total_tokens: int


class LogprobEntry(TypedDict):
    token: str
    logprob: float
    top_logprobs: dict[str, float]  # the likeliest tokens at that place, the sampled one too


class JobMetrics(TypedDict):
    """How the job went, in the worker (docs/input-output.md, field by field)."""

    time_in_queue_ms: float | None  # in vLLM's scheduler queue before its first step
    time_to_first_token_ms: float  # from the job's start in the worker
    generation_ms: float  # from the first token to the last
    tokens_per_s: float  # completion tokens (all sequences) over the job's whole time
    cached_prompt_tokens: int | None  # prompt tokens vLLM's prefix cache already held


class _FinalFields(Chunk):
    finish_reason: list[str | None]  # "stop" (EOS, a stop string or token) or "length"
    usage: Usage


class FinalChunk(_FinalFields, total=False):
    """The last chunk: the rest of the text, why each sequence ended, the token counts, and
    each sequence's log-probabilities when the job asked for them."""

    logprobs: list[list[LogprobEntry]]
    prompt_logprobs: list[LogprobEntry | None]  # None for the prompt's first token
    metrics: JobMetrics


@dataclass
class _Sequence:
    # Text arrives in pieces that are joined once per chunk, never once per token; delta
    # mode keeps only the pieces not yet sent, cumulative mode also the text sent so far.
    sent: str = ""
    unsent: list[str] = field(default_factory=list)
    # Their sizes in the JSON the runpod SDK posts (UTF-8, escapes included).
    sent_bytes: int = 0
    unsent_bytes: int = 0
    num_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def add_text(self, text: str) -> None:
        self.unsent.append(text)
        self.unsent_bytes += json_bytes(text)


def _entry(logprob: TokenLogprob) -> LogprobEntry:
    return LogprobEntry(
        token=logprob.token, logprob=logprob.logprob, top_logprobs=logprob.top_logprobs
    )


def json_bytes(text: str) -> int:
    """The size of ``text`` inside a JSON string as the runpod SDK writes it
    (``json.dumps(..., ensure_ascii=False)``, sent as UTF-8), quotes left out."""
    return len(json.dumps(text, ensure_ascii=False).encode()) - 2


# {"output": {"text": []}}: what the SDK's post of a chunk adds around its texts.
_POST_OVERHEAD_BYTES = len(json.dumps({"output": {"text": []}}))


class ChunkBuilder:
    """Accumulates engine updates for one job and renders its chunks."""

    def __init__(self, *, prompt: str, n: int, echo: bool, mode: StreamMode) -> None:
        self.n = n
        self._sequences = [_Sequence() for _ in range(n)]
        if echo and prompt:
            for sequence in self._sequences:
                sequence.add_text(prompt)
        self._mode = mode
        self.prompt_tokens = 0
        self._prompt_logprobs: tuple[TokenLogprob | None, ...] = ()

    def add(self, update: EngineUpdate) -> None:
        self.prompt_tokens = update.prompt_tokens
        self._prompt_logprobs += update.prompt_logprobs
        for delta in update.sequences:
            sequence = self._sequences[delta.index]
            sequence.add_text(delta.text)
            sequence.num_tokens += delta.num_tokens
            sequence.logprobs.extend(delta.logprobs)
            if delta.finish_reason is not None:
                sequence.finish_reason = delta.finish_reason

    @property
    def completion_tokens(self) -> int:
        return sum(sequence.num_tokens for sequence in self._sequences)

    def pending_bytes(self) -> int:
        """The size of the post ``chunk()`` would make now (the SDK's JSON body)."""
        texts = sum(
            sequence.unsent_bytes + (sequence.sent_bytes if self._mode == "cumulative" else 0)
            for sequence in self._sequences
        )
        # Each text's quotes, and the ", " between texts.
        return _POST_OVERHEAD_BYTES + texts + 4 * len(self._sequences) - 2

    def chunk(self) -> Chunk:
        """A streamed chunk with what has arrived since the previous chunk."""
        return Chunk(text=self._texts())

    def final_chunk(self, *, with_logprobs: bool, with_prompt_logprobs: bool = False) -> FinalChunk:
        """The last chunk: the remaining text, why each sequence stopped, and usage."""
        chunk = FinalChunk(
            text=self._texts(),
            finish_reason=[sequence.finish_reason for sequence in self._sequences],
            usage=Usage(
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                total_tokens=self.prompt_tokens + self.completion_tokens,
            ),
        )
        if with_logprobs:
            chunk["logprobs"] = [
                [_entry(e) for e in sequence.logprobs] for sequence in self._sequences
            ]
        if with_prompt_logprobs:
            chunk["prompt_logprobs"] = [_entry(e) if e else None for e in self._prompt_logprobs]
        return chunk

    def _texts(self) -> list[str]:
        texts = []
        for sequence in self._sequences:
            new = "".join(sequence.unsent)
            sequence.unsent.clear()
            if self._mode == "cumulative":
                sequence.sent += new
                sequence.sent_bytes += sequence.unsent_bytes
                new = sequence.sent
            sequence.unsent_bytes = 0
            texts.append(new)
        return texts


class JobStream:
    """One job's stream: engine updates in, the chunks to send now out.

    ``clock`` None: a job that is not streamed (``"stream": false``), whose only chunk is
    the final one. ``max_tokens``: each sequence's limit, for the clock's estimate of how
    much of the job is done.
    """

    def __init__(self, builder: ChunkBuilder, clock: EmissionClock | None, max_tokens: int) -> None:
        self.builder = builder
        self.clock = clock
        self._most_tokens = max(1, builder.n * max_tokens)

    def due(self, now: float) -> bool:
        """Whether the engine should hand over what it holds now (asked per output)."""
        return self.clock is not None and self.clock.due(now)

    def add(self, update: EngineUpdate, now: float) -> Chunk | None:
        """Take ``update``; the intermediate chunk to send now, if one goes."""
        self.builder.add(update)
        if self.clock is None or update.finished:
            return None  # the final chunk follows
        done = min(1.0, self.builder.completion_tokens / self._most_tokens)
        if not self.clock.admit(now, self.builder.pending_bytes(), done=done):
            return None  # held back: its text goes with the next chunk
        return self.builder.chunk()


# RunPod's limit on one streamed chunk (docs.runpod.io, serverless/endpoints/
# operation-reference); its limit on a job's result is settings.RUNPOD_MAX_RESULT_BYTES.
RUNPOD_MAX_CHUNK_BYTES = 1_000_000


class EmissionClock:
    """Decides when a job's next chunk goes; one per job.

    - The first chunk goes at once.
    - Then, after each chunk, the next waits ``growth`` x the job's age (the time since
      the first chunk), at least ``min_interval_s`` and at most ``max_interval_s``: a
      short job sends few chunks (the gaps double at growth 1: 50, 50, 100, 200, 400 ms,
      ...) and a long one sends one per cap (1 s by default), so that a client polling
      every second sees new text at every poll.
    - A byte budget (``budget_bytes``: the job's intermediate chunks together) widens the
      gaps when it would not last: after a chunk of ``s`` bytes, with ``R`` bytes left and
      the job's end estimated ``T`` seconds away (from the share of its tokens written so
      far, at its pace so far), the next waits at least ``T * s / R``, so that at this
      pace the budget lasts until the end. A chunk larger than half of what is left, or
      than RunPod's 1 MB, is held back. A cumulative stream repeats all its text in every
      chunk, so its cost grows with the square of its length: this keeps it under the
      budget, spreading what it can afford over the whole job, instead of failing it.
    - The final chunk is never held (the caller sends it without asking) and is not
      counted: it is the answer itself.

    A chunk held back is not lost: its text is in the next chunk sent. ``due(now)`` is
    asked after every engine output; when it says yes, ``admit(now, size, done)`` is
    asked with the size of the chunk that would go, and records it when it goes.
    """

    def __init__(
        self,
        min_interval_s: float,
        *,
        growth: float = 0.0,
        max_interval_s: float | None = None,
        budget_bytes: int | None = None,
        max_chunk_bytes: int = RUNPOD_MAX_CHUNK_BYTES,
    ) -> None:
        self._min_interval_s = min_interval_s
        self._growth = growth
        self._max_interval_s = max_interval_s
        self._budget_bytes = budget_bytes
        self._max_chunk_bytes = max_chunk_bytes
        self._first_sent: float | None = None
        self._last_tried = 0.0  # when a chunk last went or was held back
        self._gap = 0.0  # what the next chunk waits for after that
        self.spent_bytes = 0  # the chunks sent so far

    @classmethod
    def for_job(cls, settings: Settings) -> EmissionClock:
        """The clock the settings give a streamed job (``STREAM_*``; milliseconds)."""
        cap_ms = settings.stream_max_interval_ms
        return cls(
            settings.stream_min_interval_ms / 1000,
            growth=settings.stream_interval_growth,
            max_interval_s=cap_ms / 1000 if cap_ms > 0 else None,
            budget_bytes=settings.stream_max_job_bytes,
        )

    def due(self, now: float) -> bool:
        """Whether a chunk may go now, as far as time goes (``now``: seconds, any origin)."""
        return self._first_sent is None or now - self._last_tried >= self._gap

    def admit(self, now: float, size: int, done: float = 0.0) -> bool:
        """Whether the chunk of ``size`` bytes that is due goes now (it is then counted), or
        is held back for the budget (the next try comes after another gap). ``done``: the
        share of the job's tokens written so far (0-1)."""
        self._last_tried = now
        if not self._fits(size):
            return False
        if self._first_sent is None:
            self._first_sent = now
        self.spent_bytes += size
        age = now - self._first_sent
        # The job's end, estimated from its pace so far (0 before anything is written).
        to_end = age * (1.0 - done) / done if done > 0 else 0.0
        self._gap = max(self._time_gap(age), self._budget_gap(size, to_end))
        return True

    def should_send(self, now: float) -> bool:
        """``due`` and ``admit`` for a stream whose chunks the budget does not shape (each
        costs what it adds, as delta events do)."""
        return self.due(now) and self.admit(now, 0)

    def _time_gap(self, age: float) -> float:
        gap = self._growth * age
        if self._max_interval_s is not None:
            gap = min(gap, self._max_interval_s)
        return max(gap, self._min_interval_s)

    def _left(self) -> float:
        if self._budget_bytes is None:
            return float("inf")
        return float(self._budget_bytes - self.spent_bytes)

    def _fits(self, size: int) -> bool:
        return size <= self._max_chunk_bytes and size <= self._left() / 2

    def _budget_gap(self, size: int, to_end_s: float) -> float:
        """The gap that makes what is left last ``to_end_s`` at ``size`` bytes a chunk."""
        left = self._left()
        return 0.0 if left == float("inf") else to_end_s * size / max(left, 1.0)
