"""builder/download_model.py against a stand-in Hugging Face Hub on loopback.

The stand-in implements what ``huggingface_hub.snapshot_download`` calls: model info
(``/api/models/<repo>[/revision/<rev>]``: ``sha`` and ``siblings``), the file tree
(``/api/models/<repo>/tree/<rev>``) and ``HEAD``/``GET /<repo>/resolve/<rev>/<file>``
with ``X-Repo-Commit``, ``ETag`` and ``Content-Length``; errors carry the Hub's
``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``GatedRepo``, ``EntryNotFound``).
The builder runs as a subprocess, as in the Dockerfile, with ``HF_ENDPOINT`` pointing here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fake_hub import FakeHub, FakeRepo, serve_hub
from helpers import REPO_ROOT, TINY_ENGINE_ENV

BUILDER = REPO_ROOT / "builder" / "download_model.py"
BUILDER_TIMEOUT_S = 120

TOKEN = "hf_test_SECRET_7c1f0e9a2b4d4f6e8a0c"
OTHER_TOKEN = "hf_test_OTHER_0000000000000000"

LLAMA = "meta-llama/Llama-2-7b-chat-hf"
LLAMA_WEIGHTS = (
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
)
LLAMA_KEPT = (
    "config.json",
    "generation_config.json",
    *LLAMA_WEIGHTS,
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
)
LLAMA_DROPPED = (
    ".gitattributes",
    "LICENSE.txt",
    "README.md",
    "Responsible-Use-Guide.pdf",
    "USE_POLICY.md",
    "pytorch_model-00001-of-00002.bin",
    "pytorch_model-00002-of-00002.bin",
    "pytorch_model.bin.index.json",
    # Not in the index: a second copy of the weights (as Mistral repos have).
    "consolidated.safetensors",
    "original/consolidated.00.pth",
    "original/params.json",
    "original/tokenizer.model",
)


def _bytes(name: str) -> bytes:
    return f"contents of {name}\n".encode()


def _index(*shards: str) -> bytes:
    weight_map = {f"layer.{i}.weight": shard for i, shard in enumerate(shards)}
    return json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}).encode()


# --- fixtures and helpers ------------------------------------------------------------------


def llama_like_repo(accepted_token: str | None = None) -> FakeRepo:
    files = {name: _bytes(name) for name in (*LLAMA_KEPT, *LLAMA_DROPPED)}
    files["model.safetensors.index.json"] = _index(
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    )
    files["pytorch_model.bin.index.json"] = _index(
        "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"
    )
    return FakeRepo(files, accepted_token=accepted_token)


BIN_ONLY_KEPT = (
    "added_tokens.json",
    "chat_template.jinja",
    "config.json",
    "pytorch_model.bin",
    "special_tokens_map.json",
    "tokenizer.model",
    "tokenizer_config.json",
)
BIN_ONLY_DROPPED = ("README.md", ".gitattributes", "training_args.bin", "onnx/model.onnx")

PINNED_COMMIT = "a" * 40


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    repos = {
        LLAMA: llama_like_repo(),
        "meta-llama/Llama-2-7b-chat-gated": llama_like_repo(accepted_token=TOKEN),
        "org/gated-for-others": llama_like_repo(accepted_token=OTHER_TOKEN),
        "org/echoes-credentials": FakeRepo(
            {name: _bytes(name) for name in LLAMA_KEPT}, echo_auth_with_status=403
        ),
        "org/bin-only": FakeRepo(
            {name: _bytes(name) for name in (*BIN_ONLY_KEPT, *BIN_ONLY_DROPPED)},
            refs={"main": "b" * 40, "v1.0": PINNED_COMMIT},
        ),
        "org/no-weights": FakeRepo({name: _bytes(name) for name in ("config.json", "README.md")}),
        "org/tokenizer-only": FakeRepo(
            {
                name: _bytes(name)
                for name in ("tokenizer.json", "tokenizer_config.json", "README.md", "x.bin")
            }
        ),
    }
    with serve_hub(repos) as running:
        yield running


def builder_env(hub_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    """A clean environment: loopback Hub, private HF_HOME, no proxy, no inherited token."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("HF_", "HUGGING", "RUNPOD_")) and "proxy" not in key.lower()
    }
    env.update(
        {
            "HF_ENDPOINT": hub_url,
            "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_ETAG_TIMEOUT": "10",
            "NO_PROXY": "127.0.0.1,localhost",
            "HOME": str(tmp_path / "home"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def run_builder(
    hub: FakeHub, tmp_path: Path, *args: str, token_file: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    token_args = ["--token-file", str(token_file or tmp_path / "no-such-secret")]
    hub.requests.clear()  # hub.requests: this run's requests only
    return subprocess.run(
        [sys.executable, str(BUILDER), *args, "--dest", str(tmp_path / "models"), *token_args],
        env=builder_env(hub.url, tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=BUILDER_TIMEOUT_S,
        check=False,
    )


def secret_file(tmp_path: Path, token: str = TOKEN) -> Path:
    path = tmp_path / "hf_token"
    path.write_text(token + "\n")  # as `echo $HF_TOKEN > file` leaves it
    return path


def read_manifest(tmp_path: Path) -> dict[str, Any]:
    return dict(json.loads((tmp_path / "models" / "manifest.json").read_text()))


def snapshot_files(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}


def assert_one_line_error(
    result: subprocess.CompletedProcess[str], *fragments: str, only_line: bool = True
) -> str:
    """Exit status 1 and one error line on stderr (the last one, with debug logs on)."""
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if only_line:
        assert len(lines) == 1, result.stderr
    line = lines[-1]
    assert line.startswith("download_model: error: "), line
    for fragment in fragments:
        assert fragment in line
    return line


# --- what gets downloaded ------------------------------------------------------------------


def test_a_repo_with_safetensors_and_bin_gets_only_the_safetensors(
    hub: FakeHub, tmp_path: Path
) -> None:
    result = run_builder(hub, tmp_path, "--model", LLAMA)

    assert result.returncode == 0, result.stderr
    manifest = read_manifest(tmp_path)
    assert snapshot_files(Path(manifest["path"])) == set(LLAMA_KEPT)
    assert hub.resolved_files(LLAMA) >= set(LLAMA_KEPT)
    assert not hub.resolved_files(LLAMA) & set(LLAMA_DROPPED)
    # The files are the Hub's bytes.
    assert (Path(manifest["path"]) / "config.json").read_bytes() == _bytes("config.json")
    # One line on stdout says where it all went.
    assert str(tmp_path / "models") in result.stdout
    assert manifest["path"] in result.stdout


def test_a_repo_with_only_bin_weights_gets_the_bin_weights(hub: FakeHub, tmp_path: Path) -> None:
    result = run_builder(hub, tmp_path, "--model", "org/bin-only")

    assert result.returncode == 0, result.stderr
    manifest = read_manifest(tmp_path)
    assert snapshot_files(Path(manifest["path"])) == set(BIN_ONLY_KEPT)
    assert manifest["files"] == sorted(BIN_ONLY_KEPT)
    assert manifest["weight_format"] == "pytorch"


def test_the_manifest_names_the_public_repo_the_commit_and_the_files(
    hub: FakeHub, tmp_path: Path
) -> None:
    result = run_builder(hub, tmp_path, "--model", LLAMA)

    assert result.returncode == 0, result.stderr
    manifest = read_manifest(tmp_path)
    commit = hub.repos[LLAMA].refs["main"]
    cache = (tmp_path / "models").resolve()
    snapshot = cache / "models--meta-llama--Llama-2-7b-chat-hf" / "snapshots" / commit
    assert manifest["model_name"] == LLAMA
    assert manifest["revision"] == commit
    assert manifest["requested_revision"] == "main"
    assert manifest["path"] == str(snapshot)
    assert manifest["tokenizer_name"] == LLAMA
    assert manifest["tokenizer_path"] == str(snapshot)
    assert manifest["files"] == sorted(LLAMA_KEPT)
    assert manifest["weight_format"] == "safetensors"
    assert manifest["hf_hub_cache"] == str(cache)
    assert manifest["total_bytes"] == sum((snapshot / f).stat().st_size for f in LLAMA_KEPT)
    # The cache records main -> commit: how an offline worker finds the snapshot.
    ref = cache / "models--meta-llama--Llama-2-7b-chat-hf" / "refs" / "main"
    assert ref.read_text() == commit
    assert not (cache / ".locks").exists()


def test_a_tag_is_downloaded_at_its_commit_and_recorded(hub: FakeHub, tmp_path: Path) -> None:
    result = run_builder(hub, tmp_path, "--model", "org/bin-only", "--revision", "v1.0")

    assert result.returncode == 0, result.stderr
    manifest = read_manifest(tmp_path)
    assert manifest["revision"] == PINNED_COMMIT
    assert manifest["requested_revision"] == "v1.0"
    assert Path(manifest["path"]).name == PINNED_COMMIT
    refs = tmp_path / "models" / "models--org--bin-only" / "refs"
    assert (refs / "v1.0").read_text() == PINNED_COMMIT


def test_a_separate_tokenizer_repo_gets_only_its_tokenizer_files(
    hub: FakeHub, tmp_path: Path
) -> None:
    result = run_builder(
        hub, tmp_path, "--model", "org/bin-only", "--tokenizer", "org/tokenizer-only"
    )

    assert result.returncode == 0, result.stderr
    manifest = read_manifest(tmp_path)
    assert manifest["tokenizer_name"] == "org/tokenizer-only"
    assert manifest["tokenizer_revision"] == hub.repos["org/tokenizer-only"].refs["main"]
    assert snapshot_files(Path(manifest["tokenizer_path"])) == {
        "tokenizer.json",
        "tokenizer_config.json",
    }


def test_a_snapshot_baked_here_is_found_offline_under_its_public_name(
    hub: FakeHub, tmp_path: Path
) -> None:
    """What vLLM does with HF_HUB_OFFLINE=1 (``repo_utils.get_model_path``), no Hub running."""
    assert run_builder(hub, tmp_path, "--model", LLAMA).returncode == 0
    lookup = (
        "import sys, huggingface_hub as h; print(h.snapshot_download("
        "sys.argv[1], revision=None, local_files_only=True, ignore_patterns='*'))"
    )
    env = builder_env(
        "http://127.0.0.1:9",  # nothing listens there: any request would fail
        tmp_path,
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(tmp_path / "models"),
    )
    result = subprocess.run(
        [sys.executable, "-c", lookup, LLAMA],
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILDER_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == read_manifest(tmp_path)["path"]


# --- failures: one line, non-zero ----------------------------------------------------------


def test_a_missing_repo_fails_with_one_line(hub: FakeHub, tmp_path: Path) -> None:
    result = run_builder(hub, tmp_path, "--model", "org/does-not-exist")

    assert_one_line_error(result, "org/does-not-exist", "not found")
    assert not (tmp_path / "models" / "manifest.json").exists()


def test_a_missing_revision_fails_with_one_line(hub: FakeHub, tmp_path: Path) -> None:
    result = run_builder(hub, tmp_path, "--model", LLAMA, "--revision", "no-such-branch")

    assert_one_line_error(result, LLAMA, "no-such-branch", "not found")


def test_a_gated_repo_without_a_token_fails_with_one_line(hub: FakeHub, tmp_path: Path) -> None:
    result = run_builder(hub, tmp_path, "--model", "meta-llama/Llama-2-7b-chat-gated")

    assert_one_line_error(result, "meta-llama/Llama-2-7b-chat-gated", "gated", "hf_token")


def test_a_repo_without_weights_fails_with_one_line(hub: FakeHub, tmp_path: Path) -> None:
    result = run_builder(hub, tmp_path, "--model", "org/no-weights")

    assert_one_line_error(result, "org/no-weights", "weights")


def test_bad_arguments_exit_2(hub: FakeHub, tmp_path: Path) -> None:
    result = run_builder(hub, tmp_path)  # no --model

    assert result.returncode == 2
    assert "--model" in result.stderr


# --- the token -----------------------------------------------------------------------------


def test_the_token_file_is_used_and_never_printed(hub: FakeHub, tmp_path: Path) -> None:
    # HF_DEBUG and debug verbosity: every request and its headers are logged.
    result = run_builder(
        hub,
        tmp_path,
        "--model",
        "meta-llama/Llama-2-7b-chat-gated",
        token_file=secret_file(tmp_path),
        HF_DEBUG="1",
        HF_HUB_VERBOSITY="debug",
    )

    assert result.returncode == 0, result.stderr
    gated = [r for r in hub.requests if "Llama-2-7b-chat-gated/resolve" in r.path]
    assert gated and all(r.authorization == f"Bearer {TOKEN}" for r in gated)
    assert TOKEN not in result.stdout + result.stderr
    assert "SECRET" not in result.stdout + result.stderr
    assert TOKEN not in json.dumps(read_manifest(tmp_path))


def test_hf_token_is_used_when_there_is_no_token_file(hub: FakeHub, tmp_path: Path) -> None:
    result = run_builder(
        hub, tmp_path, "--model", "meta-llama/Llama-2-7b-chat-gated", HF_TOKEN=TOKEN
    )

    assert result.returncode == 0, result.stderr
    assert TOKEN not in result.stdout + result.stderr


def test_the_token_is_not_printed_when_access_is_refused(hub: FakeHub, tmp_path: Path) -> None:
    result = run_builder(
        hub,
        tmp_path,
        "--model",
        "org/gated-for-others",
        token_file=secret_file(tmp_path),
        HF_DEBUG="1",
        HF_HUB_VERBOSITY="debug",
    )

    assert_one_line_error(result, "org/gated-for-others", "gated", "no access", only_line=False)
    assert any(r.authorization == f"Bearer {TOKEN}" for r in hub.requests)
    assert "SECRET" not in result.stdout + result.stderr


def test_the_token_is_masked_when_an_error_message_echoes_it(hub: FakeHub, tmp_path: Path) -> None:
    """A server (or proxy) that puts the credential in its error reply."""
    result = run_builder(
        hub, tmp_path, "--model", "org/echoes-credentials", token_file=secret_file(tmp_path)
    )

    line = assert_one_line_error(result, "org/echoes-credentials", "HTTP 403")
    assert "credential Bearer ***" in line  # the echo is there, masked
    assert "SECRET" not in result.stdout + result.stderr


# --- the selection rules, directly ---------------------------------------------------------


# --- end to end: baked snapshot -> worker, offline -----------------------------------------


def test_the_worker_serves_a_baked_model_offline_by_its_public_name(
    tiny_model_dir: Path, worker_env: dict[str, str], tmp_path: Path
) -> None:
    """Bake the tiny model from the stand-in Hub at a pinned commit, stop the Hub, then
    run one job as the image does: MODEL_NAME=<public repo id>, HF_HUB_OFFLINE=1,
    HF_HUB_CACHE=<dest>, MODEL_REVISION and TOKENIZER_REVISION (the Dockerfile's ENV).
    An unpinned bake is found offline as vLLM finds it (the test above), and the image
    checks serve one (tests/image)."""
    repo_id = "tiny-org/tiny-llama-chat"
    files = {p.name: p.read_bytes() for p in tiny_model_dir.iterdir() if p.is_file()}
    files["README.md"] = b"# tiny\n"
    repo = FakeRepo(files)
    revision = repo.refs["main"]
    with serve_hub({repo_id: repo}) as stand_in:
        baked = run_builder(stand_in, tmp_path, "--model", repo_id, "--revision", revision)
    assert baked.returncode == 0, baked.stderr
    assert "README.md" not in read_manifest(tmp_path)["files"]

    env = {k: v for k, v in worker_env.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(TINY_ENGINE_ENV)
    env.update(
        {
            "MODEL_NAME": repo_id,
            "MODEL_REVISION": revision,
            "TOKENIZER_REVISION": revision,
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_CACHE": str(tmp_path / "models"),
            "HF_HOME": str(tmp_path / "hf-home"),
            "HF_ENDPOINT": "http://127.0.0.1:9",  # nothing listens: no request may succeed
        }
    )
    request = {"input": {"prompt": "Tell me a story", "sampling_params": {"max_tokens": 8}}}
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "src" / "handler.py"),
            "--test_input",
            json.dumps(request),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Job result: " in result.stdout
    # vLLM itself swapped the repo id for the baked snapshot.
    assert f"replace model_id [{repo_id}]" in result.stdout + result.stderr
