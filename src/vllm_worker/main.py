"""Start-up: read the settings, pick the run mode, start the engine, hand over to RunPod.

Run modes, chosen as the runpod SDK chooses them:
- production: ``RUNPOD_WEBHOOK_GET_JOB`` is set (a RunPod worker, or a local stand-in);
- the SDK's dev API server: ``--rp_serve_api`` or ``RUNPOD_REALTIME_PORT``;
- local one-shot: otherwise, with ``--test_input '<json>'`` or ``./test_input.json``.
  The SDK's own one-shot runner never runs a streaming handler, so this worker runs
  that job itself (``local_run``).
"""

from __future__ import annotations

import enum
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from vllm_worker import model_source
from vllm_worker.errors import SettingsError
from vllm_worker.settings import Settings

if TYPE_CHECKING:  # importing the engine imports vLLM: only once a mode needs it
    from vllm_worker.engine import Engine

log = logging.getLogger("vllm_worker")

# The runpod SDK's names for log levels.
_SDK_LOG_LEVELS = {"CRITICAL": "ERROR", "WARNING": "WARN"}


class RunMode(enum.Enum):
    PRODUCTION = "production"
    SDK_API_SERVER = "sdk_api_server"
    LOCAL_TEST = "local_test"


def choose_mode(argv: Sequence[str], settings: Settings) -> RunMode:
    if settings.runpod_webhook_get_job:
        return RunMode.PRODUCTION
    if "--rp_serve_api" in argv or settings.runpod_realtime_port:
        return RunMode.SDK_API_SERVER
    return RunMode.LOCAL_TEST


def main(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> int:
    """The worker's entry point; returns the process exit code."""
    try:
        settings = Settings.from_env(environ)
        _configure_logging(settings)
        # Which model from where (baked into the image, a network volume), before vLLM
        # starts: a model that an offline image does not hold stops here, in one line.
        settings = model_source.prepare(settings)
    except SettingsError as error:
        _cannot_start(str(error))
        return 2
    mode = choose_mode(argv, settings)
    if mode is RunMode.LOCAL_TEST:
        from vllm_worker import local_run

        return local_run.run(argv, settings)
    return _serve(settings)


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # vLLM logs to stdout unless told otherwise (read when vLLM is imported, which is
    # later); stdout is where the local runner prints the job's chunks.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


def _serve(settings: Settings) -> int:
    """Hand the handler to the runpod SDK, which runs its job loop until shutdown."""
    from runpod.serverless.modules.rp_logger import RunPodLogger

    from vllm_worker import job_loop
    from vllm_worker.worker import make_handler

    RunPodLogger().set_level(
        settings.runpod_log_level or _SDK_LOG_LEVELS.get(settings.log_level, settings.log_level)
    )
    engine = start_engine(settings)
    if engine is None:
        return 1
    try:
        from vllm_worker.openai_routes import OpenAIRoutes

        openai_routes = OpenAIRoutes.build(engine, settings)
        # The SDK's job loop with the worker's life cycle (SIGTERM, a dead engine) and
        # admission; it returns once the jobs it took are posted.
        exit_code = job_loop.serve(engine, settings, make_handler(engine, settings, openai_routes))
    finally:
        # Stop the engine's processes cleanly instead of leaving them to interpreter
        # teardown.
        engine.shutdown()
    return exit_code


def start_engine(settings: Settings) -> Engine | None:
    """The started engine, or None after logging why it could not start."""
    from vllm_worker.engine import Engine

    log.info(
        "starting the engine: %s, max_model_len=%d", settings.model_name, settings.max_model_len
    )
    try:
        return Engine.start(settings)
    except SettingsError as error:
        _cannot_start(str(error))
    except Exception as error:
        log.exception("the engine failed to start for MODEL_NAME=%r", settings.model_name)
        # The last line of the log says it in one line (the traceback is vLLM's, and the
        # root cause of an engine process's failure is logged by that process, above).
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        _cannot_start(f"the engine failed to start: {type(error).__name__}: {first_line}")
    return None


def _cannot_start(reason: str) -> None:
    """The one line that says why the worker does not start (the last of its log)."""
    print(f"vllm-worker: cannot start: {reason}", file=sys.stderr)
