"""The worker's seams, free of vLLM: what crosses between the engine and the rest.

``engine.py`` turns these into vLLM calls and vLLM outputs into them, so that the
handler, the chunk builder, the job loop and their tests need no vLLM import.
``ServingEngine`` is what they need of the engine (``engine.Engine`` is the real one; the
handler's unit tests script a fake one), and ``Handler`` is what a job handler is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from vllm_worker.schema import SamplingParamsInput

# A job handler: the job ({"id", "input"}) in, its outputs out (chunks; for an OpenAI
# route, response objects or server-sent-event text).
Handler = Callable[[dict[str, Any]], AsyncIterator[Any]]


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request, ready for the engine."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParamsInput
    max_tokens: int
    stream: bool
    adapter: str | None = None  # a LoRA adapter's name (LORA_MODULES); None: the base model


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
    # The prompt's log-probabilities, once (when asked for): None for its first token.
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()
    # Reported by vLLM with the last update (None where it reports nothing): the time the
    # request waited in its scheduler's queue, and the prompt tokens its prefix cache held.
    queue_s: float | None = None
    cached_prompt_tokens: int | None = None


@dataclass(frozen=True)
class EngineLoad:
    """The engine scheduler's state after its latest step (vLLM's ``SchedulerStats``)."""

    running: int  # requests being generated
    waiting: int  # requests in the scheduler's queue (no room for them yet)
    kv_cache_usage: float  # fraction of the KV cache in use, 0-1
    max_running: int  # the most requests it runs at once (MAX_NUM_SEQS)


class ServingEngine(Protocol):
    """What the handler, the job loop and the life cycle use of the engine."""

    max_model_len: int

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer (chat templates, encode, decode)."""

    def tokenize(self, text: str) -> list[int]:
        """A prompt's token ids, with the BOS token the model expects."""

    def generate(
        self, request: GenerationRequest, emit: Callable[[float], bool] | None = None
    ) -> AsyncIterator[EngineUpdate]:
        """The request's progress; ``emit(now)`` says when to hand over merged outputs."""

    def load(self) -> EngineLoad | None:
        """The scheduler's state after its latest step."""

    def add_load_listener(self, listener: Callable[[EngineLoad], None]) -> None:
        """Call ``listener`` after every engine step."""

    def is_dead(self) -> bool:
        """Whether the engine can serve no more."""
