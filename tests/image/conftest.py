"""The image checks' fixtures: the stand-in for vLLM's image, the images built from the
project's real Dockerfile, a loopback Hugging Face Hub with the tiny model.

``scripts/test_image.sh`` runs these (``VLLM_WORKER_IMAGE_CHECKS=1``) once it has a Docker
engine: the one ``docker info`` reaches, or one it started itself. Every build and
container uses ``--network host`` (an engine started here has no bridge): a container
reaches the host's 127.0.0.1, where the stand-in Hub and the local endpoint listen.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fake_hub import FakeHub, repo_of_folder, serve_hub
from image_support import (
    DEBIAN_MIRROR_DEFAULT,
    FIGURES,
    REPO_ID,
    STANDIN_DIR,
    TOKEN,
    BuiltImage,
    Docker,
    copy_context,
)
from vllm_worker import demo_model
from vllm_worker.tiny_model import build as build_tiny_model


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES.values:
        terminalreporter.section("image figures")
        for name, value in FIGURES.values.items():
            terminalreporter.write_line(f"{name}: {value}")


@pytest.fixture(scope="session")
def docker() -> Docker:
    cli = os.environ.get("VLLM_WORKER_DOCKER_CLI")
    assert cli, "run the image checks with scripts/test_image.sh (it provides the engine)"
    return Docker(cli)


# --- the stand-in for vllm/vllm-openai:v0.32.0 -------------------------------------------


def _pip_setting(name: str) -> str:
    result = subprocess.run(
        ["python3", "-m", "pip", "config", "get", name], capture_output=True, text=True, check=False
    )
    return result.stdout.strip().strip("'") if result.returncode == 0 else ""


def _local_torch_wheel() -> Path | None:
    """torch 2.13.0+cpu for Python 3.11, where pip finds it (its find-links folder)."""
    for folder in _pip_setting("global.find-links").split():
        for wheel in Path(folder).glob("torch-2.13.0+cpu-cp311-*.whl"):
            return wheel
    return None


def _ca_bundle() -> Path:
    configured = _pip_setting("global.cert")
    return Path(configured) if configured else Path("/etc/ssl/certs/ca-certificates.crt")


def _debian_mirror() -> str:
    """The Debian mirror that apt's own sources name."""
    for sources in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")):
        if sources.is_file():
            for line in sources.read_text().splitlines():
                words = line.split()
                if words[:1] == ["URIs:"] and "security" not in words[1]:
                    return words[1]
                if words[:1] == ["deb"] and "debian" in line and "security" not in line:
                    return words[1]
    return DEBIAN_MIRROR_DEFAULT


def _digest(*parts: bytes) -> str:
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:12]


def _debian_base(docker: Docker) -> str:
    """Debian bookworm as a local image: pulled where a registry answers, else made with
    debootstrap and ``docker import``."""
    tag = "local/debian:bookworm-minbase"
    if docker.has_image(tag):
        return tag
    if docker("pull", "debian:bookworm", check=False, timeout=120).returncode == 0:
        docker("tag", "debian:bookworm", tag)
        return tag
    with tempfile.TemporaryDirectory(prefix="debootstrap-") as scratch:
        rootfs = Path(scratch) / "rootfs"
        subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), _debian_mirror()],
            capture_output=True,
            check=True,
            timeout=900,
        )
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            [docker.cli, "import", "-", tag], stdin=tar.stdout, capture_output=True, check=True
        )
        tar.wait()
    return tag


@pytest.fixture(scope="session")
def standin_base(docker: Docker) -> str:
    """The stand-in image, tagged by a hash of its inputs: built once, then reused."""
    wheel = _local_torch_wheel()
    dockerfile = (STANDIN_DIR / "Dockerfile").read_bytes()
    tag = f"local/vllm-openai-standin:{_digest(dockerfile, (wheel.name if wheel else '').encode())}"
    if docker.has_image(tag):
        FIGURES.values["stand-in base"] = f"{tag} (cached)"
        return tag
    debian = _debian_base(docker)
    with tempfile.TemporaryDirectory(prefix="standin-") as scratch:
        context = Path(scratch)
        shutil.copy(STANDIN_DIR / "Dockerfile", context / "Dockerfile")
        shutil.copy(_ca_bundle(), context / "host-ca-bundle.crt")
        (context / "wheels").mkdir()
        build_args = {"DEBIAN_IMAGE": debian}
        if wheel is not None:
            os.link(wheel, context / "wheels" / wheel.name)
        else:
            build_args["TORCH_INDEX"] = "https://download.pytorch.org/whl/cpu"
        _, seconds = docker.build(context, tag, build_args=build_args)
    FIGURES.values["stand-in base"] = f"{tag}, built in {seconds:.0f} s"
    return tag


# --- the project's image -------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    """The tiny model as a gated repo of a loopback Hub (only ``TOKEN`` may read it)."""
    folder = build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
    with serve_hub({REPO_ID: repo_of_folder(folder, accepted_token=TOKEN)}) as hub:
        yield hub


@pytest.fixture(scope="session")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "hf_token"
    path.write_text(TOKEN)
    return path


@pytest.fixture(scope="session")
def baked_image(
    docker: Docker,
    standin_base: str,
    tiny_hub: FakeHub,
    token_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> BuiltImage:
    """``BAKE_MODEL=1``, the tiny model from the loopback Hub, the token as a secret."""
    context = copy_context(tmp_path_factory.mktemp("context"))
    build_args = {
        "BASE_IMAGE": standin_base,
        "BAKE_MODEL": "1",
        "MODEL_NAME": REPO_ID,
        "HF_ENDPOINT": tiny_hub.url,
    }
    secrets = {"hf_token": token_file}
    tag = "local/vllm-worker:baked-test"
    log, seconds = docker.build(context, tag, build_args=build_args, secrets=secrets)
    FIGURES.values["build, baked (stand-in cached)"] = f"{seconds:.0f} s"
    return BuiltImage(tag, log, seconds, context, build_args, secrets)


@pytest.fixture(scope="session")
def hub_default_image(
    docker: Docker, standin_base: str, tmp_path_factory: pytest.TempPathFactory
) -> BuiltImage:
    """The RunPod Hub's build: no argument (but the base), no secret."""
    context = copy_context(tmp_path_factory.mktemp("hub-context"))
    tag = "local/vllm-worker:hub-default-test"
    log, seconds = docker.build(context, tag, build_args={"BASE_IMAGE": standin_base})
    FIGURES.values["build, the Hub's default"] = f"{seconds:.0f} s"
    return BuiltImage(tag, log, seconds, context, {"BASE_IMAGE": standin_base}, {})


@pytest.fixture(scope="session")
def demo_image(
    docker: Docker,
    standin_base: str,
    real_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> BuiltImage:
    """``BAKE_MODEL=1`` with the real demo model, a public repo of the loopback Hub under
    its own name, as a user bakes a Hub model (no token)."""
    context = copy_context(tmp_path_factory.mktemp("demo-context"))
    tag = "local/vllm-worker:demo-test"
    with serve_hub({demo_model.SERVED_NAME: repo_of_folder(real_model_dir)}) as hub:
        build_args = {
            "BASE_IMAGE": standin_base,
            "BAKE_MODEL": "1",
            "MODEL_NAME": demo_model.SERVED_NAME,
            "HF_ENDPOINT": hub.url,
        }
        log, seconds = docker.build(context, tag, build_args=build_args)
    FIGURES.values["build, the demo model baked (stand-in cached)"] = f"{seconds:.0f} s"
    return BuiltImage(tag, log, seconds, context, build_args, {})
