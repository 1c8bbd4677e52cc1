"""Where the model comes from: the baked image's manifest, offline mode, the network volume.

Real files in temporary folders; no engine, no network.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from vllm_worker import model_source
from vllm_worker.errors import SettingsError
from vllm_worker.main import main
from vllm_worker.model_source import BakedModel, prepare
from vllm_worker.settings import Settings

LLAMA = "meta-llama/Llama-2-7b-chat-hf"
COMMIT = "f5db02db724555f92da89c216ac04704f23d4590"
TAG_COMMIT = "a" * 40


def write_manifest(cache: Path, **overrides: Any) -> Path:
    """A manifest as builder/download_model.py writes it (same keys, same meaning)."""
    snapshot = cache / "models--meta-llama--Llama-2-7b-chat-hf" / "snapshots" / COMMIT
    manifest = {
        "model_name": LLAMA,
        "revision": COMMIT,
        "requested_revision": "main",
        "path": str(snapshot),
        "tokenizer_name": LLAMA,
        "tokenizer_revision": COMMIT,
        "tokenizer_path": str(snapshot),
        "files": ["config.json", "model-00001-of-00002.safetensors"],
        "weight_format": "safetensors",
        "total_bytes": 13_476_839_424,
        "hf_hub_cache": str(cache),
    }
    manifest.update(overrides)
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


@pytest.fixture
def baked_cache(tmp_path: Path) -> Path:
    cache = tmp_path / "models"
    write_manifest(cache)
    return cache


@pytest.fixture
def no_volume(tmp_path: Path) -> str:
    return str(tmp_path / "no-volume-here")


def settings_for(cache: Path | None, volume: str, **env: str) -> Settings:
    environ = {"RUNPOD_VOLUME_PATH": volume, **env}
    if cache is not None:
        environ["HF_HUB_CACHE"] = str(cache)
    return Settings.from_env(environ)


# --- the baked model's manifest -----------------------------------------------------------


def test_the_baked_model_and_its_commit_are_logged_at_start_up(
    baked_cache: Path, no_volume: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(baked_cache, no_volume, MODEL_NAME=LLAMA, HF_HUB_OFFLINE="1")

    with caplog.at_level(logging.INFO, logger="vllm_worker"):
        prepared = prepare(settings)

    assert prepared == settings  # nothing to change: vLLM finds the snapshot itself
    (record,) = [r for r in caplog.records if r.name == "vllm_worker.model_source"]
    assert record.levelno == logging.INFO
    message = record.getMessage()
    assert f"model: {LLAMA} at {COMMIT}, baked into the image" in message
    assert "13.48 GB" in message
    assert message.endswith("; offline")


def test_without_a_cache_or_a_manifest_nothing_is_baked(no_volume: str, tmp_path: Path) -> None:
    assert model_source.read_manifest(settings_for(None, no_volume)) is None
    empty_cache = tmp_path / "empty"
    empty_cache.mkdir()
    assert model_source.read_manifest(settings_for(empty_cache, no_volume)) is None


def test_model_manifest_names_the_manifest_elsewhere(tmp_path: Path, no_volume: str) -> None:
    path = write_manifest(tmp_path / "elsewhere", requested_revision="v1.0", revision=TAG_COMMIT)

    baked = model_source.read_manifest(
        settings_for(tmp_path / "cache", no_volume, MODEL_MANIFEST=str(path))
    )

    assert baked is not None
    assert (baked.model_name, baked.revision, baked.requested_revision) == (
        LLAMA,
        TAG_COMMIT,
        "v1.0",
    )
    assert baked.manifest_path == str(path)


def test_a_missing_model_manifest_stops_start_up(tmp_path: Path, no_volume: str) -> None:
    missing = tmp_path / "nope" / "manifest.json"
    with pytest.raises(SettingsError, match=f"MODEL_MANIFEST={missing} does not exist"):
        prepare(settings_for(None, no_volume, MODEL_MANIFEST=str(missing)))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "cannot be read: JSONDecodeError"),
        ("[1, 2]", "is not a JSON object"),
        (json.dumps({"revision": COMMIT}), "has no model_name"),
        (json.dumps({"model_name": LLAMA, "revision": ""}), "has no revision"),
    ],
)
def test_a_broken_manifest_stops_start_up_with_one_line(
    tmp_path: Path, no_volume: str, content: str, expected: str
) -> None:
    cache = tmp_path / "models"
    cache.mkdir()
    (cache / "manifest.json").write_text(content)

    with pytest.raises(SettingsError) as raised:
        prepare(settings_for(cache, no_volume, HF_HUB_OFFLINE="1"))

    assert expected in str(raised.value)
    assert str(cache / "manifest.json") in str(raised.value)
    assert "\n" not in str(raised.value)


def test_optional_manifest_fields_default_to_the_model_and_its_commit() -> None:
    baked = model_source.parse_manifest({"model_name": "org/m", "revision": COMMIT}, "m.json")
    assert baked == BakedModel(
        manifest_path="m.json",
        model_name="org/m",
        revision=COMMIT,
        requested_revision=COMMIT,
        tokenizer_name="org/m",
        tokenizer_revision=COMMIT,
        path="",
        total_bytes=None,
    )


# --- offline: only what the image holds ---------------------------------------------------


def test_offline_a_model_the_image_does_not_hold_stops_start_up_with_exit_code_2(
    baked_cache: Path,
    no_volume: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("VLLM_LOGGING_STREAM", raising=False)  # main sets it: undone after
    environ = {
        "HF_HUB_CACHE": str(baked_cache),
        "HF_HUB_OFFLINE": "1",
        "MODEL_NAME": "mistralai/Mistral-7B-Instruct-v0.2",
        "RUNPOD_VOLUME_PATH": no_volume,
    }

    assert main(["--test_input", '{"input": {"prompt": "hi"}}'], environ=environ) == 2

    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        f"vllm-worker: cannot start: the image bakes {LLAMA} at main ({COMMIT}); "
        "MODEL_NAME=mistralai/Mistral-7B-Instruct-v0.2 is not in it: set HF_HUB_OFFLINE=0 "
        "to download it, or rebuild the image with "
        "--build-arg MODEL_NAME=mistralai/Mistral-7B-Instruct-v0.2"
    ]


@pytest.mark.parametrize(
    "revision",
    [None, "main", COMMIT],
    ids=["unset", "the-branch-baked", "the-commit-baked"],
)
def test_offline_the_baked_model_at_a_revision_it_holds_starts(
    baked_cache: Path, no_volume: str, revision: str | None
) -> None:
    env = {"MODEL_NAME": LLAMA, "HF_HUB_OFFLINE": "1"}
    if revision is not None:
        env["MODEL_REVISION"] = revision
    settings = settings_for(baked_cache, no_volume, **env)

    assert prepare(settings) == settings


def test_offline_another_revision_of_the_baked_model_stops_start_up(
    baked_cache: Path, no_volume: str
) -> None:
    settings = settings_for(
        baked_cache, no_volume, MODEL_NAME=LLAMA, MODEL_REVISION="v2.0", HF_HUB_OFFLINE="1"
    )

    with pytest.raises(SettingsError) as raised:
        prepare(settings)

    assert str(raised.value) == (
        f"the image bakes {LLAMA} at main ({COMMIT}); MODEL_REVISION=v2.0 is not in it: "
        "set MODEL_REVISION=main to serve the baked model, HF_HUB_OFFLINE=0 to download "
        "v2.0, or rebuild the image with --build-arg MODEL_REVISION=v2.0"
    )


def test_offline_an_image_baked_at_a_tag_needs_that_revision(
    tmp_path: Path, no_volume: str
) -> None:
    """The cache records refs/v1.0 only: vLLM's lookup of `main` would fail offline."""
    cache = tmp_path / "models"
    write_manifest(cache, requested_revision="v1.0", revision=TAG_COMMIT)

    unset = settings_for(cache, no_volume, MODEL_NAME=LLAMA, HF_HUB_OFFLINE="1")
    with pytest.raises(SettingsError, match=r"MODEL_REVISION unset \(main\) is not in it: set "):
        prepare(unset)
    for revision in ("v1.0", TAG_COMMIT):
        pinned = settings_for(
            cache, no_volume, MODEL_NAME=LLAMA, MODEL_REVISION=revision, HF_HUB_OFFLINE="1"
        )
        assert prepare(pinned) == pinned


