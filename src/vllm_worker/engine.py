"""Everything that talks to vLLM's engine: start it, submit a request, stream its outputs.

This module, ``engine_args`` and ``openai_routes`` (vLLM's own OpenAI serving classes) are
the only ones that import vLLM: an import-linter contract in pyproject.toml checks it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from vllm import AsyncLLMEngine, SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError
from vllm.v1.metrics.loggers import StatLoggerBase

from vllm_worker.engine_args import build_engine_args
from vllm_worker.engine_types import (
    EngineLoad,
    EngineUpdate,
    GenerationRequest,
    SequenceDelta,
    TokenLogprob,
)
from vllm_worker.errors import ENGINE_DEAD_MESSAGE, EngineError, InvalidInputError
from vllm_worker.schema import SamplingParamsInput
from vllm_worker.settings import Settings

log = logging.getLogger(__name__)

# How long the engine core gets to stop after SIGTERM (vLLM's default is 5 s): with the
# grace period before it, a worker's stop fits Docker's 10 s before SIGKILL.
ENGINE_STOP_TIMEOUT_S = 2.0


class Engine:
    """One vLLM ``AsyncLLMEngine`` shared by every job of the worker."""

    def __init__(
        self,
        engine: Any,
        tokenizer: Any,
        max_model_len: int,
        load: _LoadRecorder | None = None,
        adapters: dict[str, str] | None = None,
    ) -> None:
        # vLLM's engine (its EngineClient): what vLLM's own serving classes take (the
        # OpenAI routes), and what tests and benchmarks compare the worker against. None
        # once shut down.
        self.client = engine
        self._tokenizer = tokenizer
        self.max_model_len = max_model_len
        self._load = load
        self._aborts: set[asyncio.Future[None]] = set()  # abort calls in flight
        # LoRA adapters by name (LORA_MODULES, their local folders); vLLM loads each the
        # first time a request asks for it.
        self.adapters: dict[str, LoRARequest] = {
            name: LoRARequest(lora_name=name, lora_int_id=number, lora_path=folder)
            for number, (name, folder) in enumerate((adapters or {}).items(), start=1)
        }

    @classmethod
    def start(cls, settings: Settings) -> Engine:
        """Load the model and start the engine's processes (seconds to minutes)."""
        load = _LoadRecorder(settings.max_num_seqs)
        # A stat logger of our own turns on the scheduler's stats without vLLM's default
        # loggers (no periodic log lines); it keeps the latest for admission.
        engine = AsyncLLMEngine.from_engine_args(
            build_engine_args(settings), stat_loggers=[lambda _config, _index: load]
        )
        return cls(
            engine,
            engine.get_tokenizer(),
            engine.model_config.max_model_len,
            load,
            settings.lora_modules,
        )

    def load(self) -> EngineLoad | None:
        """The scheduler's state after its latest step (None before the first one)."""
        return None if self._load is None else self._load.latest

    def add_load_listener(self, listener: Callable[[EngineLoad], None]) -> None:
        """Call ``listener(load)`` after every engine step, in the event loop the engine's
        outputs are read in. It must be quick: it runs once per step."""
        if self._load is not None:
            self._load.listeners.append(listener)

    def is_dead(self) -> bool:
        """True once the engine cannot serve any more (its core process died, its output
        loop failed, or it was shut down): only a new process can serve again."""
        return self.client is None or bool(self.client.errored)

    @property
    def tokenizer(self) -> Any:
        """The engine's Hugging Face tokenizer (chat templates, encode, decode)."""
        return self._tokenizer

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a prompt, with the BOS token the model expects."""
        return list(self._tokenizer.encode(text))

    async def generate(
        self, request: GenerationRequest, emit: Callable[[float], bool] | None = None
    ) -> AsyncIterator[EngineUpdate]:
        """Submit ``request`` and yield its progress; cancelling the caller aborts it.

        ``emit(now)`` (``now`` from ``time.perf_counter()``) is asked after every engine
        output that does not end the request; while it says no, outputs are held and
        yielded merged with the next one (as vLLM merges the outputs of a caller that has
        not read them yet). The caller's work is then per update it wants, not per token.
        """
        prompt = TokensPrompt(prompt_token_ids=request.prompt_token_ids)
        held: dict[int, list[Any]] = {}  # sequence index -> its completions not yet yielded
        progress = _Progress(request.request_id)
        outputs: Any = None
        try:
            with self._aborted_if_abandoned(progress):
                # Inside the try: SamplingParams checks some values itself as it is built.
                params = _to_vllm_params(request)
                lora = self.adapters[request.adapter] if request.adapter else None
                outputs = self.client.generate(
                    prompt, params, request.request_id, lora_request=lora
                )
                async for output in outputs:
                    _check_not_failed(output, request)
                    for completion in output.outputs:
                        held.setdefault(completion.index, []).append(completion)
                        progress.tokens += len(completion.token_ids)
                    if output.finished or emit is None or emit(time.perf_counter()):
                        yield _to_update(output, held, self._tokenizer)
                        held = {}
        except (asyncio.CancelledError, GeneratorExit):
            # Cancelled while waiting on vLLM, its generator has aborted the request
            # already; closed at a yield (here), it aborts it as it is closed now.
            if outputs is not None:
                await outputs.aclose()
            progress.log_abort("")
            raise
        except VLLMValidationError as error:
            # Values only the engine can check (e.g. token ids outside the vocabulary, a
            # regex or a schema its structured output backend cannot compile). args[0]:
            # the message without str()'s "value=...", which may be the client's text
            # (bad_words): errors are logged.
            field = _field_of(error, request.sampling)
            raise InvalidInputError(f"{field}: {_shortened(str(error.args[0]))}") from None
        except (EngineDeadError, EngineGenerateError):
            if not self.is_dead():
                raise  # one request failed, not the engine: an internal error
            raise EngineError(ENGINE_DEAD_MESSAGE) from None

    @contextlib.contextmanager
    def _aborted_if_abandoned(self, progress: _Progress) -> Iterator[None]:
        """Abort the request if the caller's task ends while the request runs.

        vLLM aborts a request whose generator is cancelled or closed. A task cancelled
        while it awaits something else (the runpod SDK posting a chunk) leaves the
        generator suspended until garbage collection closes it; this aborts it at once.
        """
        caller = asyncio.current_task()
        live = True

        def abort_if_abandoned(_task: asyncio.Task[Any]) -> None:
            if live:
                aborting = asyncio.ensure_future(self._abort(progress))
                self._aborts.add(aborting)  # a reference until it is done
                aborting.add_done_callback(self._aborts.discard)

        if caller is not None:
            caller.add_done_callback(abort_if_abandoned)
        try:
            yield
        finally:
            live = False
            if caller is not None:
                caller.remove_done_callback(abort_if_abandoned)

    async def _abort(self, progress: _Progress) -> None:
        if self.client is not None and not self.is_dead():
            await self.client.abort(progress.request_id)
            progress.log_abort(" (its job's task ended)")

    def shutdown(self) -> None:
        """Stop the engine's processes (they would outlive a killed parent); those that do
        not stop within ``ENGINE_STOP_TIMEOUT_S`` are killed: the worker is exiting."""
        if self.client is None:
            return
        try:
            self.client.shutdown(timeout=ENGINE_STOP_TIMEOUT_S)
        except Exception:  # a dead engine's: its processes are gone or going anyway
            log.warning("stopping the engine failed", exc_info=True)
        # Drop the engine now: its __del__ shuts down again, which fails noisily when
        # it only runs at interpreter exit.
        self.client = None


@dataclass
class _Progress:
    """A request's progress, for the log line that says it was aborted (no text)."""

    request_id: str
    tokens: int = 0
    aborted: bool = False

    def log_abort(self, why: str) -> None:
        if not self.aborted:
            self.aborted = True
            log.info("request %s aborted after %d tokens%s", self.request_id, self.tokens, why)


