"""The benchmark's endpoint mode: jobs through the local endpoint, over HTTP, as a client sees them.

``python -m bench --endpoint`` runs this after its in-process engine has stopped. It starts
``python -m vllm_worker.local_endpoint`` (which runs ``src/handler.py`` in RunPod's
production mode: the runpod SDK's job loop, its HTTP posts per chunk, the worker's default
coalescing) and plays RunPod clients against it: ``POST /run``, then ``GET /stream/<id>``
until the job ends, polling again at once after a reply that carried chunks and after
``poll_interval_s`` after an empty one (as ``vllm_worker.client.EndpointClient.stream``
does). Times are taken on the client: the first chunk is the first ``/stream`` reply that
carries one, counted from just before ``POST /run``. Bytes on the wire are the HTTP bodies
of the job's requests and replies (``/run`` and every poll, empty ones included; headers
not counted), the count of requests beside them.

"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import job_prompts, progress, sampling_params_input
from bench.inprocess import JobTrace, Plan, best_of, row_of, summarize, versus
from vllm_worker.client import RUNNING, DeltaTracker
from vllm_worker.local_endpoint.harness import running_endpoint

JOB_TIMEOUT_S = 600.0


@dataclass
class EndpointTrace:
    """One job as the client saw it; times in perf_counter seconds."""

    started: float
    arrivals: list[float] = field(default_factory=list)  # replies that carried chunks
    chunks: int = 0
    tokens: int = 0
    wire_bytes: int = 0
    requests: int = 0
    final_text_bytes: int = 0


async def run_job(
    session: aiohttp.ClientSession, url: str, job_input: dict[str, Any], poll_interval_s: float
) -> EndpointTrace:
    """``POST /run``, then poll ``/stream`` until the job ends; what the client saw."""
    tracker = DeltaTracker(cumulative=job_input.get("stream_mode", "cumulative") != "delta")
    body = json.dumps({"input": job_input}).encode()
    trace = EndpointTrace(started=time.perf_counter())
    async with session.post(f"{url}/run", data=body) as reply:
        raw = await reply.read()
    trace.wire_bytes += len(body) + len(raw)
    trace.requests += 1
    job_id = json.loads(raw)["id"]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        async with session.get(f"{url}/stream/{job_id}") as reply:
            raw = await reply.read()
        now = time.perf_counter()
        trace.wire_bytes += len(raw)
        trace.requests += 1
        answer = json.loads(raw)
        chunks = [item["output"] for item in answer.get("stream", [])]
        if chunks:
            trace.arrivals.append(now)
            trace.chunks += len(chunks)
            for chunk in chunks:
                tracker.feed(chunk)
        if answer["status"] not in RUNNING:
            if answer["status"] != "COMPLETED" or tracker.final is None:
                raise RuntimeError(f"job {job_id}: {answer['status']} {answer.get('error')}")
            trace.tokens = tracker.final["usage"]["completion_tokens"]
            trace.final_text_bytes = len(tracker.texts.get(0, "").encode())
            return trace
        if not chunks:
            await asyncio.sleep(poll_interval_s)
    raise RuntimeError(f"job {job_id} still running after {JOB_TIMEOUT_S:.0f} s")


async def run_cell(
    url: str, job_inputs: list[dict[str, Any]], concurrency: int, poll_interval_s: float
) -> tuple[list[EndpointTrace], float]:
    """``concurrency`` clients run ``job_inputs`` back to back; the traces and the wall time."""
    pending = iter(job_inputs)
    traces: list[EndpointTrace] = []
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client() -> None:
            for job_input in pending:
                traces.append(await run_job(session, url, job_input, poll_interval_s))

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return traces, time.perf_counter() - started


ENDPOINT_STREAM_MODES = ("cumulative", "delta")


async def run_endpoint_grid(
    url: str, plan: Plan, prompts: Sequence[str], raw_rows: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The grid's concurrencies through the local endpoint, per stream mode, vs raw."""
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
    await run_cell(url, job_inputs(top, 8, "delta"), top, poll_s)  # warm-up
    results = []
    for concurrency in plan.concurrency:
        raw = row_of(raw_rows, "raw", concurrency)
        for stream_mode in ENDPOINT_STREAM_MODES:
            runs = []
            for repeat in range(plan.repeats):
                inputs = job_inputs(plan.jobs(concurrency), plan.max_tokens, stream_mode)
                cpu_started = time.process_time()
                traces, wall_s = await run_cell(url, inputs, concurrency, poll_s)
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
    with running_endpoint(worker_env, log_path) as endpoint:
        progress(f"measuring through the local endpoint ({endpoint.url}):")
        return asyncio.run(run_endpoint_grid(endpoint.url, plan, prompts, results))