def test_offline_a_tokenizer_the_image_does_not_hold_stops_start_up(
    baked_cache: Path, no_volume: str
) -> None:
    settings = settings_for(
        baked_cache,
        no_volume,
        MODEL_NAME=LLAMA,
        TOKENIZER_NAME="hf-internal-testing/llama-tokenizer",
        HF_HUB_OFFLINE="1",
    )
    with pytest.raises(SettingsError, match="TOKENIZER_NAME=hf-internal-testing/llama-tokenizer"):
        prepare(settings)

    same = settings_for(
        baked_cache, no_volume, MODEL_NAME=LLAMA, TOKENIZER_NAME=LLAMA, HF_HUB_OFFLINE="1"
    )
    assert prepare(same) == same


def test_offline_a_local_model_folder_is_not_checked_against_the_image(
    baked_cache: Path, no_volume: str, tmp_path: Path
) -> None:
    local = tmp_path / "my-model"
    local.mkdir()
    settings = settings_for(
        baked_cache, no_volume, MODEL_NAME=str(local), TOKENIZER_NAME=str(local), HF_HUB_OFFLINE="1"
    )

    assert prepare(settings) == settings


def test_online_any_model_may_be_downloaded(
    baked_cache: Path, no_volume: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(
        baked_cache, no_volume, MODEL_NAME="org/other", MODEL_REVISION="dev", HF_HUB_OFFLINE="0"
    )

    with caplog.at_level(logging.INFO, logger="vllm_worker"):
        assert prepare(settings) == settings

    assert f"not the model baked into the image ({LLAMA} at {COMMIT})" in caplog.text
    assert "; online" in caplog.text


@pytest.mark.parametrize(
    ("env", "offline"),
    [
        ({}, False),
        ({"HF_HUB_OFFLINE": "1"}, True),
        ({"HF_HUB_OFFLINE": "TRUE"}, True),
        ({"HF_HUB_OFFLINE": "off"}, False),
        ({"TRANSFORMERS_OFFLINE": "yes"}, True),
        # huggingface_hub reads TRANSFORMERS_OFFLINE only when HF_HUB_OFFLINE is unset.
        ({"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "1"}, False),
        ({"HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "1"}, True),
    ],
)
def test_offline_mode_is_read_as_huggingface_hub_reads_it(
    env: dict[str, str], offline: bool
) -> None:
    assert model_source.is_offline(Settings.from_env(env)) is offline


def test_an_hf_hub_offline_value_huggingface_hub_would_misread_is_refused() -> None:
    with pytest.raises(SettingsError, match=r"^HF_HUB_OFFLINE='ture' is invalid: must be 1, 0"):
        Settings.from_env({"HF_HUB_OFFLINE": "ture"})


# --- without a baked model: the network volume ------------------------------------------------


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    path = tmp_path / "runpod-volume"
    path.mkdir()
    return path


def test_a_mounted_volume_is_the_download_dir_when_nothing_else_is_set(
    volume: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(None, str(volume))

    with caplog.at_level(logging.INFO, logger="vllm_worker"):
        prepared = prepare(settings)

    expected = str(volume / "huggingface-cache" / "hub")
    assert prepared.download_dir == expected
    assert prepared.model_copy(update={"download_dir": None}) == settings
    assert f"weights in the network volume's cache {expected}" in caplog.text


def test_an_unbaked_image_uses_the_volume_although_it_sets_hf_hub_cache(
    volume: Path, tmp_path: Path
) -> None:
    """The image sets HF_HUB_CACHE=/models whether or not it baked a model."""
    unbaked = tmp_path / "models"  # BAKE_MODEL=0: nothing there, not even the folder
    settings = settings_for(unbaked, str(volume))

    assert prepare(settings).download_dir == str(volume / "huggingface-cache" / "hub")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"DOWNLOAD_DIR": "/data/weights"}, "/data/weights"),
        ({"HF_HOME": "/data/hf"}, None),
    ],
    ids=["DOWNLOAD_DIR", "HF_HOME"],
)
def test_a_cache_chosen_by_the_user_wins_over_the_volume(
    volume: Path, env: dict[str, str], expected: str | None
) -> None:
    assert prepare(settings_for(None, str(volume), **env)).download_dir == expected


def test_a_baked_model_wins_over_the_volume(volume: Path, baked_cache: Path) -> None:
    settings = settings_for(baked_cache, str(volume), MODEL_NAME=LLAMA, HF_HUB_OFFLINE="1")
    assert prepare(settings).download_dir is None


def test_another_model_than_the_baked_one_is_downloaded_to_the_volume(
    volume: Path, baked_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(baked_cache, str(volume), MODEL_NAME="org/other", HF_HUB_OFFLINE="0")

    with caplog.at_level(logging.INFO, logger="vllm_worker"):
        prepared = prepare(settings)

    expected = str(volume / "huggingface-cache" / "hub")
    assert prepared.download_dir == expected
    assert f"not the model baked into the image ({LLAMA} at {COMMIT}); weights in {expected}" in (
        caplog.text
    )


def test_without_a_volume_the_download_dir_is_left_alone(no_volume: str) -> None:
    assert prepare(settings_for(None, no_volume)).download_dir is None
    kept = prepare(settings_for(None, no_volume, DOWNLOAD_DIR="/data/weights"))
    assert kept.download_dir == "/data/weights"


def test_a_file_at_the_volume_path_is_not_a_volume(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "runpod-volume"
    not_a_dir.write_text("")
    assert prepare(settings_for(None, str(not_a_dir))).download_dir is None


def test_a_local_folder_is_said_to_be_one_not_the_hub_cache() -> None:
    from vllm_worker.model_source import describe

    settings = Settings.from_env({"MODEL_NAME": "/models/my-llama", "HF_HUB_CACHE": "/models"})
    line = describe(settings, None, None, local=True)
    assert line == "model: /models/my-llama; weights from that local folder; online"
    assert "Hugging Face cache" not in line
