"""Chat conversations -> the prompt's token ids, in the format the model was trained on.

One Jinja chat template serves both chat inputs: the job's ``messages`` (rendered here)
and the OpenAI ``/v1/chat/completions`` route (rendered by vLLM's serving layer, given
``chat_template_for``). Rendering here does what vLLM 0.32 does there (transformers'
``apply_chat_template`` with the generation prompt, then encoding without special
tokens), so that one conversation becomes the same token ids on both routes.

Which template (``chat_template_for``):

1. ``CUSTOM_CHAT_TEMPLATE``, when set;
2. the tokenizer's own (``chat_template`` in its tokenizer config);
3. for a Llama 2 chat model whose tokenizer has none (older snapshots and many
   quantised copies of ``meta-llama/Llama-2-*-chat-hf``), ``LLAMA2_CHAT_TEMPLATE``;
4. none: a ``messages`` job then fails with an error that says so. Guessing a format
   would make the model answer badly without anyone noticing.

A model counts as a Llama 2 chat model when ``MODEL_NAME`` or ``TOKENIZER_NAME`` (a Hub
repo id or a local path) names one, e.g. ``Llama-2-7b-chat-hf``, ``llama2-13b-chat``,
``TheBloke/Llama-2-7B-Chat-AWQ``, and its tokenizer has Llama's ``<s>``/``</s>``: the
weights and tokenizer files say nothing more reliable about a chat fine-tune.

The template writes the special tokens itself (``bos_token``, ``eos_token``), as Hugging
Face templates do, and the rendered text is encoded without adding any: a BOS is never
doubled, and a template that writes none gets none.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vllm_worker.errors import InvalidInputError
from vllm_worker.settings import Settings

log = logging.getLogger(__name__)

# Llama 2's chat format as Meta's reference code builds it (llama/generation.py,
# ``chat_completion``): an optional system message folded into the first user message
# between ``<<SYS>>\n`` and ``\n<</SYS>>\n\n``; then for each user/assistant exchange
# ``BOS + "[INST] {user.strip()} [/INST] {answer.strip()} " + EOS``, and for the final
# user message ``BOS + "[INST] {user.strip()} [/INST]"``. The whole folded first message
# is stripped, as Meta strips it. Conversations out of that shape are refused with
# Meta's own assertions, for callers (the OpenAI route) that did not check them first.
LLAMA2_CHAT_TEMPLATE = (
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
    "{%- set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] -%}"
    "{%- else -%}"
    "{%- set content = message['content'] -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{%- else -%}"
    "{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if not loop_messages or loop_messages[-1]['role'] != 'user' -%}"
    "{{ raise_exception('Last message must be from user') }}"
    "{%- endif -%}"
)

# "Llama-2-7b-chat-hf", "llama2_13b_chat", "Llama 2 70B Chat": Llama, an optional
# separator, 2 (not 20, 3, ...), then "chat" somewhere after it.
_LLAMA2_CHAT_NAME = re.compile(r"llama[-_ ]?2(?!\d).*chat", re.IGNORECASE)


@dataclass(frozen=True)
class RenderedChat:
    """A conversation rendered for the model: the prompt text and its token ids."""

    text: str
    token_ids: list[int]


def is_llama2_chat(settings: Settings, tokenizer: Any) -> bool:
    """Whether the served model is a Llama 2 chat model (see the module docstring)."""
    names = (settings.model_name, settings.tokenizer_name or "")
    named = any(_LLAMA2_CHAT_NAME.search(name) for name in names)
    specials = (getattr(tokenizer, "bos_token", None), getattr(tokenizer, "eos_token", None))
    return named and specials == ("<s>", "</s>")


def chat_template_for(settings: Settings, tokenizer: Any) -> str | None:
    """The Jinja chat template the worker renders conversations with; None: there is none."""
    if settings.custom_chat_template is not None:
        return settings.custom_chat_template
    own = _tokenizer_template(tokenizer)
    if own is not None:
        return own
    if is_llama2_chat(settings, tokenizer):
        return LLAMA2_CHAT_TEMPLATE
    return None


def log_chat_template(settings: Settings, tokenizer: Any) -> None:
    """Say at start-up which template chat input will use, or that there is none."""
    if settings.custom_chat_template is not None:
        log.info("chat template: CUSTOM_CHAT_TEMPLATE")
    elif _tokenizer_template(tokenizer) is not None:
        log.info("chat template: the tokenizer's own")
    elif is_llama2_chat(settings, tokenizer):
        log.info("chat template: the built-in Llama 2 chat format (the tokenizer has none)")
    else:
        log.warning(
            "chat template: none (the tokenizer has none and %s is not a Llama 2 chat model): "
            "'messages' jobs will fail; set CUSTOM_CHAT_TEMPLATE to serve them",
            settings.model_name,
        )


def render_chat(
    messages: Sequence[Mapping[str, str]], template: str | None, tokenizer: Any, model: str
) -> RenderedChat:
    """The prompt for a (validated) conversation, as vLLM's chat serving renders it.

    ``model`` names the model in the error when there is no template.
    """
    if template is None:
        raise InvalidInputError(
            f"messages: the model {model} has no chat template, so the worker cannot tell "
            "how to render a conversation; set CUSTOM_CHAT_TEMPLATE, or send a 'prompt'"
        )
    conversation = [dict(message) for message in messages]
    try:
        text = tokenizer.apply_chat_template(
            conversation, chat_template=template, add_generation_prompt=True, tokenize=False
        )
    except Exception as error:  # the template's own raise_exception, or a broken template
        raise InvalidInputError(f"messages: the chat template refused it: {error}") from None
    # What apply_chat_template(tokenize=True) does, and so vLLM: the template has written
    # every special token already.
    token_ids = list(tokenizer.encode(text, add_special_tokens=False))
    return RenderedChat(text=str(text), token_ids=token_ids)


def chat_prompt(
    settings: Settings, tokenizer: Any, messages: Sequence[Mapping[str, str]]
) -> RenderedChat:
    """The rendered prompt of a job's ``messages`` with the worker's chat template."""
    template = chat_template_for(settings, tokenizer)
    return render_chat(messages, template, tokenizer, settings.model_name)


def _tokenizer_template(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    return template if isinstance(template, str) and template.strip() else None
