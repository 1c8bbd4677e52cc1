"""The entry point: read the settings, pick the run mode, serve.

Run modes:
- load-balancing: ``ENDPOINT_TYPE=load_balancer``: an HTTP server on PORT that RunPod
  sends requests to (``http_server``), on what ``startup.serving`` starts;

and otherwise as the runpod SDK chooses them:
- production: ``RUNPOD_WEBHOOK_GET_JOB`` is set (a RunPod worker, or a local stand-in):
  the SDK's job loop (``job_loop``) on what ``startup.serving`` starts;
- the SDK's dev API server: ``--rp_serve_api`` or ``RUNPOD_REALTIME_PORT``: refused at
  once (it cannot run beside vLLM 0.32, and is not RunPod's API);
- local one-shot: otherwise, with ``--test_input '<json>'`` or ``./test_input.json``.
  The SDK's own one-shot runner never runs a streaming handler, so this worker runs
  that job itself (``local_run``).
"""

from __future__ import annotations

import enum
import logging
import multiprocessing
import os
import sys
from collections.abc import Mapping, Sequence
from typing import NoReturn

from vllm_worker import model_source
from vllm_worker.errors import SettingsError, WorkerError
from vllm_worker.settings import Settings
from vllm_worker.startup import StartInterrupted

log = logging.getLogger("vllm_worker")


class RunMode(enum.Enum):
    LOAD_BALANCER = "load_balancer"
    PRODUCTION = "production"
    SDK_API_SERVER = "sdk_api_server"
    LOCAL_TEST = "local_test"


def choose_mode(argv: Sequence[str], settings: Settings) -> RunMode:
    if settings.endpoint_type == "load_balancer":
        return RunMode.LOAD_BALANCER
    if settings.runpod_webhook_get_job:
        return RunMode.PRODUCTION
    if "--rp_serve_api" in argv or settings.runpod_realtime_port:
        return RunMode.SDK_API_SERVER
    return RunMode.LOCAL_TEST


def run(argv: Sequence[str]) -> NoReturn:
    """The entry scripts' one call: ``main``, then the process ends at once.

    By then every job is posted and the engine stopped. What is left is the interpreter's
    teardown of vLLM and torch (about 2 s here), which would eat into the 10 s Docker (and
    RunPod) leave between SIGTERM and SIGKILL; so the logs are flushed, the processes the
    runpod SDK started (its heartbeat) are stopped, and the process exits without it.
    """
    code = main(argv)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    for child in multiprocessing.active_children():
        child.terminate()
        child.join(2.0)
    os._exit(code)


def main(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> int:
    """The worker's entry point; returns the process exit code.

    2: a setting is invalid; 1: the engine cannot start or died, or the local job failed;
    0: the job loop or HTTP server ended as asked (SIGTERM), or a stop signal came before
    serving began.
    """
    try:
        settings = Settings.from_env(environ)
        _configure_logging(settings)
        # Which model from where (baked into the image, a network volume), before vLLM
        # starts: a model that an offline image does not hold stops here, in one line.
        settings = model_source.prepare(settings)
        return _run(argv, settings)
    except SettingsError as error:
        _cannot_start(str(error))
        return 2
    except WorkerError as error:
        _cannot_start(str(error))
        return 1
    except StartInterrupted as interrupted:
        log.info("stopped by %s before serving; the engine's processes are stopped", interrupted)
        return 0


def _run(argv: Sequence[str], settings: Settings) -> int:
    mode = choose_mode(argv, settings)
    if mode is RunMode.SDK_API_SERVER:
        raise SettingsError(
            "--rp_serve_api / RUNPOD_REALTIME_PORT: the runpod SDK's dev server is not "
            "supported (it needs fastapi>=0.141, which vLLM 0.32 refuses, and cannot stream "
            "or cancel): run python -m vllm_worker.local_endpoint for RunPod's API locally"
        )
    if mode is RunMode.LOAD_BALANCER:
        from vllm_worker import http_server

        exit_code = http_server.serve(settings)
        log.info("engine stopped; exiting with code %d", exit_code)
        return exit_code
    if mode is RunMode.LOCAL_TEST:
        from vllm_worker import local_run

        return local_run.run(argv, settings)
    from vllm_worker import job_loop
    from vllm_worker.startup import serving

    with serving(settings) as worker:
        # The SDK's job loop with the worker's life cycle (SIGTERM, a dead engine) and
        # admission; it returns once the jobs it took are posted.
        exit_code = job_loop.serve(worker.engine, settings, worker.handler)
    log.info("engine stopped; exiting with code %d", exit_code)
    return exit_code


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # vLLM logs to stdout unless told otherwise (read when vLLM is imported, which is
    # later); stdout is where the local runner prints the job's chunks.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


def _cannot_start(reason: str) -> None:
    """The one line that says why the worker does not start (the last of its log)."""
    print(f"vllm-worker: cannot start: {reason}", file=sys.stderr)