class _LoadRecorder(StatLoggerBase):  # type: ignore[misc]
    """Keeps the scheduler's latest stats (vLLM calls ``record`` after every step)."""

    def __init__(self, max_running: int) -> None:  # vLLM's own loggers get its config
        self.max_running = max_running
        self.latest: EngineLoad | None = None
        self.listeners: list[Callable[[EngineLoad], None]] = []

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is None:
            return
        self.latest = load = EngineLoad(
            running=scheduler_stats.num_running_reqs,
            waiting=scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs,
            kv_cache_usage=scheduler_stats.kv_cache_usage,
            max_running=self.max_running,
        )
        for listener in self.listeners:
            try:
                listener(load)
            except Exception:  # this runs in vLLM's output loop: a raise would kill it
                log.exception("an engine load listener failed")

    def log_engine_initialized(self) -> None:
        pass


def _field_of(error: VLLMValidationError, sampling: SamplingParamsInput) -> str:
    """The input field a validation error of vLLM's is about."""
    if error.parameter:
        return f"sampling_params.{error.parameter}"
    if sampling.structured_outputs is not None:  # vLLM names no field for its own checks
        return f"sampling_params.structured_outputs.{sampling.structured_outputs.form}"
    return "input"


def _shortened(message: str, limit: int = 300) -> str:
    """A backend's message, cut to ``limit`` characters (a grammar compiler's may quote the
    whole grammar; the error's lines are joined as every ``WorkerError``'s are)."""
    return message if len(message) <= limit else message[: limit - 3] + "..."


def _check_not_failed(output: Any, request: GenerationRequest) -> None:
    """vLLM ends a request it could not serve, alone, with finish_reason "error" (e.g. a
    structured output grammar its engine core failed to compile): the job fails."""
    if output.finished and any(c.finish_reason == "error" for c in output.outputs):
        what = "its structured output" if request.sampling.structured_outputs else "the request"
        raise EngineError(f"the engine could not serve {what}; the worker log says why")


