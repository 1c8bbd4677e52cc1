"""``python -m bench``: the worker measured against the raw vLLM engine.

Usage (from the repository root)::

    .venv/bin/python -m bench            # tiny model on CPU: concurrency 1,16,64, 256 tokens
    .venv/bin/python -m bench --quick    # smoke run (CI): concurrency 1,4, 32 tokens
    .venv/bin/python -m bench --model meta-llama/Llama-2-7b-chat-hf --dtype auto  # GPU box

In one run: the handler against the raw engine in process (``bench.inprocess``); the
worker through RunPod's production job loop against a loopback job API
(``bench.production``: first chunk, tokens/s, a job at a full worker, a 1 s poller's
freshness); with ``--endpoint``, HTTP clients of the local endpoint (``bench.endpoint``);
with ``--load-balancer``, HTTP streams from the worker's load-balancing server
(``bench.load_balancer``: ``--concurrency 1,32`` gives its targets);
the cold start (``bench.cold_start``); and the stream of Llama 2 length answers
(``bench.streaming``, simulated). Results: a table on stdout,
``<output>/<date>-<label>.json`` and ``.png``, the workers' logs in ``.log`` files.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench import cold_start, production, streaming
from bench.common import DEFAULT_OUTPUT, parse_numbers, progress
from bench.endpoint import run_endpoint
from bench.inprocess import Clock, Plan, engine_settings, run_engine, run_settings
from bench.load_balancer import run_load_balancer
from bench.plot import plot
from bench.report import evaluate_targets, format_report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the worker against the raw vLLM engine.",
    )
    parser.add_argument(
        "--model",
        help="MODEL_NAME, or demo: the real SmolLM2-135M-Instruct with the demo's settings "
        "(default: build the tiny model)",
    )
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
        "--endpoint", action="store_true", help="also HTTP clients of the local endpoint"
    )
    parser.add_argument(
        "--load-balancer",
        action="store_true",
        help="also HTTP streams from the worker as a load-balancing server",
    )
    parser.add_argument(
        "--no-production", action="store_true", help="skip the production job loop's runs"
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
        endpoint=args.endpoint,
        poll_interval_ms=args.poll_interval_ms,
        load_balancer=args.load_balancer,
    )
    today = datetime.datetime.now(datetime.timezone.utc)
    label = args.label or (
        ("quick-" if args.quick else "")
        + ({None: "tiny-cpu", "demo": "demo-cpu"}.get(args.model) or Path(args.model).name)
    )
    args.output.mkdir(parents=True, exist_ok=True)
    stem = args.output / f"{today:%Y-%m-%d}-{label}"
    with tempfile.TemporaryDirectory(prefix="bench-tiny-") as scratch:
        if args.model == "demo":
            from vllm_worker import demo_model

            worker_env = {**demo_model.serving_env(demo_model.ensure()), **run_settings(args)}
            os.environ.update(demo_model.VLLM_ENV)  # read by vLLM, as the demo serves it
        else:
            if args.model:
                model = args.model
            else:
                from vllm_worker.tiny_model import build

                model = str(build(Path(scratch) / "tiny-llama"))
            worker_env = engine_settings(args, model, tiny=not args.model)
        settings = Settings.from_env(worker_env)
        production_plan = production.Plan.for_run(
            "demo" if args.model == "demo" else "tiny", args.quick
        )
        report = run_engine(
            args,
            plan,
            settings=settings,
            worker_env=worker_env,
            label=label,
            today=today,
            log_path=stem.with_suffix(".log"),
            raw_extra=None
            if args.no_production
            else lambda engine: production.raw_cells(engine, production_plan),
        )
        if not args.no_production:
            progress("the worker through the production job loop:")
            report["production"] = production.report_of(
                report.pop("raw_extra"),
                production.measure_worker(
                    {**worker_env, "MAX_CONCURRENCY": str(production_plan.batch)},
                    production_plan,
                    stem.with_name(stem.name + "-production.log"),
                ),
                production_plan,
            )
        report["streaming"] = streaming.llama2_figures(settings)
        if plan.endpoint:
            endpoint_log = stem.with_name(stem.name + "-endpoint.log")
            report["results"] += run_endpoint(plan, worker_env, report["results"], endpoint_log)
        if plan.load_balancer:
            lb_log = stem.with_name(stem.name + "-load-balancer.log")
            report["results"] += run_load_balancer(plan, worker_env, report["results"], lb_log)
        if not args.no_cold_start:
            progress("measuring the cold start (a fresh process):")
            report["cold_start"] = cold_start.measure(worker_env)
    report["targets"] = evaluate_targets(report, plan)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    if not args.no_plot:
        plot(report, stem.with_suffix(".png"))
    print(format_report(report))
    print(f"\nwrote {stem}.json" + ("" if args.no_plot else f" and {stem}.png"))
    return 0


if __name__ == "__main__":  # vLLM spawns its engine processes: keep everything behind this
    sys.exit(main())
