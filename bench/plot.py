"""The benchmark's figure: throughput and time to first chunk against concurrency."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
