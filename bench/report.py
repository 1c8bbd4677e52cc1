"""The benchmark's targets and its report: one table formatter for every table."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from bench import cold_start, production, streaming
from bench.common import table
from bench.inprocess import Mode, Plan, row_of

TARGET_TOKENS_RATIO = 0.97


TARGET_TTFT_DELTA_MS = 5.0


TARGET_CUMULATIVE_BYTES_RATIO = 4.0


TARGET_DELTA_BYTES_RATIO = 1.5


TARGET_WORKER_COLD_START_MS = 1000.0

# Load-balancing mode (issue 23): one request at a time, and many at once.
TARGET_LB_TTFT_DELTA_MS = 5.0
TARGET_LB_TOKENS_RATIO = 0.97
LB_CONCURRENCY = 32


def evaluate_targets(report: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """The issue's targets, each with the measured value and whether it is met."""
    results, default = report["results"], plan.default_clock
    top = max(plan.concurrency)
    handler_default = Mode("handler", "cumulative", default).name
    targets: dict[str, Any] = {}
    row = row_of(results, handler_default, top)
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
        if (row := row_of(results, handler_default, concurrency)) is not None
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
    targets.update(_load_balancer_targets(results, plan))
    cold = report.get("cold_start")
    if cold is not None:
        share = cold["worker_share_ms"]
        targets["worker_cold_start_ms"] = {
            "value": share,
            "target": f"< {TARGET_WORKER_COLD_START_MS:g}",
            "met": share < TARGET_WORKER_COLD_START_MS,
        }
    return targets


def _load_balancer_targets(
    results: Sequence[dict[str, Any]], plan: Plan
) -> dict[str, dict[str, Any]]:
    """First token over HTTP one at a time, within 5 ms of raw's; tokens/s at 32 (or the
    run's highest concurrency) at least 0.97 of raw's; for each HTTP route measured."""
    targets: dict[str, dict[str, Any]] = {}
    many = LB_CONCURRENCY if LB_CONCURRENCY in plan.concurrency else max(plan.concurrency)
    modes = sorted({row["mode"] for row in results if row["kind"] == "load_balancer"})
    for mode in modes:
        one = row_of(results, mode, 1)
        if one is not None and one["vs_raw"] is not None:
            delta = one["vs_raw"]["ttft_p50_delta_ms"]
            targets[f"{mode}_ttft_p50_delta_ms_at_1"] = {
                "value": delta,
                "target": f"<= {TARGET_LB_TTFT_DELTA_MS} ms",
                "met": delta <= TARGET_LB_TTFT_DELTA_MS,
            }
        row = row_of(results, mode, many)
        if row is not None and row["vs_raw"] is not None:
            ratio = row["vs_raw"]["tokens_per_s_ratio"]
            targets[f"{mode}_tokens_per_s_ratio_at_{many}"] = {
                "value": ratio,
                "target": f">= {TARGET_LB_TOKENS_RATIO}",
                "met": ratio >= TARGET_LB_TOKENS_RATIO,
            }
    return targets


def _speed_cells(row: dict[str, Any]) -> list[Any]:
    """The columns every speed table starts with: mode, concurrency, tokens/s, first chunk."""
    vs_raw = row["vs_raw"] or {}  # None: no raw cell at this concurrency
    return [
        row["mode"],
        row["concurrency"],
        row["tokens_per_s"],
        vs_raw.get("tokens_per_s_ratio", "-"),
        row["ttft_ms"]["p50"],
        row["ttft_ms"]["p95"],
        vs_raw.get("ttft_p50_delta_ms", "-"),
    ]


_HTTP_KINDS = ("endpoint", "load_balancer")
_SPEED_HEADER = ["mode", "conc", "tok/s", "x raw", "ttft p50", "p95", "+raw"]


def format_grid(rows: Sequence[dict[str, Any]]) -> str:
    header = [*_SPEED_HEADER, "gap p50", "p95", "chunks", "bytes/job", "x text"]
    return table(
        [*header, "cpu us/tok", "+raw"],
        [
            [
                *_speed_cells(row),
                row["gap_ms"]["p50"],
                row["gap_ms"]["p95"],
                row["chunks_per_job"],
                row["bytes_per_job"],
                row["bytes_over_final_text"],
                row["cpu_us_per_token"],
                row["vs_raw"]["cpu_us_per_token_delta"],
            ]
            for row in rows
        ],
    )


