"""Download a chat model from the Hugging Face Hub into an image, at build time.

Usage (the Dockerfile runs this when ``BAKE_MODEL=1``)::

    python builder/download_model.py --model meta-llama/Llama-2-7b-chat-hf \\
        [--revision R] [--tokenizer T] [--tokenizer-revision TR] [--dest /models] \\
        [--token-file /run/secrets/hf_token]

What it writes
    ``--dest`` is used as a Hugging Face Hub cache (``HF_HUB_CACHE``): the files land in
    ``<dest>/models--<org>--<name>/snapshots/<commit>/`` and the revision asked for is
    recorded under ``refs/``. A worker started with ``HF_HUB_CACHE=<dest>``,
    ``HF_HUB_OFFLINE=1`` and ``MODEL_NAME`` set to the *public* repo id loads these
    files without any network access: vLLM (``EngineArgs``, offline mode) replaces the
    repo id with this snapshot folder itself. ``<dest>/manifest.json`` records what was
    baked: the public repo id, the commit, the local folder and the file list.

Which files
    Only what vLLM needs to serve a chat model: ``config.json``,
    ``generation_config.json``, the tokenizer files, the chat template files and ONE set
    of weights: the safetensors files (only those named by
    ``model.safetensors.index.json`` when there is one) if the repo has any, otherwise
    the PyTorch ``*.bin`` / ``*.pt`` files. Files in sub-folders (``original/``...),
    READMEs, licences and ``.gitattributes`` are never downloaded.

The token
    Read from ``--token-file`` (the BuildKit secret ``/run/secrets/hf_token``) or else
    the ``HF_TOKEN`` variable. It is never printed: everything this process writes to
    stdout or stderr (its own messages, library logs, progress bars, error messages that
    echo a server reply) passes through a filter that masks it.

Exit status: 0 on success; 1 with a one-line message on stderr on failure (missing or
gated repo, unknown revision, no weights, ...); 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

PROG = "download_model"
DEFAULT_DEST = "/models"
DEFAULT_TOKEN_FILE = "/run/secrets/hf_token"
MANIFEST_NAME = "manifest.json"

CONFIG_FILES = frozenset({"config.json", "generation_config.json"})
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
    }
)
# Older tokenizers that have no tokenizer.json / tokenizer.model need these instead.
LEGACY_TOKENIZER_FILES = frozenset({"vocab.json", "merges.txt", "vocab.txt"})
CHAT_TEMPLATE_FILES = frozenset({"chat_template.jinja", "chat_template.json"})
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Files with a weight suffix that are not model weights (left behind by training).
_NOT_WEIGHTS = re.compile(r"^(training_args|optimizer|scheduler|rng_state|scaler)\b")


class BuildError(Exception):
    """A failure explained in one line; the message must not contain the token."""


# --- the token ---------------------------------------------------------------------------


def read_token(token_file: str | None, environ: Mapping[str, str]) -> str | None:
    """The Hub token from ``token_file`` if it exists and is not empty, else ``HF_TOKEN``."""
    if token_file:
        path = Path(token_file)
        if path.is_file():
            try:
                token = path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as error:
                # Never include the content; the path and the error kind are enough.
                raise BuildError(
                    f"cannot read the token file {token_file}: {type(error).__name__}"
                ) from None
            if token:
                return token
    token = environ.get("HF_TOKEN", "").strip()
    return token or None


class RedactingStream(io.TextIOBase):
    """A text stream that writes to ``stream`` with every secret replaced by ``***``."""

    def __init__(self, stream: TextIO, secrets: Iterable[str]) -> None:
        super().__init__()
        self._stream = stream
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def write(self, text: str) -> int:
        self._stream.write(self.redact(text))
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:  # type: ignore[override]
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._stream, "encoding", "utf-8")


# --- which files -------------------------------------------------------------------------


def is_weight_file(name: str, suffixes: tuple[str, ...]) -> bool:
    return name.endswith(suffixes) and not _NOT_WEIGHTS.match(name)


def select_files(
    repo_files: Iterable[str], weight_map: Mapping[str, str] | None = None
) -> tuple[list[str], str]:
    """The files to download from a repo listing, and the weight format chosen.

    ``weight_map`` is the ``weight_map`` of ``model.safetensors.index.json`` when the
    caller has read it: the safetensors files are then exactly the ones it names.
    Raises ``BuildError`` when the repo has no ``config.json`` or no weights.
    """
    # Top-level files only: sub-folders hold other formats (original/, onnx/, ...).
    top = {name for name in repo_files if "/" not in name}
    if "config.json" not in top:
        raise BuildError("the repo has no config.json: not a Transformers model")

    safetensors = sorted(n for n in top if is_weight_file(n, (".safetensors",)))
    if safetensors:
        weight_format = "safetensors"
        if weight_map:
            named = set(weight_map.values())
            missing = named - top
            if missing:
                raise BuildError(
                    f"{SAFETENSORS_INDEX} names files the repo does not have: "
                    f"{', '.join(sorted(missing))}"
                )
            safetensors = sorted(named)
        weights = safetensors + sorted(n for n in top if n.endswith(".safetensors.index.json"))
    else:
        weight_format = "pytorch"
        weights = sorted(n for n in top if is_weight_file(n, (".bin", ".pt")))
        if not weights:
            raise BuildError("the repo has no *.safetensors, *.bin or *.pt weights")
        weights += sorted(n for n in top if n.endswith((".bin.index.json", ".pt.index.json")))

    return sorted(set(weights) | tokenizer_selection(top) | (CONFIG_FILES & top)), weight_format


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def select_adapter_files(repo_files: Iterable[str]) -> list[str]:
    """A LoRA adapter's files: its config, its weights (safetensors when it has them) and
    the tokenizer files some adapters bring. ``BuildError`` when it is not an adapter."""
    top = {name for name in repo_files if "/" not in name}
    if ADAPTER_CONFIG not in top:
        raise BuildError(f"the repo has no {ADAPTER_CONFIG}: not a LoRA (PEFT) adapter")
    weights = next(([name] for name in ADAPTER_WEIGHTS if name in top), [])
    if not weights:
        raise BuildError(f"the repo has none of {', '.join(ADAPTER_WEIGHTS)}")
    return sorted({ADAPTER_CONFIG, *weights} | tokenizer_selection(top))


def adapter_repos(lora_modules: str) -> list[str]:
    """The Hugging Face repo ids among ``LORA_MODULES``' sources (``name=source`` pairs;
    a source that is a path is not downloaded: it is the worker's to mount)."""
    sources = [item.partition("=")[2] for item in lora_modules.replace(",", " ").split()]
    return [s for s in sources if s and not s.startswith(("/", ".", "~"))]


