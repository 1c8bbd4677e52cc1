"""builder/download_model.py's pure rules: which files a repo's snapshot keeps, exact
patterns, the stream that masks the token. Its downloads are in tests/e2e/test_builder.py."""

from __future__ import annotations

import pytest

from helpers import load_builder

TOKEN = "hf_test_SECRET_7c1f0e9a2b4d4f6e8a0c"


def test_select_files_rules() -> None:
    builder = load_builder()
    files, weight_format = builder.select_files(
        [
            "config.json",
            "model.safetensors",
            "pytorch_model.bin",
            "tokenizer.json",
            "vocab.json",
            "merges.txt",
            "chat_template.json",
            "sub/model.safetensors",
        ]
    )
    assert weight_format == "safetensors"
    # vocab.json/merges.txt are redundant beside a tokenizer.json.
    assert files == ["chat_template.json", "config.json", "model.safetensors", "tokenizer.json"]

    files, weight_format = builder.select_files(
        ["config.json", "model.pt", "training_args.bin", "vocab.json", "merges.txt"]
    )
    assert weight_format == "pytorch"
    assert files == ["config.json", "merges.txt", "model.pt", "vocab.json"]

    files, _ = builder.select_files(
        ["config.json", "a.safetensors", "b.safetensors", "consolidated.safetensors"],
        weight_map={"x": "a.safetensors", "y": "b.safetensors"},
    )
    assert files == ["a.safetensors", "b.safetensors", "config.json"]

    with pytest.raises(builder.BuildError, match=r"config\.json"):
        builder.select_files(["model.safetensors"])


def test_exact_patterns_match_only_their_file() -> None:
    from fnmatch import fnmatch

    builder = load_builder()
    pattern = builder.as_exact_pattern("weird[1]*?.bin")
    assert fnmatch("weird[1]*?.bin", pattern)
    assert not fnmatch("weird1xx.bin", pattern)


def test_the_redacting_stream_masks_every_occurrence() -> None:
    import io

    builder = load_builder()
    sink = io.StringIO()
    stream = builder.RedactingStream(sink, [TOKEN])
    stream.write(f"a {TOKEN} b {TOKEN}\n")
    assert sink.getvalue() == "a *** b ***\n"
