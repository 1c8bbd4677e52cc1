"""A local endpoint with its real worker, as a subprocess, and a RunPod client's helpers.

``start_endpoint`` runs the package's harness (``vllm_worker.local_endpoint.harness``:
``python -m vllm_worker.local_endpoint`` as a user runs it, whose worker runs in RunPod's
production mode) with the tests' settings for the tiny model.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import requests

from vllm_worker.local_endpoint.harness import EndpointProcess, running_endpoint

JOB_TIMEOUT_S = 120.0
# HTTP calls to loopback servers in tests wait up to 10 s: an answer takes milliseconds.
# (The worker once ran in a session of its own and stalled the machine for seconds; see
# local_endpoint.process.own_process_group. The stall detector reports any such stall.)
STOP_TIMEOUT_S = 150.0  # the endpoint gives its worker 90 s to shut down


@contextlib.contextmanager
def start_endpoint(
    worker_env: Mapping[str, str],
    workdir: Path,
    extra_env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    api_key: str | None = None,
) -> Iterator[EndpointProcess]:
    """An endpoint whose worker serves the tiny model; stopped (and reaped) on exit.

    ``worker_env`` is the ``worker_env`` fixture; ``extra_env`` overrides its settings
    (e.g. ``MAX_CONCURRENCY``); ``extra_args`` go to the endpoint's command line;
    ``api_key``: the endpoint checks it, and the calls below send it.
    """
    env = {
        **worker_env,  # the tiny model; STREAM_MIN_INTERVAL_MS=0: a chunk per engine step
        "LOG_LEVEL": "INFO",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MAX_CONCURRENCY": "64",
        # Room for the seed's own max_tokens (1000); the fixed KV cache holds 64k tokens.
        "MAX_MODEL_LEN": "2048",
        **(extra_env or {}),
    }
    args = ["--log-level", "DEBUG", *extra_args]
    with running_endpoint(
        env, workdir / "endpoint.log", extra_args=args, api_key=api_key, start_timeout_s=240
    ) as process:
        try:
            yield process
        except BaseException:
            print("endpoint log (tail):\n" + process.log_tail())
            raise


# --- a RunPod client's calls --------------------------------------------------------------


def health(endpoint: EndpointProcess) -> dict[str, Any]:
    return endpoint.health()


def submit(endpoint: EndpointProcess, job_input: dict[str, Any]) -> str:
    reply = requests.post(
        f"{endpoint.url}/run", json={"input": job_input}, headers=endpoint.headers, timeout=10
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body == {"id": body["id"], "status": "IN_QUEUE"}
    return str(body["id"])


def status(endpoint: EndpointProcess, job_id: str) -> dict[str, Any]:
    reply = requests.get(f"{endpoint.url}/status/{job_id}", headers=endpoint.headers, timeout=10)
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


def wait_final(endpoint: EndpointProcess, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (body := status(endpoint, job_id))["status"] in {"IN_QUEUE", "IN_PROGRESS"}:
        endpoint.check_alive()
        assert time.monotonic() < deadline, f"job {job_id} still {body['status']}"
        time.sleep(0.1)
    return body