def tokenizer_selection(top: set[str]) -> set[str]:
    """The tokenizer and chat template files among the top-level files ``top``."""
    chosen = set((TOKENIZER_FILES | CHAT_TEMPLATE_FILES) & top)
    if not {"tokenizer.json", "tokenizer.model"} & top:
        chosen |= LEGACY_TOKENIZER_FILES & top
    return chosen


def as_exact_pattern(name: str) -> str:
    """An fnmatch pattern that matches exactly ``name`` (``[``, ``*``, ``?`` escaped)."""
    return re.sub(r"([\[*?])", r"[\1]", name)


# --- downloading -------------------------------------------------------------------------


def _hub() -> Any:
    import huggingface_hub

    return huggingface_hub


def _repo_listing(
    repo_id: str, revision: str, token: str | None
) -> tuple[str, dict[str, int | None]]:
    """The commit that ``revision`` points to, and the repo's files (name -> size) there."""
    info = (
        _hub()
        .HfApi(token=token)
        .model_info(repo_id, revision=revision, files_metadata=True, token=token)
    )
    if not info.sha:
        raise BuildError("the Hub returned no commit")
    return info.sha, {s.rfilename: getattr(s, "size", None) for s in info.siblings or ()}


def _snapshot(
    repo_id: str, revision: str, files: Sequence[str], dest: Path, token: str | None
) -> Path:
    path = _hub().snapshot_download(
        repo_id,
        revision=revision,
        cache_dir=dest,
        allow_patterns=[as_exact_pattern(name) for name in files],
        token=token,
    )
    return Path(path)


def _read_weight_map(
    repo_id: str, revision: str, dest: Path, token: str | None
) -> dict[str, str] | None:
    index = _snapshot(repo_id, revision, [SAFETENSORS_INDEX], dest, token) / SAFETENSORS_INDEX
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError):
        raise BuildError(f"{SAFETENSORS_INDEX} is not valid JSON") from None
    if not isinstance(weight_map, dict):
        return None
    return {str(key): str(value) for key, value in weight_map.items()}


