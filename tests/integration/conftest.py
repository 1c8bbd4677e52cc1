"""One real vLLM engine (CPU build, tiny model) shared by the integration tests.

Starting the engine takes about 20 s, so it starts once per session. Every test runs its
coroutines on the same event loop: vLLM binds its output handler to the loop of the
first request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from helpers import TINY_ENGINE_ENV, handler_for, lora_modules
from vllm_worker.engine import Engine
from vllm_worker.engine_types import Handler
from vllm_worker.settings import Settings

T = TypeVar("T")


@pytest.fixture(scope="session")
def settings(tiny_model_dir: Path, tiny_adapters: dict[str, Path]) -> Settings:
    return Settings.from_env(
        {
            **TINY_ENGINE_ENV,
            "MODEL_NAME": str(tiny_model_dir),
            # Two adapters, served side by side (tests/integration/test_lora.py).
            "LORA_MODULES": lora_modules(tiny_adapters),
            "MAX_LORAS": "2",
            # Structured output without free whitespace (tests/integration/test_vllm_fields.py):
            # the random model would otherwise fill a JSON object with blanks until max_tokens.
            "STRUCTURED_OUTPUTS_BACKEND": "xgrammar",
            "ENGINE_ARGS": '{"structured_outputs_config": {"disable_any_whitespace": true}}',
        }
    )


@pytest.fixture(scope="session")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    event_loop = asyncio.new_event_loop()
    yield event_loop
    event_loop.close()


@pytest.fixture(scope="session")
def engine(settings: Settings, loop: asyncio.AbstractEventLoop) -> Iterator[Engine]:
    started = Engine.start(settings)
    yield started
    started.shutdown()
    # Let the engine's cancelled output task finish before the loop closes.
    loop.run_until_complete(asyncio.sleep(0.1))


@pytest.fixture(scope="session")
def handler(engine: Engine, settings: Settings) -> Handler:
    return handler_for(engine, settings)


@pytest.fixture(scope="session")
def run(loop: asyncio.AbstractEventLoop) -> Callable[[Awaitable[T]], T]:
    """Run a coroutine to completion on the shared loop, with a deadline."""

    def run_until_complete(awaitable: Awaitable[T], timeout: float = 120) -> T:
        return loop.run_until_complete(asyncio.wait_for(awaitable, timeout))

    return run_until_complete
