"""The benchmark's load-balancing mode: HTTP streams from the worker's own server.

``python -m bench --load-balancer`` runs this after its in-process engine has stopped. It
starts ``src/handler.py`` with ``ENDPOINT_TYPE=load_balancer`` on a loopback port (its own
engine, as RunPod runs it) and plays HTTP clients against it, each job the same prompt,
sampling and ``max_tokens`` as the raw engine's:

- ``lb-completions``: vLLM's ``/v1/completions`` route, streamed (its server-sent events);
- ``lb-native``: the native route ``/generate`` with ``stream_mode: delta``.

Times are taken on the client: the first token is the first event of a token, counted
from just before the request is sent; bytes are the response bodies. ``vs_raw``
compares with the in-process raw engine at the same concurrency (the issue's targets:
first token within 5 ms of raw's, one at a time; tokens/s at least 0.97 of raw's at 32).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import job_prompts, progress, sampling_params_input
from bench.inprocess import JobTrace, Plan, best_of, row_of, summarize, versus
from vllm_worker.local_endpoint.process import own_process_group

HANDLER = Path(__file__).resolve().parent.parent / "src" / "handler.py"
START_TIMEOUT_S = 600.0
JOB_TIMEOUT_S = 600.0
MODES = ("lb-completions", "lb-native")
SERVED_NAME = "bench"  # SERVED_MODEL_NAME of the server this module starts


async def _events(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], trace: JobTrace
) -> AsyncIterator[Any]:
    """The JSON of each server-sent event of a streamed POST; the bytes counted."""
    async with session.post(url, json=body) as reply:
        reply.raise_for_status()
        async for line in reply.content:
            trace.stream_bytes += len(line)
            if line.startswith(b"data: {"):
                yield json.loads(line[6:])


async def completions_job(
    session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int, model: str
) -> JobTrace:
    body = {
        "model": model,
        "prompt": prompt,
        "stream": True,
        "stream_options": {"include_usage": True},
        **sampling_params_input(max_tokens),
    }
    trace = JobTrace(started=time.perf_counter())
    async for event in _events(session, f"{url}/v1/completions", body, trace):
        if event["choices"]:  # a token's event (its text may be empty: a partial UTF-8
            # character); the last event holds only the usage
            trace.chunk_times.append(time.perf_counter())
            text = "".join(choice["text"] for choice in event["choices"])
            trace.final_text_bytes += len(text.encode())
        if event.get("usage"):
            trace.tokens = event["usage"]["completion_tokens"]
    return trace


async def native_job(
    session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int, model: str
) -> JobTrace:
    job_input = {
        "prompt": prompt,
        "sampling_params": sampling_params_input(max_tokens),
        "stream_mode": "delta",
    }
    trace = JobTrace(started=time.perf_counter())
    async for chunk in _events(session, f"{url}/generate", {"input": job_input}, trace):
        if "error" in chunk:
            raise RuntimeError(f"native job failed: {chunk['error']}")
        trace.chunk_times.append(time.perf_counter())
        trace.final_text_bytes += len(chunk["text"][0].encode())
        if "usage" in chunk:
            trace.tokens = chunk["usage"]["completion_tokens"]
    return trace


JOBS = {"lb-completions": completions_job, "lb-native": native_job}


async def run_cell(
    url: str, mode: str, prompts: Sequence[str], concurrency: int, *, max_tokens: int, model: str
) -> dict[str, Any]:
    """``concurrency`` clients run one job per prompt back to back; one summary."""
    pending = iter(prompts)
    traces: list[JobTrace] = []
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    timeout = aiohttp.ClientTimeout(total=JOB_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client() -> None:
            for prompt in pending:
                traces.append(await JOBS[mode](session, url, prompt, max_tokens, model))

        started, cpu_started = time.perf_counter(), time.process_time()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    for trace in traces:
        if trace.tokens != max_tokens:
            raise RuntimeError(f"{mode}: a job generated {trace.tokens} != {max_tokens} tokens")
    return summarize(traces, wall_s, cpu_s)


async def run_grid(
    url: str, plan: Plan, raw_rows: Sequence[dict[str, Any]], model: str = SERVED_NAME
) -> list[dict[str, Any]]:
    """Every (concurrency, mode) cell on the server at ``url`` (serving ``model``);
    repeats interleave the modes."""
    top = max(plan.concurrency)
    prompts = job_prompts(plan.jobs(top))
    for mode in MODES:  # warm-up
        await run_cell(url, mode, prompts[:top], top, max_tokens=8, model=model)
    results = []
    for concurrency in plan.concurrency:
        runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
        for repeat in range(plan.repeats):
            for mode in MODES:
                jobs = prompts[: plan.jobs(concurrency)]
                run = await run_cell(
                    url, mode, jobs, concurrency, max_tokens=plan.max_tokens, model=model
                )
                runs[mode].append(run)
                progress(
                    f"  c={concurrency:<3} {mode:<26} run {repeat + 1}: "
                    f"{run['tokens_per_s']:8.0f} tok/s, ttft p50 {run['ttft_ms']['p50']:7.1f} ms"
                )
        raw = row_of(raw_rows, "raw", concurrency)
        for mode, mode_runs in runs.items():
            best = best_of(mode_runs)
            results.append(
                {
                    "mode": mode,
                    "kind": "load_balancer",
                    "concurrency": concurrency,
                    **best,
                    "vs_raw": versus(best, raw) if raw is not None else None,
                    "runs": mode_runs,
                }
            )
    return results


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_serving(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Until the health path answers 200 (204 while the engine starts)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the load-balancing server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=10) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the load-balancing server did not serve within {timeout_s:.0f} s")


def run_load_balancer(
    plan: Plan, worker_env: dict[str, str], raw_rows: Sequence[dict[str, Any]], log_path: Path
) -> list[dict[str, Any]]:
    """Start the worker as a load-balancing server, run the grid, stop it (SIGTERM)."""
    progress("starting the worker as a load-balancing server (another engine):")
    port = free_port()
    env = {
        **os.environ,
        **worker_env,
        "ENDPOINT_TYPE": "load_balancer",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "SERVED_MODEL_NAME": SERVED_NAME,
        "MAX_CONCURRENCY": str(max(plan.concurrency) + 8),
        "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
        "RUNPOD_SKIP_GPU_CHECK": "true",
    }
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-u", str(HANDLER)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            **own_process_group(),
        )
    try:
        wait_serving(url, proc, START_TIMEOUT_S)
        progress(f"measuring the load-balancing server ({url}):")
        return asyncio.run(run_grid(url, plan, raw_rows))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