def download_repo(
    repo_id: str,
    revision: str,
    dest: Path,
    token: str | None,
    *,
    tokenizer_only: bool = False,
    adapter: bool = False,
) -> dict[str, Any]:
    """Download the selected files of ``repo_id@revision`` into the cache ``dest``."""
    try:
        return _download_repo(
            repo_id, revision, dest, token, tokenizer_only=tokenizer_only, adapter=adapter
        )
    except BuildError as error:
        raise BuildError(f"{repo_id}@{revision}: {error}") from None
    except Exception as error:
        raise BuildError(describe_error(error, repo_id, revision, token is not None)) from None


def _download_repo(
    repo_id: str,
    revision: str,
    dest: Path,
    token: str | None,
    *,
    tokenizer_only: bool,
    adapter: bool = False,
) -> dict[str, Any]:
    commit, repo_files = _repo_listing(repo_id, revision, token)
    top = {name for name in repo_files if "/" not in name}
    weight_format: str | None = None
    if adapter:
        files = select_adapter_files(repo_files)
    elif tokenizer_only:
        if not (TOKENIZER_FILES | LEGACY_TOKENIZER_FILES) & top:
            raise BuildError("the repo has no tokenizer files")
        files = sorted(tokenizer_selection(top) | ({"config.json"} & top))
    else:
        weight_map = None
        if SAFETENSORS_INDEX in top:
            weight_map = _read_weight_map(repo_id, revision, dest, token)
        files, weight_format = select_files(repo_files, weight_map)

    sizes = [size for name in files if (size := repo_files.get(name)) is not None]
    expected = f", {sum(sizes) / 1e9:.2f} GB" if len(sizes) == len(files) else ""
    print(f"{PROG}: downloading {repo_id}@{commit}: {len(files)} files{expected}", flush=True)
    # Download by the revision asked for (not the commit) so that the cache records
    # refs/<revision>: that is how an offline worker finds the snapshot again.
    snapshot = _snapshot(repo_id, revision, files, dest, token)
    if snapshot.name != commit:
        raise BuildError(
            f"the revision moved from {commit} to {snapshot.name} during the download; build again"
        )
    missing = [name for name in files if not (snapshot / name).is_file()]
    if missing:
        raise BuildError(f"files missing after the download: {', '.join(missing)}")
    return {
        "repo_id": repo_id,
        "commit": commit,
        "path": str(snapshot),
        "files": files,
        "weight_format": weight_format,
        "total_bytes": sum((snapshot / name).stat().st_size for name in files),
    }


def build(
    model: str,
    *,
    revision: str | None,
    tokenizer: str | None,
    tokenizer_revision: str | None,
    dest: Path,
    token: str | None,
    adapters: Sequence[str] = (),
) -> dict[str, Any]:
    """Download the model (and a separate tokenizer, and LoRA adapters, if any); write and
    return the manifest."""
    revision = revision or "main"
    # vLLM's rule: the tokenizer's revision defaults to the model's.
    tokenizer_revision = tokenizer_revision or revision
    tokenizer = tokenizer or model
    dest.mkdir(parents=True, exist_ok=True)
    dest = dest.resolve()

    baked = download_repo(model, revision, dest, token)
    if (tokenizer, tokenizer_revision) == (model, revision):
        tokenizer_commit, tokenizer_path = baked["commit"], baked["path"]
    else:
        baked_tokenizer = download_repo(
            tokenizer, tokenizer_revision, dest, token, tokenizer_only=True
        )
        tokenizer_commit, tokenizer_path = baked_tokenizer["commit"], baked_tokenizer["path"]

    manifest = {
        "model_name": model,
        "revision": baked["commit"],
        "requested_revision": revision,
        "path": baked["path"],
        "tokenizer_name": tokenizer,
        "tokenizer_revision": tokenizer_commit,
        "tokenizer_path": tokenizer_path,
        "files": baked["files"],
        "weight_format": baked["weight_format"],
        "total_bytes": baked["total_bytes"],
        "hf_hub_cache": str(dest),
        # Downloaded at their main revision: the worker finds them offline by repo id.
        "adapters": [
            {key: got[key] for key in ("repo_id", "commit", "path", "files", "total_bytes")}
            for got in (download_repo(repo, "main", dest, token, adapter=True) for repo in adapters)
        ],
    }
    manifest_path = dest / MANIFEST_NAME
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    # Lock files of the download: useless in an image.
    _remove_tree(dest / ".locks")
    return manifest


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# --- errors ------------------------------------------------------------------------------


