"""The RunPod job handler: job input in, streamed chunks out.

``make_handler`` returns the async generator that ``runpod.serverless.start`` calls once
per job. Many jobs run at once in one event loop; the engine batches them.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm_worker.chat import render_chat
from vllm_worker.engine_types import EngineUpdate, GenerationRequest, Handler, ServingEngine
from vllm_worker.errors import InvalidInputError, job_error, openai_job_error
from vllm_worker.input_size import check_input_size, default_max_input_chars
from vllm_worker.openai_input import (
    check_request,
    is_openai_job,
    parse_openai_job,
    served_model_name,
)
from vllm_worker.schema import JobInput, parse_job_input
from vllm_worker.settings import Settings
from vllm_worker.streaming import (
    Chunk,
    ChunkBuilder,
    EmissionClock,
    FinalChunk,
    JobMetrics,
    JobStream,
)

if TYPE_CHECKING:  # openai_routes.py imports vLLM; this module must not need it
    from vllm_worker.openai_routes import OpenAIRoutes

log = logging.getLogger(__name__)


@dataclass
class _JobStats:
    """A job's times in the worker (``time.perf_counter()``) and what vLLM measured."""

    started: float
    first_token: float | None = None
    last_token: float | None = None
    queue_s: float | None = None
    cached_prompt_tokens: int | None = None

    def add(self, update: EngineUpdate, now: float) -> None:
        self.first_token = self.first_token or now
        self.last_token = now
        if update.finished:
            self.queue_s, self.cached_prompt_tokens = update.queue_s, update.cached_prompt_tokens

    def metrics(self, completion_tokens: int, now: float) -> JobMetrics:
        first = self.first_token or now
        elapsed = now - self.started
        return JobMetrics(
            time_in_queue_ms=None if self.queue_s is None else round(self.queue_s * 1000, 1),
            time_to_first_token_ms=round((first - self.started) * 1000, 1),
            generation_ms=round(((self.last_token or first) - first) * 1000, 1),
            tokens_per_s=round(completion_tokens / elapsed, 1) if elapsed > 0 else 0.0,
            cached_prompt_tokens=self.cached_prompt_tokens,
        )


@dataclass(frozen=True)
class NativeJobs:
    """Jobs of the worker's own input (the seed's ``prompt``/``messages`` and
    ``sampling_params``) on one engine: the queue's handler and the load-balancing
    server's native route both run them here."""

    engine: ServingEngine
    settings: Settings
    chat_template: str | None  # what ``messages`` render with (None: they fail, saying so)
    max_chars: int  # MAX_INPUT_CHARS, or what the longest prompt that fits can hold

    @classmethod
    def build(
        cls, engine: ServingEngine, settings: Settings, chat_template: str | None
    ) -> NativeJobs:
        max_chars = settings.max_input_chars or default_max_input_chars(
            engine.tokenizer, engine.max_model_len
        )
        log.info("a job's input may hold up to %d characters of text (MAX_INPUT_CHARS)", max_chars)
        return cls(engine, settings, chat_template, max_chars)

    async def run(self, job_id: str, raw_input: object) -> AsyncGenerator[Chunk, None]:
        """The job's chunks; ``WorkerError`` (before the first chunk for bad input)."""
        check_input_size(raw_input, self.max_chars)  # before anything reads the text
        job_input = parse_job_input(raw_input, max_n=self.settings.max_n)
        async for chunk in _run(self.engine, self.settings, self.chat_template, job_id, job_input):
            yield chunk


def make_handler(
    engine: ServingEngine,
    settings: Settings,
    chat_template: str | None,
    openai_routes: OpenAIRoutes | None = None,
) -> Handler:
    """``job_handler`` on new ``NativeJobs``."""
    return job_handler(NativeJobs.build(engine, settings, chat_template), openai_routes)


def job_handler(jobs: NativeJobs, openai_routes: OpenAIRoutes | None = None) -> Handler:
    """The handler for ``runpod.serverless.start``: one call per job. Jobs of RunPod's
    OpenAI-compatible API go to ``openai_routes`` (refused when it is None)."""

    async def handler(job: dict[str, Any]) -> AsyncIterator[Any]:
        job_id = str(job.get("id", "-"))
        if is_openai_job(job.get("input")):
            async for output in _serve_openai(
                openai_routes, jobs.settings, job_id, job["input"], jobs.max_chars
            ):
                yield output
            return
        try:
            async for chunk in jobs.run(job_id, job.get("input")):
                yield chunk
        except Exception as error:  # the one place errors become a job error
            yield job_error(error, job_id)

    return handler


async def _serve_openai(
    routes: OpenAIRoutes | None,
    settings: Settings,
    job_id: str,
    job_input: dict[str, Any],
    max_chars: int,
) -> AsyncIterator[Any]:
    try:
        check_request(job_input, max_chars)
        if routes is None:
            raise InvalidInputError("openai_route: this worker serves no OpenAI routes")
        job = parse_openai_job(
            job_input, max_n=settings.max_n, tool_calling=settings.tool_call_parser is not None
        )
        async for output in routes.serve(job):
            yield output
    except Exception as error:  # as in the handler, but as an OpenAI error object
        yield openai_job_error(error, job_id)


