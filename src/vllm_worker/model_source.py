"""Where the model comes from: baked into the image, a RunPod network volume, or the Hub.

Decided once at start-up, before the engine starts (``main`` calls ``prepare``):

- A baked image (``builder/download_model.py``) holds the model in a Hugging Face cache
  with a ``manifest.json`` beside it: ``$HF_HUB_CACHE/manifest.json``, or the file named
  by ``MODEL_MANIFEST``. The worker logs what it holds. In offline mode
  (``HF_HUB_OFFLINE=1``, as a baked image sets it) a ``MODEL_NAME`` / ``MODEL_REVISION``
  / ``TOKENIZER_NAME`` that the image does not hold cannot load: start-up stops with one
  line that says so and what to do, instead of vLLM's traceback.
- When the baked model is not served (no baked model, or another one, online), a RunPod
  network volume is mounted (``RUNPOD_VOLUME_PATH``, default ``/runpod-volume``) and no
  cache was chosen (``DOWNLOAD_DIR``, ``HF_HOME``), the weights are downloaded to
  ``<volume>/huggingface-cache/hub`` (vLLM's ``download_dir``), where they outlive the
  worker and are shared by the endpoint's workers. ``HF_HUB_CACHE`` does not count as a
  choice here: the image sets it (``/models``) whether or not it baked a model.

Everything here is a function of the settings and of the files it is pointed at; nothing
imports vLLM or reads the environment.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_worker.errors import SettingsError
from vllm_worker.settings import Settings

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"  # what builder/download_model.py writes
VOLUME_CACHE = Path("huggingface-cache") / "hub"  # RunPod's cache folder on a volume
# The revision a Hub lookup uses when none is given: vLLM then looks up refs/main.
DEFAULT_REVISION = "main"


@dataclass(frozen=True)
class BakedModel:
    """What the manifest of a baked image says it holds."""

    manifest_path: str
    model_name: str  # the public repo id
    revision: str  # the commit
    requested_revision: str  # what the build asked for ("main", a tag...): refs/<it>
    tokenizer_name: str
    tokenizer_revision: str
    path: str  # the snapshot folder
    total_bytes: int | None = None

    def holds_revision(self, revision: str | None) -> bool:
        """Whether an offline lookup of ``revision`` finds this snapshot."""
        if revision is None:
            return self.requested_revision == DEFAULT_REVISION
        return revision in {self.revision, self.requested_revision}


@dataclass(frozen=True)
class ModelSource:
    """The outcome of ``resolve``: settings to start the engine with, lines to log."""

    settings: Settings
    baked: BakedModel | None
    messages: tuple[str, ...]


# --- pure decisions --------------------------------------------------------------------


def is_offline(settings: Settings) -> bool:
    """Whether huggingface_hub runs offline (it falls back to TRANSFORMERS_OFFLINE)."""
    if settings.hf_hub_offline is not None:
        return settings.hf_hub_offline
    return bool(settings.transformers_offline)


def manifest_location(settings: Settings) -> Path | None:
    """Where a baked model's manifest is, if the settings say where to look."""
    if settings.model_manifest:
        return Path(settings.model_manifest)
    if settings.hf_hub_cache:
        return Path(settings.hf_hub_cache) / MANIFEST_NAME
    return None


def parse_manifest(data: Any, manifest_path: str) -> BakedModel:
    """A ``BakedModel`` from a manifest's JSON; ``SettingsError`` when it is not one."""
    if not isinstance(data, dict):
        raise SettingsError(f"the model manifest {manifest_path} is not a JSON object")
    missing = [key for key in ("model_name", "revision") if not _text(data.get(key))]
    if missing:
        raise SettingsError(
            f"the model manifest {manifest_path} has no {' or '.join(missing)}: "
            "rebuild the image (builder/download_model.py writes it)"
        )
    model_name, revision = str(data["model_name"]), str(data["revision"])
    total = data.get("total_bytes")
    return BakedModel(
        manifest_path=manifest_path,
        model_name=model_name,
        revision=revision,
        requested_revision=_text(data.get("requested_revision")) or revision,
        tokenizer_name=_text(data.get("tokenizer_name")) or model_name,
        tokenizer_revision=_text(data.get("tokenizer_revision")) or revision,
        path=_text(data.get("path")),
        total_bytes=total if isinstance(total, int) and not isinstance(total, bool) else None,
    )


