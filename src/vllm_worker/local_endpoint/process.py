"""The worker the endpoint runs: ``python -u src/handler.py`` in production mode.

It runs in its own process group, in the endpoint's session (vLLM's engine processes are
its children; ``own_process_group`` says why not a session of its own), gets
SIGTERM when the endpoint's process dies (Linux), and is stopped as RunPod stops a
worker: SIGTERM (the SDK finishes the jobs in flight and exits), then SIGKILL to the
whole group after a grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# src/vllm_worker/local_endpoint/process.py -> src/handler.py
HANDLER = Path(__file__).resolve().parents[2] / "handler.py"

# Never passed from the caller's environment: they would select another run mode
# (RUNPOD_REALTIME_PORT: the SDK's dev server), point the SDK elsewhere, or hand the
# user's RunPod key to the worker, which has no use for it.
_DROP_PREFIXES = ("RUNPOD_WEBHOOK_", "RUNPOD_REALTIME_")
_DROP = {
    "RUNPOD_POD_ID",
    "RUNPOD_POD_HOSTNAME",
    "RUNPOD_AI_API_KEY",
    "RUNPOD_API_KEY",
    "RUNPOD_ENDPOINT_ID",
}


def own_process_group() -> dict[str, Any]:
    """``subprocess.Popen`` arguments: a process group of its own, in the caller's session.

    A group of its own lets ``os.killpg`` stop a worker with vLLM's engine processes. Not a
    session of its own (``start_new_session``): with the kernel's scheduler autogroups (on
    by default), a session is one scheduling group, and while vLLM's CPU engine keeps both
    cores of a small machine busy, that group held every other process off the cores for
    seconds, loopback's packet delivery included: streams stalled for up to 17 s.
    """
    if sys.version_info >= (3, 11):
        return {"process_group": 0}
    return {"preexec_fn": os.setpgrp}  # pragma: no cover (Python 3.10)


def default_command() -> list[str]:
    """The repository's ``src/handler.py``; the installed package's entry where there is no
    source tree (a non-editable install, as in the Docker image)."""
    if HANDLER.is_file():
        return [sys.executable, "-u", str(HANDLER)]
    return [sys.executable, "-u", "-m", "vllm_worker"]


def build_env(base: Mapping[str, str], attach: Mapping[str, str]) -> dict[str, str]:
    """The caller's environment (MODEL_NAME etc.), minus RunPod's job API, plus ``attach``."""
    env = {
        name: value
        for name, value in base.items()
        if name not in _DROP and not name.startswith(_DROP_PREFIXES)
    }
    env.setdefault("PYTHONUNBUFFERED", "1")
    # No usage reports from vLLM: the endpoint and its worker talk to loopback only.
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.update(attach)
    return env


class WorkerProcess:
    """One worker subprocess in its own process group."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str]) -> None:
        self.command = list(command)
        self.env = dict(env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self) -> None:
        self.proc = subprocess.Popen(
            _dying_with_parent(self.command),
            env=self.env,
            stdin=subprocess.DEVNULL,
            # Its output goes where the endpoint's goes: the user sees the worker's log.
            **own_process_group(),
        )
        self.started_at = time.monotonic()
        log.info("worker started: pid %d: %s", self.proc.pid, " ".join(self.command))

    def returncode(self) -> int | None:
        """None while it runs."""
        return None if self.proc is None else self.proc.poll()

    async def stop(self, grace_s: float, force: Callable[[], bool] = lambda: False) -> int | None:
        """SIGTERM; SIGKILL after ``grace_s`` (or once ``force()``); then clear its process
        group. Returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            log.info("stopping the worker (SIGTERM; SIGKILL after %.0f s)", grace_s)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            if not await _wait_exit(proc, grace_s, force):
                log.warning("the worker did not exit (in %.0f s, or asked again): SIGKILL", grace_s)
                _kill_group(proc.pid, signal.SIGKILL)
                await _wait_exit(proc, 10.0, lambda: False)
        # Engine processes that outlived it (none when it shut down cleanly).
        _kill_group(proc.pid, signal.SIGTERM)
        await asyncio.sleep(0.2)
        _kill_group(proc.pid, signal.SIGKILL)
        log.info("worker exited with code %s", proc.returncode)
        return proc.returncode


async def _wait_exit(
    proc: subprocess.Popen[bytes], timeout_s: float, force: Callable[[], bool]
) -> bool:
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        if time.monotonic() >= deadline or force():
            return False
        await asyncio.sleep(0.1)
    return True


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# Run before the worker's command, in its process (it execs the command): the kernel
# sends the worker SIGTERM when the endpoint dies, even by SIGKILL. Not a preexec_fn:
# Python code between fork and exec can deadlock when the parent has threads.
_PDEATHSIG_EXEC = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit('the local endpoint is gone')\n"
    "try:\n"
    "    os.execvp(sys.argv[2], sys.argv[2:])\n"
    "except OSError as error:\n"
    "    sys.exit(f'cannot start the worker: {sys.argv[2]}: {error.strerror}')\n"
)


def _dying_with_parent(command: Sequence[str]) -> list[str]:
    """``command``, made to get SIGTERM when the endpoint dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return list(command)
    return [sys.executable, "-c", _PDEATHSIG_EXEC, str(os.getpid()), *command]