def _structured_outputs(sampling: SamplingParamsInput) -> StructuredOutputsParams | None:
    wanted = sampling.structured_outputs
    if wanted is None:
        return None
    return StructuredOutputsParams(**{wanted.form: wanted.form_value(wanted.form)})


def _to_vllm_params(request: GenerationRequest) -> SamplingParams:
    sampling = request.sampling
    logit_bias = sampling.logit_bias
    return SamplingParams(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        min_p=sampling.min_p,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        repetition_penalty=sampling.repetition_penalty,
        seed=sampling.seed,
        stop=sampling.stop,
        stop_token_ids=sampling.stop_token_ids,
        bad_words=sampling.bad_words,
        ignore_eos=sampling.ignore_eos,
        max_tokens=request.max_tokens,
        min_tokens=sampling.min_tokens,
        logprobs=sampling.logprobs,
        skip_special_tokens=sampling.skip_special_tokens,
        spaces_between_special_tokens=sampling.spaces_between_special_tokens,
        include_stop_str_in_output=sampling.include_stop_str_in_output,
        logit_bias={int(key): bias for key, bias in logit_bias.items()} if logit_bias else None,
        allowed_token_ids=sampling.allowed_token_ids,
        prompt_logprobs=sampling.prompt_logprobs,
        structured_outputs=_structured_outputs(sampling),
        # Deltas: the engine sends only new tokens, merging steps the worker has not
        # read yet, so a busy worker never copies the whole text per token.
        output_kind=RequestOutputKind.DELTA if request.stream else RequestOutputKind.FINAL_ONLY,
    )


def _to_update(output: Any, held: dict[int, list[Any]], tokenizer: Any) -> EngineUpdate:
    """One update from ``output`` and the completions held back before it."""
    return EngineUpdate(
        prompt_tokens=len(output.prompt_token_ids or ()),
        sequences=tuple(
            _to_delta(index, completions, tokenizer) for index, completions in held.items()
        ),
        finished=output.finished,
        prompt_logprobs=_to_prompt_logprobs(output, tokenizer),
        **(_request_stats(output) if output.finished else {}),
    )


def _request_stats(output: Any) -> dict[str, Any]:
    """What vLLM measured of a finished request: the queue wait (its engine core's clock;
    kept while the worker's stat logger keeps vLLM's stats on) and prefix cache hits."""
    stats = output.metrics
    waited = stats is not None and stats.scheduled_ts > 0 and stats.queued_ts > 0
    return {
        "queue_s": max(0.0, stats.scheduled_ts - stats.queued_ts) if waited else None,
        "cached_prompt_tokens": output.num_cached_tokens,
    }


def _to_prompt_logprobs(output: Any, tokenizer: Any) -> tuple[TokenLogprob | None, ...]:
    """The prompt's logprobs, in the one output that brings them (None for the first
    token, which nothing comes before)."""
    if not output.prompt_logprobs:
        return ()
    return tuple(
        None if candidates is None else _token_logprob(token_id, candidates, tokenizer)
        for token_id, candidates in zip(
            output.prompt_token_ids, output.prompt_logprobs, strict=False
        )
    )


def _to_delta(index: int, completions: list[Any], tokenizer: Any) -> SequenceDelta:
    """One sequence's consecutive delta completions, merged."""
    last = completions[-1]
    if len(completions) == 1:  # the usual case, once per chunk
        text, num_tokens = last.text, len(last.token_ids)
    else:
        text = "".join(completion.text for completion in completions)
        num_tokens = sum(len(completion.token_ids) for completion in completions)
    logprobs: tuple[TokenLogprob, ...] = ()
    for completion in completions:
        if completion.logprobs:
            logprobs += _to_logprobs(completion, tokenizer)
    return SequenceDelta(
        index=index,
        text=text,
        num_tokens=num_tokens,
        finish_reason=last.finish_reason,
        logprobs=logprobs,
    )


def _to_logprobs(completion: Any, tokenizer: Any) -> tuple[TokenLogprob, ...]:
    return tuple(
        _token_logprob(token_id, candidates, tokenizer)
        for token_id, candidates in zip(completion.token_ids, completion.logprobs, strict=False)
    )


def _token_logprob(token_id: int, candidates: Any, tokenizer: Any) -> TokenLogprob:
    """One token's logprob and its place's likeliest tokens (``candidates``: vLLM's
    ``{token id: Logprob}``, the token itself among them)."""
    chosen = candidates[token_id]
    return TokenLogprob(
        token=_token_text(chosen, token_id, tokenizer),
        logprob=chosen.logprob,
        top_logprobs={
            _token_text(candidate, candidate_id, tokenizer): candidate.logprob
            for candidate_id, candidate in candidates.items()
        },
    )


def _token_text(logprob: Any, token_id: int, tokenizer: Any) -> str:
    if logprob.decoded_token is not None:
        return str(logprob.decoded_token)
    return str(tokenizer.decode([token_id]))
