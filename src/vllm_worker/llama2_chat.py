"""Llama 2's chat format, as Meta's reference code defines it, and how to recognise the model.

Meta's ``chat_completion`` (llama/generation.py) folds an optional system message into the
first user message between ``<<SYS>>\\n`` and ``\\n<</SYS>>\\n\\n``, then encodes, each on
its own with sentencepiece, ``BOS + "[INST] {user.strip()} [/INST] {answer.strip()} " +
EOS`` for every user/assistant exchange and ``BOS + "[INST] {user.strip()} [/INST]"`` for
the final user message. ``reference_ids`` does exactly that with a Hugging Face tokenizer.

A Jinja template renders one text and the text is encoded at once, so the tokenizer sees
``<s>[INST]`` where Meta encoded ``[INST]`` alone, with sentencepiece's word-start mark
(``▁[``). Whether the text after a special token gets that mark is the tokenizer's
``legacy`` flag: transformers 5 builds Llama's tokenizer without it when its config says
``"legacy": false``, and ``[INST]`` then starts with ``[``, one token off Meta's format in
every turn. ``template_for`` therefore checks each candidate template against
``reference_ids`` on a probe conversation and keeps the first that gives Meta's ids.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def _template(after_bos: str) -> str:
    """Llama 2's format as a Jinja template; ``after_bos`` opens each user turn."""
    return (
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set system_message = messages[0]['content'] -%}"
        "{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}"
        "{%- set system_message = none -%}"
        "{%- set loop_messages = messages -%}"
        "{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('model only supports \\'system\\', \\'user\\' and \\'assistant\\' "
        "roles, starting with \\'system\\', then \\'user\\' and alternating (u/a/u/a/u...)') }}"
        "{%- endif -%}"
        "{%- if loop.first and system_message is not none -%}"
        "{%- set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + "
        "message['content'] -%}"
        "{%- else -%}"
        "{%- set content = message['content'] -%}"
        "{%- endif -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{ bos_token + '" + after_bos + "' + content.strip() + ' [/INST]' }}"
        "{%- else -%}"
        "{{ ' ' + content.strip() + ' ' + eos_token }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if not loop_messages or loop_messages[-1]['role'] != 'user' -%}"
        "{{ raise_exception('Last message must be from user') }}"
        "{%- endif -%}"
    )


# Meta's text. Conversations out of Meta's shape are refused with Meta's own assertion
# messages, for callers (the OpenAI route) that did not check them first.
LLAMA2_CHAT_TEMPLATE = _template("[INST] ")
# For a tokenizer that gives no word-start mark after a special token: the space becomes
# the mark, and "<s> [INST]" encodes as Meta's "<s>" + "▁[INST]".
LLAMA2_CHAT_TEMPLATE_SPACED = _template(" [INST] ")

# "Llama-2-7b-chat-hf", "llama2_13b_chat", "Llama 2 70B Chat": Llama, an optional
# separator, 2 (not 20, 3, ...), then "chat" somewhere after it.
_LLAMA2_CHAT_NAME = re.compile(r"llama[-_ ]?2(?!\d).*chat", re.IGNORECASE)

# A conversation with every part of the format: system, exchange, final user turn.
PROBE_CONVERSATION = (
    {"role": "system", "content": "You are a helpful assistant.\nAnswer briefly."},
    {"role": "user", "content": "Hello! How are you?"},
    {"role": "assistant", "content": "Fine, thank you. How can I help?"},
    {"role": "user", "content": "Tell me about Europe."},
)

Renderer = Callable[[Sequence[Mapping[str, str]], str], list[int]]


def is_llama2_chat(names: Sequence[str], tokenizer: Any) -> bool:
    """Whether one of ``names`` (MODEL_NAME, TOKENIZER_NAME) is a Llama 2 chat model's
    and the tokenizer has Llama's BOS and EOS."""
    named = any(_LLAMA2_CHAT_NAME.search(name) for name in names)
    specials = (getattr(tokenizer, "bos_token", None), getattr(tokenizer, "eos_token", None))
    return named and specials == ("<s>", "</s>")


def reference_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """The token ids Meta's ``chat_completion`` builds for a (well-formed) conversation."""

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    dialog = [dict(message) for message in messages]
    if dialog[0]["role"] == "system":
        folded = "<<SYS>>\n" + dialog[0]["content"] + "\n<</SYS>>\n\n" + dialog[1]["content"]
        dialog = [{"role": "user", "content": folded}, *dialog[2:]]
    ids: list[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2], strict=False):
        text = f"[INST] {prompt['content'].strip()} [/INST] {answer['content'].strip()} "
        ids += [bos, *encode(text), eos]
    return [*ids, bos, *encode(f"[INST] {dialog[-1]['content'].strip()} [/INST]")]


def template_for(own: str | None, tokenizer: Any, render: Renderer) -> tuple[str, bool]:
    """The template for a Llama 2 chat model: its own, else the built-in one, else the
    built-in one with the space, whichever first renders Meta's ids (``render(messages,
    template)``); True when one does. If none does, the own or the built-in one, and False."""
    expected = reference_ids(tokenizer, PROBE_CONVERSATION)
    candidates = [own] if own is not None else []
    candidates += [LLAMA2_CHAT_TEMPLATE, LLAMA2_CHAT_TEMPLATE_SPACED]
    for template in candidates:
        try:
            if render(PROBE_CONVERSATION, template) == expected:
                return template, True
        except Exception:  # a template that refuses the probe is not Llama 2's
            continue
    return own or LLAMA2_CHAT_TEMPLATE, False
