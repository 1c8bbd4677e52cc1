"""Chat ``messages`` jobs through the handler on the real vLLM engine (tiny model).

The tiny model's tokenizer carries Llama 2's chat template; the built-in template is
exercised by serving the same engine through a tokenizer without one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from vllm import SamplingParams
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind

from helpers import (
    chat_prompt,
    collect,
    handler_for,
    llama2_reference_ids,
    sentencepiece_llama_tokenizer,
)
from vllm_worker.chat import choose_chat_template
from vllm_worker.engine import Engine
from vllm_worker.engine_types import Handler
from vllm_worker.settings import Settings
from vllm_worker.tiny_model import HUB_LLAMA2_CHAT_TEMPLATE as HUB_LLAMA2_TEMPLATE
from vllm_worker.tiny_model import build_tokenizer

Run = Callable[..., Any]

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": "Hello! How are you today?"},
    {"role": "assistant", "content": "I am well, thank you. How can I help?"},
    {"role": "user", "content": "Write me an essay about the french revolution."},
]
GREEDY = {"temperature": 0.0, "max_tokens": 24, "ignore_eos": True}


def raw_engine_text(run: Run, engine: Engine, prompt_token_ids: list[int]) -> str:
    """What the engine itself generates, greedily, from exactly these prompt ids."""

    async def generate() -> str:
        params = SamplingParams(
            temperature=0.0,
            max_tokens=24,
            ignore_eos=True,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        prompt = TokensPrompt(prompt_token_ids=prompt_token_ids)
        async for output in engine.client.generate(prompt, params, "raw-chat"):
            final = output
        return str(final.outputs[0].text)

    return run(generate())


def test_messages_job_streams_the_answer_to_the_reference_prompt(
    run: Run, handler: Handler, engine: Engine
) -> None:
    reference = llama2_reference_ids(engine.tokenizer, CONVERSATION)
    chunks = run(collect(handler, {"messages": CONVERSATION, "sampling_params": GREEDY}))

    assert len(chunks) >= 2, "the first chunk goes as soon as the first token exists"
    assert all("usage" not in chunk for chunk in chunks[:-1])
    final = chunks[-1]
    assert final["finish_reason"] == ["length"]
    assert final["usage"] == {
        "prompt_tokens": len(reference),
        "completion_tokens": 24,
        "total_tokens": len(reference) + 24,
    }
    # No echo by default: every chunk holds only the answer, growing.
    previous = ""
    for chunk in chunks:
        assert chunk["text"][0].startswith(previous)
        previous = chunk["text"][0]
    # The same answer as the engine's own from the reference ids: the ids sent were those.
    assert final["text"] == [raw_engine_text(run, engine, reference)]


def test_echo_true_starts_with_the_rendered_conversation(
    run: Run, handler: Handler, engine: Engine
) -> None:
    request = {"messages": CONVERSATION, "sampling_params": GREEDY}
    bare = run(collect(handler, request))[-1]["text"][0]
    echoed = run(collect(handler, {**request, "echo": True}))[-1]["text"][0]
    rendered = engine.tokenizer.decode(
        llama2_reference_ids(engine.tokenizer, CONVERSATION), skip_special_tokens=False
    )
    assert rendered.startswith("<s>[INST] <<SYS>>\nYou are a helpful assistant.")
    assert echoed == rendered + bare


def test_the_built_in_template_serves_a_llama2_chat_tokenizer_without_one(
    run: Run, engine: Engine, settings: Settings
) -> None:
    bare = build_tokenizer()  # bit-identical to the engine's, minus the chat template
    bare.chat_template = None  # type: ignore[attr-defined]
    llama2 = settings.model_copy(update={"model_name": "meta-llama/Llama-2-7b-chat-hf"})
    handler = handler_for(Engine(engine.client, bare, engine.max_model_len), llama2)
    messages = CONVERSATION[1:]  # without the system message this time
    final = run(collect(handler, {"messages": messages, "sampling_params": GREEDY}))[-1]
    reference = llama2_reference_ids(bare, messages)
    assert final["usage"]["prompt_tokens"] == len(reference)
    assert final["text"] == [raw_engine_text(run, engine, reference)]


def test_a_model_without_any_chat_template_fails_messages_jobs_clearly(
    run: Run, engine: Engine, settings: Settings
) -> None:
    bare = build_tokenizer()
    bare.chat_template = None  # type: ignore[attr-defined]
    handler = handler_for(Engine(engine.client, bare, engine.max_model_len), settings)
    chunks = run(collect(handler, {"messages": CONVERSATION}))
    assert len(chunks) == 1
    error = chunks[0]["error"]
    assert error.startswith(f"invalid_input: messages: the model {settings.model_name} has no")
    assert "CUSTOM_CHAT_TEMPLATE" in error
    # A prompt still works on that worker.
    done = run(collect(handler, {"prompt": "Hello there", "sampling_params": {"max_tokens": 3}}))
    assert done[-1]["usage"]["completion_tokens"] >= 1


def test_custom_chat_template_setting_renders_the_job(
    run: Run, engine: Engine, settings: Settings
) -> None:
    template = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    custom = settings.model_copy(update={"custom_chat_template": template})
    handler = handler_for(engine, custom)
    request = {"messages": CONVERSATION[1:2], "echo": True, "sampling_params": {"max_tokens": 3}}
    final = run(collect(handler, request))[-1]
    expected = [
        1,
        *engine.tokenizer.encode("<user>Hello! How are you today?", add_special_tokens=False),
    ]
    assert final["usage"]["prompt_tokens"] == len(expected)
    assert final["text"][0].startswith("<s><user>Hello! How are you today?")


def test_an_invalid_conversation_fails_naming_the_message_and_the_next_job_works(
    run: Run, handler: Handler
) -> None:
    bad = [CONVERSATION[1], CONVERSATION[2], {"role": "assistant", "content": "More."}]
    chunks = run(collect(handler, {"messages": bad}))
    assert len(chunks) == 1
    error = chunks[0]["error"]
    assert error.startswith("invalid_input: messages[2].role: must be 'user'")
    assert "\n" not in error
    good = {"messages": CONVERSATION[1:2], "sampling_params": {"max_tokens": 3}}
    assert run(collect(handler, good))[-1]["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("tokenizer_kind", ["own template", "no template", "sentencepiece"])
def test_vllms_chat_serving_renders_the_same_ids(
    engine: Engine, settings: Settings, tokenizer_kind: str
) -> None:
    # What vLLM's /v1/chat/completions does with the template start-up chooses and gives it
    # (the OpenAI route): the same ids as a messages job, so both routes agree.
    from vllm.renderers.hf import safe_apply_chat_template

    tokenizer = engine.tokenizer
    llama2 = settings.model_copy(update={"model_name": "meta-llama/Llama-2-7b-chat-hf"})
    if tokenizer_kind == "no template":
        tokenizer = build_tokenizer()
        tokenizer.chat_template = None  # type: ignore[attr-defined]
    elif tokenizer_kind == "sentencepiece":  # no word start after <s>: the spaced template
        contents = [message["content"] for message in CONVERSATION]
        tokenizer = sentencepiece_llama_tokenizer(
            contents, legacy=False, chat_template=HUB_LLAMA2_TEMPLATE
        )
    template = choose_chat_template(llama2, tokenizer).template
    assert template is not None
    vllm_ids = safe_apply_chat_template(
        engine.client.model_config,
        tokenizer,
        [dict(message) for message in CONVERSATION],
        chat_template=template,
        add_generation_prompt=True,
        continue_final_message=False,
        tokenize=True,
    )
    assert chat_prompt(llama2, tokenizer, CONVERSATION).token_ids == list(vllm_ids)
    assert list(vllm_ids) == llama2_reference_ids(tokenizer, CONVERSATION)


def test_a_conversation_longer_than_the_context_fails_with_its_size(
    run: Run, handler: Handler, engine: Engine
) -> None:
    messages = [{"role": "user", "content": "Tell me a story about the sea. " * 100}]
    chunks = run(collect(handler, {"messages": messages}))
    assert len(chunks) == 1
    tokens = len(llama2_reference_ids(engine.tokenizer, messages))
    assert chunks[0]["error"] == (
        f"invalid_input: messages: the rendered conversation has {tokens} tokens, but the "
        "model's context (MAX_MODEL_LEN) is 512 tokens: at most 511 prompt tokens fit"
    )
