"""What a job's stream looks like under the emission rule, simulated with a steady engine.

``simulate`` drives the worker's own ``ChunkBuilder``, ``EmissionClock`` and ``JobStream``
with an injected clock: an engine that writes ``tokens_per_s`` tokens a second per
sequence, one engine output per token. No engine and no timing: the figures are exact for
that pace, which is how the README gives them for a Llama 2 length answer on a GPU.

    .venv/bin/python -m bench.streaming       # 1,000 tokens at 30 tokens/s, default settings
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.common import table
from vllm_worker.engine_types import EngineUpdate, SequenceDelta
from vllm_worker.schema import StreamMode
from vllm_worker.settings import Settings
from vllm_worker.streaming import Chunk, ChunkBuilder, EmissionClock, JobStream

# About 4.3 bytes of English text per Llama 2 token.
TOKEN_TEXT = " tok"


@dataclass
class SimulatedStream:
    """A job's intermediate chunks (times in seconds from the job's start) and its final one."""

    times: list[float] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # each chunk's post, in bytes
    final: Chunk = field(default_factory=dict)
    duration_s: float = 0.0

    def texts(self, mode: StreamMode) -> list[str]:
        """Each sequence's whole text, as a client rebuilds it from the stream."""
        if mode == "cumulative":
            return list(self.final["text"])
        chunks = [*self.chunks, self.final]
        return [
            "".join(chunk["text"][index] for chunk in chunks)
            for index in range(len(chunks[0]["text"]))
        ]

    @property
    def gaps(self) -> list[float]:
        return [later - earlier for earlier, later in itertools.pairwise(self.times)]


def simulate(
    clock: EmissionClock,
    *,
    tokens: int,
    tokens_per_s: float,
    text_per_token: str = TOKEN_TEXT,
    n: int = 1,
    prompt: str = "A prompt. ",
    mode: StreamMode = "cumulative",
) -> SimulatedStream:
    """A job of ``n`` sequences of ``tokens`` tokens, streamed as the handler streams it."""
    builder = ChunkBuilder(prompt=prompt, n=n, echo=True, mode=mode)
    stream, result = JobStream(builder, clock, tokens), SimulatedStream()
    held: list[SequenceDelta] = []  # what the engine merges while the clock says no
    for number in range(1, tokens + 1):
        now = number / tokens_per_s
        last = number == tokens
        reason = "length" if last else None
        held += [SequenceDelta(index, text_per_token, 1, reason) for index in range(n)]
        if not (last or stream.due(now)):
            continue
        update = EngineUpdate(prompt_tokens=5, sequences=tuple(held), finished=last)
        held = []
        if (chunk := stream.add(update, now)) is not None:
            result.times.append(now)
            result.chunks.append(chunk)
            result.sizes.append(post_bytes(chunk))
    result.final = builder.final_chunk(with_logprobs=False)
    result.duration_s = tokens / tokens_per_s
    return result


def post_bytes(chunk: Chunk) -> int:
    """The size of the runpod SDK's post of ``chunk`` (``{"output": chunk}``)."""
    return len(json.dumps({"output": chunk}, ensure_ascii=False).encode())


def polls_with_new_text(times: Sequence[float], duration_s: float, every_s: float = 1.0) -> float:
    """The share of a client's polls (one every ``every_s`` while the job runs) that find a
    chunk sent since the previous poll."""
    polls = [every_s * k for k in range(1, int(duration_s / every_s) + 1)]
    fresh = sum(any(poll - every_s < at <= poll for at in times) for poll in polls)
    return fresh / len(polls) if polls else 1.0


def figures(settings: Settings, **job: Any) -> dict[str, Any]:
    """The stream of one simulated job under ``settings``: chunks, gaps, freshness, bytes."""
    stream = simulate(EmissionClock.for_job(settings), **job)
    final_text = sum(len(text.encode()) for text in stream.texts(job.get("mode", "cumulative")))
    streamed = sum(stream.sizes) + post_bytes(stream.final)
    return {
        "job": job,
        "duration_s": stream.duration_s,
        "chunks": len(stream.chunks) + 1,
        "first_chunk_s": stream.times[0] if stream.times else None,
        "longest_gap_s": max(stream.gaps, default=0.0),
        "polls_with_new_text": polls_with_new_text(stream.times, stream.duration_s),
        "intermediate_bytes": sum(stream.sizes),
        "stream_bytes": streamed,
        "final_text_bytes": final_text,
        "bytes_over_final_text": streamed / final_text,
    }


LLAMA2_ANSWERS = {
    "1,000 tokens at 30 tokens/s": {"tokens": 1000, "tokens_per_s": 30.0},
    "4,000 tokens at 30 tokens/s": {"tokens": 4000, "tokens_per_s": 30.0},
    "4,000 tokens at 30 tokens/s, n=16": {"tokens": 4000, "tokens_per_s": 30.0, "n": 16},
}


def format_figures(rows: dict[str, dict[str, Any]]) -> str:
    return table(
        ["simulated job", "chunks", "first (s)", "gap max (s)", "fresh polls", "kB", "x text"],
        [
            [
                name,
                row["chunks"],
                row["first_chunk_s"] or 0.0,
                row["longest_gap_s"],
                f"{row['polls_with_new_text']:.0%}",
                row["stream_bytes"] / 1000,
                row["bytes_over_final_text"],
            ]
            for name, row in rows.items()
        ],
    )


def llama2_figures(settings: Settings) -> dict[str, dict[str, Any]]:
    """The streams of Llama 2 length answers under ``settings``, in both stream modes."""
    return {
        f"{name} ({mode})": figures(settings, **job, mode=mode)
        for name, job in LLAMA2_ANSWERS.items()
        for mode in ("cumulative", "delta")
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.streaming",
        description="The stream of Llama 2 length answers under the default settings "
        "(simulated: an engine writing a steady number of tokens a second).",
    )
    parser.parse_args(argv)
    print(format_figures(llama2_figures(Settings())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
