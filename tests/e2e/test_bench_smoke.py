"""`python -m bench.run --quick`: the benchmark runs end to end and writes its results.

Only errors fail this test, never speed: the numbers are checked to exist and be
positive, not to meet the issue's targets (CI machines are shared and noisy).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

from helpers import REPO_ROOT

BENCH_TIMEOUT_S = 600
MODES = {
    "raw",
    "handler-cumulative",  # the default coalescing
    "handler-delta",
    "handler-cumulative-0ms",  # a chunk per engine output
    "handler-delta-0ms",
    "endpoint-cumulative",  # through the local endpoint, over HTTP
    "endpoint-delta",
}


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_quick_benchmark_writes_its_results(worker_env: dict[str, str], tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--output", str(tmp_path)],
        cwd=REPO_ROOT,
        env=worker_env,
        capture_output=True,
        text=True,
        timeout=BENCH_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (json_path,) = tmp_path.glob("*-quick-tiny-cpu.json")
    assert json_path.with_suffix(".png").stat().st_size > 0
    report = json.loads(json_path.read_text())

    assert {"machine", "model", "dtype", "vllm_version", "date", "parameters"} <= set(report)
    assert report["machine"]["cpu_model"]
    assert report["parameters"]["concurrency"] == [1, 4]

    rows = report["results"]
    assert {(row["mode"], row["concurrency"]) for row in rows} == {
        (mode, concurrency) for mode in MODES for concurrency in (1, 4)
    }
    for row in rows:
        for key in ("tokens_per_s", "chunks_per_job", "bytes_per_job", "cpu_us_per_token"):
            assert positive(row[key]), (row["mode"], key, row[key])
        assert positive(row["ttft_ms"]["p50"]) and positive(row["ttft_ms"]["p95"])
        assert positive(row["vs_raw"]["tokens_per_s_ratio"])
        assert row["tokens"] == row["jobs"] * report["parameters"]["max_tokens"]
    assert all(positive(row["bytes_over_final_text"]) for row in report["bytes"])
    endpoint_rows = [row for row in rows if row["kind"] == "endpoint"]
    for row in endpoint_rows:  # HTTP: at least /run and one /stream poll per job
        assert row["requests_per_job"] >= 2 and row["vs_raw"] is not None
    assert "through the local endpoint" in result.stdout

    cold = report["cold_start"]
    assert positive(cold["ready_ms"]) and positive(cold["worker_share_ms"])
    assert cold["heavy_modules_after_worker_imports"] == []  # the worker's imports stay lazy
    assert {"tokens_per_s_ratio_at_max_concurrency", "worker_cold_start_ms"} <= set(
        report["targets"]
    )
    assert "raw" in result.stdout and "targets" in result.stdout  # the printed table