def _text(value: object) -> str:
    return value.strip() if isinstance(value, str) else ""


def offline_mismatch(
    settings: Settings, baked: BakedModel, *, is_local_path: Callable[[str], bool]
) -> str | None:
    """Why the baked image cannot serve ``settings`` offline, in one line; None if it can.

    ``is_local_path(name)`` says whether a name is a local file or folder, which vLLM
    loads as it is (no Hub lookup, so no conflict with the image).
    """
    if not is_offline(settings):
        return None
    baked_at = f"the image bakes {baked.model_name} at {baked.requested_revision}"
    if baked.requested_revision != baked.revision:
        baked_at += f" ({baked.revision})"
    if not is_local_path(settings.model_name):
        if settings.model_name != baked.model_name:
            return (
                f"{baked_at}; MODEL_NAME={settings.model_name} is not in it: set "
                "HF_HUB_OFFLINE=0 to download it, or rebuild the image with "
                f"--build-arg MODEL_NAME={settings.model_name}"
            )
        revision = settings.model_revision
        if not baked.holds_revision(revision):
            asked = f"MODEL_REVISION={revision}" if revision else "MODEL_REVISION unset (main)"
            return (
                f"{baked_at}; {asked} is not in it: set MODEL_REVISION="
                f"{baked.requested_revision} to serve the baked model, HF_HUB_OFFLINE=0 to "
                f"download {revision or DEFAULT_REVISION}, or rebuild the image with "
                f"--build-arg MODEL_REVISION={revision or DEFAULT_REVISION}"
            )
    tokenizer = settings.tokenizer_name
    if tokenizer and not is_local_path(tokenizer) and tokenizer != baked.tokenizer_name:
        return (
            f"{baked_at} with the tokenizer of {baked.tokenizer_name}; TOKENIZER_NAME="
            f"{tokenizer} is not in it: set HF_HUB_OFFLINE=0 to download it, or rebuild "
            f"the image with --build-arg TOKENIZER_NAME={tokenizer}"
        )
    return None


def serves_baked_model(settings: Settings, baked: BakedModel | None) -> bool:
    """Whether the settings ask for the model (and revision) that the image holds."""
    return (
        baked is not None
        and settings.model_name == baked.model_name
        and baked.holds_revision(settings.model_revision)
    )


def download_dir(
    settings: Settings, baked: BakedModel | None, *, volume_mounted: bool
) -> str | None:
    """The folder vLLM downloads weights to (``download_dir``); None: the HF cache.

    ``DOWNLOAD_DIR`` when set; otherwise, unless the baked model is served or ``HF_HOME``
    is set, the network volume's cache when a volume is mounted.
    """
    if settings.download_dir:
        return settings.download_dir
    if serves_baked_model(settings, baked) or settings.hf_home or not volume_mounted:
        return None
    return str(Path(settings.runpod_volume_path) / VOLUME_CACHE)


def describe(
    settings: Settings, baked: BakedModel | None, weights_dir: str | None, *, local: bool = False
) -> str:
    """One line for the log: which model, from where, online or offline (``local``:
    ``MODEL_NAME`` is a folder on this machine)."""
    mode = "offline" if is_offline(settings) else "online"
    if baked is not None and serves_baked_model(settings, baked):
        size = f", {baked.total_bytes / 1e9:.2f} GB" if baked.total_bytes is not None else ""
        return (
            f"model: {baked.model_name} at {baked.revision}, baked into the image "
            f"({baked.path or baked.manifest_path}{size}); {mode}"
        )
    if local:
        where = "weights from that local folder"
        if baked is not None:
            where += f", not the model baked into the image ({baked.model_name})"
    elif baked is not None:
        where = f"not the model baked into the image ({baked.model_name} at {baked.revision})"
        if weights_dir is not None:
            where += f"; weights in {weights_dir}"
    elif weights_dir is None:
        where = f"weights from the Hugging Face cache ({settings.hf_hub_cache or 'default'})"
    elif weights_dir == settings.download_dir:
        where = f"weights in DOWNLOAD_DIR={weights_dir}"
    else:
        where = f"weights in the network volume's cache {weights_dir}"
    return f"model: {settings.model_name}; {where}; {mode}"


