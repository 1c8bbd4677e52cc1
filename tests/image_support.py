"""What the image checks (tests/image/) share: the Docker CLI, constants, the README's
``docker run`` options, the figures they print.

``scripts/test_image.sh`` runs these (``VLLM_WORKER_IMAGE_CHECKS=1``) once it has a Docker
engine: the one ``docker info`` reaches, or one it started itself. Every build and
container uses ``--network host`` (an engine started here has no bridge): a container
reaches the host's 127.0.0.1, where the stand-in Hub and the local endpoint listen.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import REPO_ROOT

STANDIN_DIR = Path(__file__).parent / "image" / "standin"
TOKEN = "hf_image_check_SECRET_5b0c3f1d9e7a4c2b8d6f"
REPO_ID = "vllm-worker-test/tiny-llama"
BUILD_TIMEOUT_S = 1800  # the stand-in's first build downloads vLLM's CPU build (~2 GB)
DEBIAN_MIRROR_DEFAULT = "http://deb.debian.org/debian"
# Settings that serve the tiny model on a CPU (the image's defaults serve Llama 2 on a GPU).
TINY_SETTINGS = {
    "DTYPE": "float32",
    "MAX_MODEL_LEN": "2048",
    "KV_CACHE_MEMORY_BYTES": str(256 * 2**20),
    "ENFORCE_EAGER": "true",
    "VLLM_NO_USAGE_STATS": "1",
    "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
    "RUNPOD_SKIP_GPU_CHECK": "true",
}


@dataclass
class Figures:
    """What the checks measured, printed at the end (and in the README)."""

    values: dict[str, Any] = field(default_factory=dict)


FIGURES = Figures()


class Docker:
    """The Docker CLI (``VLLM_WORKER_DOCKER_CLI``) and how this project builds with it."""

    def __init__(self, cli: str) -> None:
        self.cli = cli
        self.buildx = self._ok(["buildx", "version"])

    def _ok(self, args: Sequence[str]) -> bool:
        return subprocess.run([self.cli, *args], capture_output=True, check=False).returncode == 0

    def __call__(
        self, *args: str, timeout: float = 300, check: bool = True, input_bytes: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.cli, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            input=None if input_bytes is None else input_bytes.decode(),
        )
        if check and result.returncode != 0:
            raise AssertionError(f"docker {shlex.join(args)}: {result.stderr[-3000:]}")
        return result

    def has_image(self, tag: str) -> bool:
        return self._ok(["image", "inspect", tag])

    def build(
        self,
        context: Path,
        tag: str,
        *,
        build_args: dict[str, str] | None = None,
        secrets: dict[str, Path] | None = None,
        dockerfile: Path | None = None,
    ) -> tuple[str, float]:
        """Build with BuildKit on the host network; the plain build log and its seconds."""
        command = ["buildx", "build", "--load"] if self.buildx else ["build"]
        command += ["--network", "host", "--progress", "plain", "-t", tag]
        for name, value in (build_args or {}).items():
            command += ["--build-arg", f"{name}={value}"]
        for name, path in (secrets or {}).items():
            command += ["--secret", f"id={name},src={path}"]
        if dockerfile is not None:
            command += ["-f", str(dockerfile)]
        env = {**os.environ, "DOCKER_BUILDKIT": "1"}
        started = time.monotonic()
        result = subprocess.run(
            [self.cli, *command, str(context)],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            env=env,
            check=False,
        )
        seconds = time.monotonic() - started
        log = result.stdout + result.stderr
        assert result.returncode == 0, f"the build of {tag} failed:\n{log[-5000:]}"
        return log, seconds


@dataclass
class BuiltImage:
    tag: str
    log: str
    seconds: float
    context: Path
    build_args: dict[str, str]
    secrets: dict[str, Path]


def copy_context(destination: Path) -> Path:
    """The repository's tracked files (as a clean checkout holds them)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        source = REPO_ROOT / name.decode()
        if source.is_file():
            target = destination / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


def readme_run_options() -> list[str]:
    """The options the docs' ``docker run`` on a GPU box passes (docs/deploy.md, which the
    README links to), but ``--gpus all`` (no GPU here): the checks run the image as users
    are told to."""
    readme = (REPO_ROOT / "docs" / "deploy.md").read_text()
    line = next(
        line for line in readme.splitlines() if line.startswith("docker run --rm --gpus all")
    )
    words = shlex.split(line.split("#", 1)[0])
    options = words[2 : words.index(next(w for w in words if w.startswith("docker.io/")))]
    index = options.index("--gpus")
    del options[index : index + 2]
    return options


def env_options(env: dict[str, str]) -> list[str]:
    return [part for name, value in env.items() for part in ("-e", f"{name}={value}")]
