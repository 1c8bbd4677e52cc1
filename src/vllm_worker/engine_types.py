"""The types that cross between the engine and the worker, free of vLLM.

``engine.py`` turns them into vLLM calls and vLLM outputs into them, so that the
handler, the chunk builder and their tests need no vLLM import.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_worker.schema import SamplingParamsInput


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request, ready for the engine."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParamsInput
    max_tokens: int
    stream: bool


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top_logprobs: dict[str, float]


@dataclass(frozen=True)
class SequenceDelta:
    """What one sequence gained in one engine step."""

    index: int
    text: str
    num_tokens: int
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class EngineUpdate:
    """One engine output for a request: the deltas of the sequences that progressed."""

    prompt_tokens: int
    sequences: tuple[SequenceDelta, ...]
    finished: bool