def resolve(
    settings: Settings,
    baked: BakedModel | None,
    *,
    volume_mounted: bool,
    is_local_path: Callable[[str], bool],
) -> ModelSource:
    """The settings to start the engine with; ``SettingsError`` when they cannot work."""
    if baked is not None:
        problem = offline_mismatch(settings, baked, is_local_path=is_local_path)
        if problem:
            raise SettingsError(problem)
    weights_dir = download_dir(settings, baked, volume_mounted=volume_mounted)
    message = describe(settings, baked, weights_dir, local=is_local_path(settings.model_name))
    if weights_dir != settings.download_dir:
        settings = settings.model_copy(update={"download_dir": weights_dir})
    return ModelSource(settings, baked, (message,))


# --- reading the files -----------------------------------------------------------------


def read_manifest(settings: Settings) -> BakedModel | None:
    """The baked model's manifest, None when there is none; ``SettingsError`` when it is
    named by ``MODEL_MANIFEST`` but missing, or unreadable."""
    path = manifest_location(settings)
    if path is None:
        return None
    if not path.is_file():
        if settings.model_manifest:
            raise SettingsError(f"MODEL_MANIFEST={settings.model_manifest} does not exist")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise SettingsError(
            f"the model manifest {path} cannot be read: {type(error).__name__}"
        ) from None
    return parse_manifest(data, str(path))


def prepare(settings: Settings) -> Settings:
    """Read the manifest, check it against the settings, log where the model comes
    from; the settings to start the engine with. ``SettingsError`` when they cannot work."""
    name = settings.model_name
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
        # Else vLLM takes it for a Hub repo id and fails with a confusing message.
        raise SettingsError(
            f"MODEL_NAME={name!r} is invalid: no such directory (a local model is a folder "
            "with its config.json; a Hugging Face model is a repo id such as "
            "meta-llama/Llama-2-7b-chat-hf)"
        )
    source = resolve(
        settings,
        read_manifest(settings),
        volume_mounted=Path(settings.runpod_volume_path).is_dir(),
        is_local_path=lambda name: Path(name).exists(),
    )
    for message in source.messages:
        log.info("%s", message)
    return _with_adapters_found(source.settings)


ADAPTER_CONFIG = "adapter_config.json"  # what makes a folder a LoRA (PEFT) adapter


def _with_adapters_found(settings: Settings) -> Settings:
    """The settings with each LoRA adapter's source as a local folder: a folder as it is, a
    Hugging Face repo id found in the cache (a baked image's, offline) or downloaded now.
    ``SettingsError`` naming ``LORA_MODULES`` when one cannot be had."""
    if not settings.lora_modules:
        return settings
    found = {
        name: _adapter_folder(name, source, settings)
        for name, source in settings.lora_modules.items()
    }
    for name, folder in found.items():
        log.info("LoRA adapter %s: %s (%s)", name, settings.lora_modules[name], folder)
    return settings.model_copy(update={"lora_modules": found})


def _adapter_folder(name: str, source: str, settings: Settings) -> str:
    where = f"LORA_MODULES: {name}={source}"
    if source.startswith(("/", ".", "~")):
        folder = Path(source).expanduser()
        if not (folder / ADAPTER_CONFIG).is_file():
            raise SettingsError(f"{where}: no {ADAPTER_CONFIG} there (not a LoRA adapter folder)")
        return str(folder.resolve())
    from huggingface_hub import snapshot_download

    offline = is_offline(settings)
    try:
        folder = Path(snapshot_download(source, local_files_only=offline))
    except Exception as error:
        if offline:
            raise SettingsError(
                f"{where}: not in the image's Hugging Face cache and HF_HUB_OFFLINE=1: bake "
                "it (build with --build-arg LORA_MODULES=...) or set HF_HUB_OFFLINE=0"
            ) from None
        raise SettingsError(f"{where}: cannot be downloaded: {type(error).__name__}") from None
    if not (folder / ADAPTER_CONFIG).is_file():
        raise SettingsError(f"{where}: the repo has no {ADAPTER_CONFIG} (not a LoRA adapter)")
    return str(folder)
