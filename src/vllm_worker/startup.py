"""Start-up and shut-down of what serves jobs: one path for every run mode.

``serving(settings)`` starts the engine, chooses the chat template once (the native
``messages`` input and the OpenAI routes render conversations with the same one), builds
the OpenAI routes and the job handler on that engine, and yields them. On exit it stops
the engine's processes and lets go of every reference to vLLM's engine object while the
interpreter is still whole: vLLM's ``AsyncLLM.__del__`` shuts down once more, and when it
only runs at interpreter exit that ends a clean run with a traceback on stderr.

A stop signal (SIGTERM, SIGINT) while the engine starts (RunPod scales workers down at any
time, ``docker stop``) interrupts the start: the engine's processes are stopped and
``StartInterrupted`` is raised, so that the process exits at once instead of being killed
after its grace period with vLLM's processes left behind.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING

from vllm_worker.chat import choose_chat_template, log_chat_template
from vllm_worker.engine_types import Handler
from vllm_worker.errors import EngineStartError, SettingsError
from vllm_worker.settings import Settings
from vllm_worker.worker import NativeJobs, job_handler

if TYPE_CHECKING:  # importing the engine imports vLLM: only once serving starts
    from vllm_worker.engine import Engine
    from vllm_worker.openai_routes import OpenAIRoutes

log = logging.getLogger(__name__)

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StartInterrupted(BaseException):
    """A stop signal came while the engine was starting.

    A ``BaseException``, as ``KeyboardInterrupt`` is, so that no ``except Exception`` in
    vLLM's start-up code takes it for a failure to recover from.
    """


@dataclass
class Serving:
    """What serves requests: the engine, the native jobs, the OpenAI routes (vLLM's
    serving objects) and the queue's job handler, which hands each job to one of them."""

    engine: Engine
    jobs: NativeJobs
    openai_routes: OpenAIRoutes
    handler: Handler

    def close(self) -> None:
        """Let go of the routes: vLLM's serving objects hold the engine object too."""
        self.openai_routes.close()


def build(engine: Engine, settings: Settings) -> Serving:
    """The handler and OpenAI routes on a started engine, with the chat template chosen
    once for both."""
    from vllm_worker.openai_routes import OpenAIRoutes

    chat = choose_chat_template(settings, engine.tokenizer)  # once: it may render probes
    log_chat_template(chat, settings.model_name)
    routes = OpenAIRoutes.build(engine, settings, chat.template)
    jobs = NativeJobs.build(engine, settings, chat.template)
    return Serving(engine, jobs, routes, job_handler(jobs, routes))


@contextlib.contextmanager
def serving(settings: Settings) -> Iterator[Serving]:
    """``build`` on a newly started engine; the engine stopped and released on exit.

    Raises ``SettingsError`` for a setting vLLM refuses, ``EngineStartError`` (one line)
    when the engine cannot start, ``StartInterrupted`` on a stop signal during the start.
    """
    engine = _start_engine(settings)
    built: Serving | None = None
    try:
        with _interrupted_by_stop_signals():  # building the routes takes a second too
            built = build(engine, settings)
        yield built
    finally:
        engine.shutdown()
        if built is not None:
            built.close()
        # The engine object is garbage now (a frame kept alive by a stored traceback may
        # still hold the handler, which no longer reaches it): collect it here.
        gc.collect()


def _start_engine(settings: Settings) -> Engine:
    from vllm_worker.engine import Engine

    log.info(
        "starting the engine: %s, max_model_len=%d", settings.model_name, settings.max_model_len
    )
    try:
        with _interrupted_by_stop_signals():
            return Engine.start(settings)
    except StartInterrupted:
        _stop_engine_processes()
        raise
    except SettingsError:
        raise
    except Exception as error:
        log.exception("the engine failed to start for MODEL_NAME=%r", settings.model_name)
        # The traceback is vLLM's, and an engine process logs its own root cause above it:
        # the error's first line says enough for the one-line summary.
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        raise EngineStartError(
            f"the engine failed to start: {type(error).__name__}: {first_line}"
        ) from None


def _stop_engine_processes(timeout_s: float = 10.0) -> None:
    """Stop the processes of an engine whose start was cut short (vLLM starts them with
    ``multiprocessing``; its engine core stops its own workers on SIGTERM)."""
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout_s)
        if child.is_alive():
            child.kill()
            child.join(timeout_s)
    log.info("stopped %d engine processes", len(children))


@contextlib.contextmanager
def _interrupted_by_stop_signals() -> Iterator[None]:
    """Turn SIGTERM/SIGINT into ``StartInterrupted`` in the main thread while inside."""

    def interrupt(signum: int, _frame: FrameType | None) -> None:
        log.warning("%s while the engine starts: stopping", signal.Signals(signum).name)
        raise StartInterrupted(signal.Signals(signum).name)

    previous = {signum: signal.signal(signum, interrupt) for signum in _STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
