"""How the local endpoint starts the worker, with and without the source tree."""

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO_ROOT
from vllm_worker.local_endpoint import process


def test_the_source_tree_handler_is_used_when_present() -> None:
    assert process.default_command() == [sys.executable, "-u", str(process.HANDLER)]
    assert process.HANDLER == REPO_ROOT / "src" / "handler.py"


def test_an_installed_package_runs_its_own_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process, "HANDLER", Path("/nonexistent/src/handler.py"))
    assert process.default_command() == [sys.executable, "-u", "-m", "vllm_worker"]


def test_python_m_vllm_worker_is_the_worker_entry(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vllm_worker", "--test_input", '{"input": {"prompt": 1}}'],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "Job failed: invalid_input: prompt: Input should be a valid string" in result.stderr
