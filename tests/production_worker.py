"""A worker in RunPod's production mode as a subprocess, its output in a file.

``python -u src/handler.py`` with ``RUNPOD_WEBHOOK_*`` pointing at a loopback job API (the
local endpoint's worker side, in the test process), in its own process group so that
vLLM's engine processes are killed with it and never outlive a test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import REPO_ROOT, group_members
from vllm_worker.local_endpoint.process import own_process_group

HANDLER = REPO_ROOT / "src" / "handler.py"
STOP_TIMEOUT_S = 30.0  # SIGTERM -> exit, before SIGKILL


class WorkerProcess:
    """``python -u src/handler.py`` in its own process group, its output in a file."""

    def __init__(self, env: dict[str, str], cwd: Path, log_path: Path) -> None:
        self.env = env
        self.cwd = cwd
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-u", str(HANDLER)],
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own process group: vLLM's EngineCore and Worker processes are killed
                # with it and never outlive the test. In this session: own_process_group.
                **own_process_group(),
            )
        self.started_at = time.monotonic()

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(
                f"the worker exited with code {self.proc.returncode}; its log ends with:\n"
                + self.log_tail()
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as error:
            return f"(no worker log: {error})"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> tuple[int | None, list[str]]:
        """SIGTERM, then SIGKILL; kill what is left of its process group.

        Returns the exit code and the group members still alive right after the main
        process exited (vLLM's engine processes that it did not shut down).
        """
        if self.proc is None:
            return None, []
        pgid = self.proc.pid  # a group of its own is named after its leader
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        left_behind = group_members(pgid)
        for sig, grace_s in ((None, 5.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if sig is not None:
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    break
            deadline = time.monotonic() + grace_s
            while group_members(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not group_members(pgid):
                break
        return self.proc.returncode, left_behind
