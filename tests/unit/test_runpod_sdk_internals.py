"""The runpod SDK internals ``job_loop`` builds on are still runpod 1.12.0's.

``job_loop.EventDrivenScaler`` subclasses the SDK's ``JobScaler`` and keeps its job
handling, posting and per-job stop; it relies on attributes and methods that are not the
SDK's public API (``job_loop.SDK_INTERNALS``). Their source is pinned here: an SDK
upgrade that changes any of them fails this test, naming what to recheck, instead of
changing the job loop's behaviour unnoticed.
"""

from __future__ import annotations

import hashlib
import inspect

import runpod

from vllm_worker.job_loop import SDK_INTERNALS

RUNPOD_VERSION = "1.12.0"
# sha256 (first 16 hex digits) of each internal's source in runpod 1.12.0.
PINNED = {
    "JobScaler.__init__": "a6f8e34dff6a9dce",
    "JobScaler.start": "1be10193840eb9d5",
    "JobScaler.run": "f6c6b5f871b94c72",
    "JobScaler.handle_job": "fe2350bfac7373f7",
    "JobScaler.stop_job": "dc57f329f526b934",
    "JobScaler.kill_worker": "863effbe007ad0f9",
    "JobScaler.is_alive": "261d783f83839b12",
    "rp_job.get_job": "8ce238208ca5261a",
    "rp_job.get_stop_signals": "031a55cb85064132",
    "rp_job._job_stop_url": "8f3407fceaf421fe",
    "rp_job.handle_job": "849f93639768bc87",
}


def source_digest(function: object) -> str:
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]  # type: ignore[arg-type]


def test_the_sdk_is_the_version_the_job_loop_was_checked_against() -> None:
    assert runpod.__version__ == RUNPOD_VERSION, (
        f"runpod {runpod.__version__}: recheck src/vllm_worker/job_loop.py against its "
        f"rp_scale.py and rp_job.py, then update this test"
    )


def test_every_sdk_internal_the_job_loop_relies_on_is_unchanged() -> None:
    assert set(SDK_INTERNALS) == set(PINNED)
    changed = [
        name for name, function in SDK_INTERNALS.items() if source_digest(function) != PINNED[name]
    ]
    assert changed == [], f"changed in the runpod SDK, recheck job_loop.py: {changed}"


def test_the_sdk_still_sets_the_attributes_the_job_loop_uses() -> None:
    from runpod.serverless.modules.rp_scale import JobScaler

    scaler = JobScaler({"handler": None})
    for name in (
        "_shutdown_event",
        "job_progress",
        "jobs_queue",
        "jobs_tasks",
        "current_concurrency",
        "concurrency_modifier",
        "jobs_fetcher_timeout",
        "stop_signals_fetcher_timeout",
        "jobs_handler",
    ):
        assert hasattr(scaler, name), name