def format_endpoint(rows: Sequence[dict[str, Any]]) -> str:
    return table(
        [*_SPEED_HEADER, "chunks", "requests", "bytes/job", "x text"],
        [
            [
                *_speed_cells(row),
                row["chunks_per_job"],
                row["requests_per_job"],
                row["bytes_per_job"],
                row["bytes_over_final_text"],
            ]
            for row in rows
        ],
    )


def format_http(rows: Sequence[dict[str, Any]]) -> str:
    return table(
        [*_SPEED_HEADER, "chunks", "gap p50"],
        [[*_speed_cells(row), row["chunks_per_job"], row["gap_ms"]["p50"]] for row in rows],
    )


def format_bytes(rows: Sequence[dict[str, Any]]) -> str:
    return table(
        ["mode", "conc", "chunks", "bytes/job", "final text", "x text", "aggregate"],
        [
            [
                row["mode"],
                row["concurrency"],
                row["chunks_per_job"],
                row["bytes_per_job"],
                row["final_text_bytes_per_job"],
                row["bytes_over_final_text"],
                row["aggregate_bytes_per_job"],
            ]
            for row in rows
        ],
    )


def format_targets(targets: dict[str, Any]) -> str:
    rows = []
    for name, target in targets.items():
        value = target["value"]
        if isinstance(value, dict):
            value = ", ".join(f"c={key}: {number:.2f}" for key, number in value.items())
        rows.append([name, value, str(target["target"]), "met" if target["met"] else "NOT met"])
    return table(["target", "value", "target", "verdict"], rows)


def format_report(report: dict[str, Any]) -> str:
    machine, parameters = report["machine"], report["parameters"]
    parts = [
        f"bench {report['label']}, {report['date']}: {report['model']} ({report['dtype']}), "
        f"vLLM {report['vllm_version']}, {machine['cpu_model']} x{machine['cpus']}"
        + (f", {machine['gpu']}" if machine.get("gpu") else ""),
        f"in process: {parameters['max_tokens']} tokens per job (ignore_eos), best of "
        f"{parameters['repeats']} runs per cell; ttft/gap in ms; 'x raw' = tokens/s over "
        "raw's; '+raw' = minus raw's; bytes = the SDK's stream post bodies per job; "
        "cpu = this process's CPU time per output token",
        "",
        format_grid([row for row in report["results"] if row["kind"] not in _HTTP_KINDS]),
        "",
        f"bytes per job, {parameters['bytes_max_tokens']}-token answers "
        "('x text' = stream bytes over the final text; aggregate = the SDK's final post):",
        format_bytes(report["bytes"]),
    ]
    endpoint_rows = [row for row in report["results"] if row["kind"] == "endpoint"]
    lb_rows = [row for row in report["results"] if row["kind"] == "load_balancer"]
    if lb_rows:
        parts += [
            "",
            "HTTP streams, side by side: the load-balancing server (lb-completions: vLLM's "
            "/v1/completions; lb-native: /generate, delta) and the queue's local endpoint "
            "(endpoint-*, when measured); ttft = the first event of a token, as the client "
            "sees it; x raw, +raw: against the in-process raw engine:",
            format_http(sorted(lb_rows + endpoint_rows, key=lambda row: row["concurrency"])),
        ]
    if endpoint_rows:
        parts += [
            "",
            f"through the local endpoint (HTTP; a client polls /stream, again at once after "
            f"chunks, after {parameters['poll_interval_ms']:g} ms after an empty reply; ttft as "
            "the client sees it; bytes = HTTP bodies per job; x raw, +raw: against the "
            "in-process raw engine):",
            format_endpoint(endpoint_rows),
        ]
    if report.get("production"):
        parts += ["", production.format_report(report["production"])]
    if report.get("streaming"):
        parts += ["", streaming.format_figures(report["streaming"])]
    if report.get("cold_start"):
        parts += ["", cold_start.format_report(report["cold_start"])]
    parts += ["", "targets (issues 7 and 23):", format_targets(report["targets"])]
    return "\n".join(parts)