def describe_error(error: BaseException, repo_id: str, revision: str, has_token: bool) -> str:
    """One line that says what went wrong with ``repo_id@revision`` and what to do."""
    from huggingface_hub import errors as hub_errors

    if isinstance(error, hub_errors.GatedRepoError):
        if has_token:
            return (
                f"{repo_id} is a gated repo and the token given has no access to it: "
                "accept its licence on huggingface.co with the token's account"
            )
        return (
            f"{repo_id} is a gated repo and no token was given: accept its licence on "
            "huggingface.co, then pass the token of that account (BuildKit secret "
            "id=hf_token, or HF_TOKEN)"
        )
    if isinstance(error, hub_errors.RevisionNotFoundError):
        return f"{repo_id}: revision {revision!r} not found on the Hub"
    if isinstance(error, hub_errors.RepositoryNotFoundError):
        return (
            f"{repo_id} not found on the Hub (or it is private and the token, if any, "
            "has no access to it)"
        )
    if isinstance(error, hub_errors.HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        return f"{repo_id}@{revision}: the Hub answered HTTP {status}: {_first_line(error)}"
    return f"{repo_id}@{revision}: {type(error).__name__}: {_first_line(error)}"


def _first_line(error: BaseException) -> str:
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__


# --- command line ------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Download a model from the Hugging Face Hub into an image."
    )
    parser.add_argument("--model", required=True, help="public repo id, e.g. org/name")
    parser.add_argument("--revision", default="", help="branch, tag or commit (default: main)")
    parser.add_argument("--tokenizer", default="", help="tokenizer repo id (default: --model)")
    parser.add_argument(
        "--tokenizer-revision", default="", help="tokenizer revision (default: --revision)"
    )
    parser.add_argument(
        "--lora-modules",
        default="",
        help="LORA_MODULES (name=source pairs): the sources that are Hub repos are baked too",
    )
    parser.add_argument(
        "--dest", default=DEFAULT_DEST, help=f"Hub cache to fill (default: {DEFAULT_DEST})"
    )
    parser.add_argument(
        "--token-file",
        default=DEFAULT_TOKEN_FILE,
        help=f"file holding the Hub token (default: {DEFAULT_TOKEN_FILE}); else HF_TOKEN",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    model = args.model.strip()
    tokenizer = args.tokenizer.strip() or None
    try:
        token = read_token(args.token_file, environ)
    except BuildError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1

    # Mask the token in everything written from here on, including by libraries that
    # are imported below (their log handlers keep the stream they see at import time).
    out = RedactingStream(sys.stdout, [token] if token else [])
    err = RedactingStream(sys.stderr, [token] if token else [])
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        if not saved[1].isatty():
            # In `docker build` logs a progress bar is a screenful of lines per file.
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        manifest = build(
            model,
            revision=args.revision.strip() or None,
            tokenizer=tokenizer,
            tokenizer_revision=args.tokenizer_revision.strip() or None,
            dest=Path(args.dest),
            token=token,
            adapters=adapter_repos(args.lora_modules),
        )
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # every failure ends as one line
        if isinstance(error, BuildError):
            message = str(error)
        else:  # not expected: download_repo explains every failure itself
            message = f"{type(error).__name__}: {_first_line(error)}"
        print(f"{PROG}: error: {err.redact(' '.join(message.split()))}", file=sys.stderr)
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = saved

    size_gb = manifest["total_bytes"] / 1e9
    line = (
        f"{PROG}: {manifest['model_name']}@{manifest['revision']}: "
        f"{len(manifest['files'])} files, {size_gb:.2f} GB in {manifest['path']}; "
        f"manifest {Path(manifest['hf_hub_cache']) / MANIFEST_NAME}"
    )
    print(out.redact(line), flush=True)
    for adapter in manifest["adapters"]:
        print(out.redact(f"{PROG}: adapter {adapter['repo_id']}@{adapter['commit']}"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
