"""Chat conversations -> the prompt's token ids, in the format the model was trained on.

One Jinja chat template serves both chat inputs: the job's ``messages`` (rendered here)
and the OpenAI ``/v1/chat/completions`` route (rendered by vLLM's serving layer): start-up
(``startup.build``) chooses it once and gives it to both. Rendering here does what vLLM
0.32 does there (transformers' ``apply_chat_template`` with the generation prompt, then
encoding without special tokens), so that one conversation becomes the same token ids on
both routes.

Which template (``choose_chat_template``):

1. ``CUSTOM_CHAT_TEMPLATE``, when set, as it is;
2. for a Llama 2 chat model, the first of the tokenizer's own template, the built-in
   ``LLAMA2_CHAT_TEMPLATE`` and its variant for tokenizers without a word-start mark after
   special tokens, that renders a probe conversation to the very token ids Meta's
   reference code builds (llama2_chat.py: older snapshots and many quantised copies of
   ``meta-llama/Llama-2-*-chat-hf`` have no template, and with transformers 5 the Hub's
   own template can be one token off in every turn);
3. the tokenizer's own (``chat_template`` in its tokenizer config);
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vllm_worker import llama2_chat
from vllm_worker.errors import InvalidInputError
from vllm_worker.llama2_chat import LLAMA2_CHAT_TEMPLATE, LLAMA2_CHAT_TEMPLATE_SPACED
from vllm_worker.settings import Settings

__all__ = [
    "LLAMA2_CHAT_TEMPLATE",
    "LLAMA2_CHAT_TEMPLATE_SPACED",
    "RenderedChat",
    "TemplateChoice",
    "choose_chat_template",
    "is_llama2_chat",
    "log_chat_template",
    "render_chat",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RenderedChat:
    """A conversation rendered for the model: the prompt text and its token ids."""

    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class TemplateChoice:
    """The chat template chosen, and where it comes from (for the start-up log)."""

    template: str | None
    source: str
    faithful: bool = True  # False: a Llama 2 chat model whose ids differ from Meta's


def is_llama2_chat(settings: Settings, tokenizer: Any) -> bool:
    """Whether the served model is a Llama 2 chat model (see the module docstring)."""
    return llama2_chat.is_llama2_chat(_names(settings), tokenizer)


def choose_chat_template(settings: Settings, tokenizer: Any) -> TemplateChoice:
    """The Jinja chat template the worker renders conversations with (None: there is
    none), and why. A Llama 2 chat model's candidates are rendered and checked here: it
    is called once, at start-up."""
    if settings.custom_chat_template is not None:
        return TemplateChoice(settings.custom_chat_template, "CUSTOM_CHAT_TEMPLATE")
    own = _tokenizer_template(tokenizer)
    if is_llama2_chat(settings, tokenizer):

        def render(messages: Sequence[Mapping[str, str]], template: str) -> list[int]:
            return render_chat(messages, template, tokenizer, settings.model_name).token_ids

        template, faithful = llama2_chat.template_for(own, tokenizer, render)
        names = {
            own: "the tokenizer's own",
            LLAMA2_CHAT_TEMPLATE: "the built-in Llama 2 template",
            LLAMA2_CHAT_TEMPLATE_SPACED: "the built-in Llama 2 template, with a space after "
            "BOS (the tokenizer marks no word start after special tokens)",
        }
        verdict = "Meta's reference token ids" if faithful else "NOT Meta's reference token ids"
        return TemplateChoice(template, f"{names[template]}: gives {verdict}", faithful)
    if own is not None:
        return TemplateChoice(own, "the tokenizer's own")
    return TemplateChoice(None, "none")


def log_chat_template(choice: TemplateChoice, model_name: str) -> None:
    """Say at start-up which template chat input will use, or that there is none."""
    if choice.template is None:
        log.warning(
            "chat template: none (the tokenizer has none and %s is not a Llama 2 chat model): "
            "'messages' jobs will fail; set CUSTOM_CHAT_TEMPLATE to serve them",
            model_name,
        )
    elif not choice.faithful:
        log.warning("chat template: %s; set CUSTOM_CHAT_TEMPLATE to fix it", choice.source)
    else:
        log.info("chat template: %s", choice.source)


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


def _names(settings: Settings) -> tuple[str, str]:
    return settings.model_name, settings.tokenizer_name or ""


def _tokenizer_template(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    return template if isinstance(template, str) and template.strip() else None