async def _run(
    engine: ServingEngine,
    settings: Settings,
    chat_template: str | None,
    job_id: str,
    job_input: JobInput,
) -> AsyncIterator[Chunk]:
    stats = _JobStats(started=time.perf_counter())
    prompt, prompt_token_ids = _prompt(engine, settings, chat_template, job_input)
    max_tokens = _max_tokens(job_input, len(prompt_token_ids), engine.max_model_len, settings)
    _check_min_tokens(job_input, max_tokens)
    adapter = _adapter_for(job_input.model, settings)
    request = GenerationRequest(
        # Unique even when a job id comes twice (a retried job): vLLM keys requests by id.
        request_id=f"{job_id}-{uuid.uuid4().hex[:8]}",
        prompt_token_ids=prompt_token_ids,
        sampling=job_input.sampling_params,
        max_tokens=max_tokens,
        stream=job_input.stream,
        adapter=adapter,
    )
    builder = ChunkBuilder(
        prompt=prompt,
        n=job_input.sampling_params.n,
        echo=job_input.echo,
        mode=job_input.stream_mode,
    )
    clock = EmissionClock.for_job(settings) if job_input.stream else None
    stream = JobStream(builder, clock, max_tokens)
    # The engine merges the outputs that come before the clock lets the next chunk go, so
    # that each update here is one chunk (and nothing here runs per token).
    async for update in engine.generate(request, stream.due if job_input.stream else None):
        now = time.perf_counter()
        stats.add(update, now)
        if (chunk := stream.add(update, now)) is not None:
            yield chunk
    sampling = job_input.sampling_params
    final = builder.final_chunk(
        with_logprobs=sampling.logprobs is not None,
        with_prompt_logprobs=sampling.prompt_logprobs is not None,
    )
    final["metrics"] = stats.metrics(builder.completion_tokens, time.perf_counter())
    _log_job(job_id, builder, final)
    yield final


def _prompt(
    engine: ServingEngine, settings: Settings, chat_template: str | None, job_input: JobInput
) -> tuple[str, list[int]]:
    """The prompt's text (what an echo shows) and its token ids."""
    if job_input.messages is not None:
        messages = [message.model_dump() for message in job_input.messages]
        chat = render_chat(messages, chat_template, engine.tokenizer, settings.model_name)
        prompt, prompt_token_ids = chat.text, chat.token_ids
    else:
        prompt = job_input.prompt or ""
        prompt_token_ids = engine.tokenize(prompt)
    keep = job_input.sampling_params.truncate_prompt_tokens
    if keep is not None and keep < len(prompt_token_ids):
        # The prompt's last tokens, as vLLM truncates (its tokenizers' side is the left);
        # an echo shows the prompt the model saw.
        prompt_token_ids = prompt_token_ids[-keep:]
        prompt = str(engine.tokenizer.decode(prompt_token_ids))
    return prompt, prompt_token_ids


def _max_tokens(
    job_input: JobInput, prompt_tokens: int, max_model_len: int, settings: Settings
) -> int:
    """Requested (or default) max_tokens, clipped to what fits in the context window."""
    room = max_model_len - prompt_tokens
    if room < 1:
        what = "messages: the rendered conversation" if job_input.messages else "prompt: the prompt"
        raise InvalidInputError(
            f"{what} has {prompt_tokens} tokens, but the model's context (MAX_MODEL_LEN) is "
            f"{max_model_len} tokens: at most {max_model_len - 1} prompt tokens fit"
        )
    requested = job_input.sampling_params.max_tokens or settings.default_max_tokens
    # Clipped requests end with finish_reason "length", as OpenAI's API does.
    return min(requested, room)


def _adapter_for(model: str | None, settings: Settings) -> str | None:
    """The LoRA adapter a job's ``model`` names; None for the base model (also when the job
    names none). ``InvalidInputError`` listing the names served for any other name."""
    base = served_model_name(settings)
    adapters = list(settings.lora_modules or {})
    if model is None or model in (base, settings.model_name):
        return None
    if model in adapters:
        return model
    raise InvalidInputError(
        f"model: {model!r} is not served here; served: {', '.join([base, *adapters])}"
    )


def _check_min_tokens(job_input: JobInput, max_tokens: int) -> None:
    min_tokens = job_input.sampling_params.min_tokens
    if min_tokens > max_tokens:
        raise InvalidInputError(
            f"sampling_params.min_tokens: {min_tokens} is more than the {max_tokens} tokens "
            "this job may generate (max_tokens, or what fits in MAX_MODEL_LEN after the prompt)"
        )


def _log_job(job_id: str, builder: ChunkBuilder, final: FinalChunk) -> None:
    metrics = final["metrics"]
    log.info(
        "job %s done: prompt_tokens=%d completion_tokens=%d ttft_ms=%.0f tokens_per_s=%.1f "
        "finish_reason=%s",
        job_id,
        builder.prompt_tokens,
        builder.completion_tokens,
        metrics["time_to_first_token_ms"],
        metrics["tokens_per_s"],
        ",".join(str(reason) for reason in final["finish_reason"]),
    )
