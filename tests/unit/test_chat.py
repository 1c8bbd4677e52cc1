"""Chat rendering: conversations -> token ids in Llama 2's format (tokenizer only, no engine).

The expected ids are built the way Meta's reference code builds them (llama/generation.py,
``chat_completion``; ``helpers.llama2_reference_ids``): each exchange encoded on its own,
with the BOS and EOS ids put around it by hand, never through a chat template.
"""

from __future__ import annotations

from typing import Any

import pytest

from helpers import chat_prompt, sentencepiece_llama_tokenizer
from helpers import llama2_reference_ids as reference_ids
from vllm_worker.chat import (
    LLAMA2_CHAT_TEMPLATE,
    LLAMA2_CHAT_TEMPLATE_SPACED,
    choose_chat_template,
    is_llama2_chat,
    log_chat_template,
    render_chat,
)
from vllm_worker.errors import InvalidInputError, SettingsError
from vllm_worker.llama2_chat import template_for
from vllm_worker.settings import Settings
from vllm_worker.tiny_model import HUB_LLAMA2_CHAT_TEMPLATE as HUB_LLAMA2_TEMPLATE
from vllm_worker.tiny_model import build_tokenizer

Message = dict[str, str]

SYSTEM = "You are a helpful, respectful and honest assistant.\nAlways answer briefly."

CONVERSATIONS: dict[str, list[Message]] = {
    "one user message": [{"role": "user", "content": "Hello! How are you today?"}],
    "system and user": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Write me an essay about the french revolution."},
    ],
    "multi-turn": [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me about Europe."},
    ],
    "system and multi-turn, untrimmed": [
        {"role": "system", "content": "  " + SYSTEM + "  "},
        {"role": "user", "content": "  Hello!\n"},
        {"role": "assistant", "content": "\nHi, how can I help? "},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": " And [INST] 3 + 3? "},
    ],
}

# A template of the custom kind: Llama 2's format written from scratch, differently from
# the tiny tokenizer's own template and from the built-in one.
CUSTOM_LLAMA2_TEMPLATE = """
{%- set ns = namespace(system='') -%}
{%- for m in messages -%}
  {%- if m.role == 'system' -%}
    {%- set ns.system = '<<SYS>>\n' ~ m.content ~ '\n<</SYS>>\n\n' -%}
  {%- elif m.role == 'user' -%}
    {{- bos_token ~ '[INST] ' ~ (ns.system ~ m.content) | trim ~ ' [/INST]' -}}
    {%- set ns.system = '' -%}
  {%- else -%}
    {{- ' ' ~ m.content | trim ~ ' ' ~ eos_token -}}
  {%- endif -%}
{%- endfor -%}
"""


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """The tiny model's tokenizer, with its own (Llama 2) chat template."""
    return build_tokenizer()


@pytest.fixture(scope="module")
def bare_tokenizer() -> Any:
    """The same tokenizer with its chat template removed, like older Llama 2 snapshots."""
    bare = build_tokenizer()
    bare.chat_template = None  # type: ignore[attr-defined]
    return bare


LLAMA2_CHAT = Settings(model_name="meta-llama/Llama-2-7b-chat-hf")


def test_reference_is_what_meta_describes(tokenizer: Any) -> None:
    # The reference itself, on the smallest case, against the format spelled out.
    ids = reference_ids(tokenizer, CONVERSATIONS["system and user"])
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert text == (
        "<s>[INST] <<SYS>>\n" + SYSTEM + "\n<</SYS>>\n\n"
        "Write me an essay about the french revolution. [/INST]"
    )


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_the_tokenizers_own_template_gives_the_reference_ids(tokenizer: Any, name: str) -> None:
    messages = CONVERSATIONS[name]
    assert choose_chat_template(LLAMA2_CHAT, tokenizer).template == tokenizer.chat_template
    assert chat_prompt(LLAMA2_CHAT, tokenizer, messages).token_ids == reference_ids(
        tokenizer, messages
    )


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_the_built_in_template_gives_the_reference_ids(bare_tokenizer: Any, name: str) -> None:
    messages = CONVERSATIONS[name]
    assert choose_chat_template(LLAMA2_CHAT, bare_tokenizer).template is LLAMA2_CHAT_TEMPLATE
    rendered = chat_prompt(LLAMA2_CHAT, bare_tokenizer, messages)
    assert rendered.token_ids == reference_ids(bare_tokenizer, messages)
    # The text is what the ids decode to: it is what an echo shows.
    assert bare_tokenizer.decode(rendered.token_ids, skip_special_tokens=False) == rendered.text


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_a_custom_chat_template_gives_the_reference_ids(bare_tokenizer: Any, name: str) -> None:
    settings = Settings.from_env({"CUSTOM_CHAT_TEMPLATE": CUSTOM_LLAMA2_TEMPLATE})
    messages = CONVERSATIONS[name]
    assert chat_prompt(settings, bare_tokenizer, messages).token_ids == reference_ids(
        bare_tokenizer, messages
    )


def test_a_custom_chat_template_wins_over_the_tokenizers(tokenizer: Any) -> None:
    template = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    settings = Settings.from_env({"CUSTOM_CHAT_TEMPLATE": template})
    assert choose_chat_template(settings, tokenizer).template == template
    rendered = chat_prompt(settings, tokenizer, [{"role": "user", "content": "Hi"}])
    assert rendered.text == "<s><user>Hi"
    expected = [tokenizer.bos_token_id, *tokenizer.encode("<user>Hi", add_special_tokens=False)]
    assert rendered.token_ids == expected


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_one_bos_per_user_turn_never_doubled(bare_tokenizer: Any, name: str) -> None:
    messages = CONVERSATIONS[name]
    ids = chat_prompt(LLAMA2_CHAT, bare_tokenizer, messages).token_ids
    bos, eos = bare_tokenizer.bos_token_id, bare_tokenizer.eos_token_id
    user_turns = sum(message["role"] == "user" for message in messages)
    assert ids[0] == bos and ids[1] != bos
    assert ids.count(bos) == user_turns
    assert ids.count(eos) == user_turns - 1


@pytest.mark.parametrize(
    "name",
    [
        "meta-llama/Llama-2-7b-chat-hf",
        "meta-llama/Llama-2-70b-chat-hf",
        "TheBloke/Llama-2-7B-Chat-AWQ",
        "/models/llama2_13b_chat",
    ],
)
def test_llama2_chat_models_are_recognised_by_name(bare_tokenizer: Any, name: str) -> None:
    assert is_llama2_chat(Settings(model_name=name), bare_tokenizer)


@pytest.mark.parametrize(
    "name",
    [
        "meta-llama/Llama-2-7b-hf",  # the base model: no chat format
        "meta-llama/Meta-Llama-3-8B-Instruct",
        "codellama/CodeLlama-7b-Instruct-hf",
        "someone/llama-20b-chat",
        "mistralai/Mistral-7B-Instruct-v0.2",
    ],
)
def test_other_models_have_no_template_and_messages_fail_clearly(
    bare_tokenizer: Any, name: str
) -> None:
    settings = Settings(model_name=name)
    assert choose_chat_template(settings, bare_tokenizer).template is None
    with pytest.raises(InvalidInputError) as raised:
        chat_prompt(settings, bare_tokenizer, CONVERSATIONS["one user message"])
    message = str(raised.value)
    assert message.startswith(f"messages: the model {name} has no chat template")
    assert "CUSTOM_CHAT_TEMPLATE" in message


def test_a_tokenizer_name_can_mark_a_llama2_chat_model(bare_tokenizer: Any) -> None:
    settings = Settings(
        model_name="/models/weights", tokenizer_name="meta-llama/Llama-2-7b-chat-hf"
    )
    assert choose_chat_template(settings, bare_tokenizer).template is LLAMA2_CHAT_TEMPLATE


def test_a_llama2_name_with_another_tokenizer_is_not_guessed(tokenizer: Any) -> None:
    other = build_tokenizer()
    other.chat_template = None  # type: ignore[attr-defined]
    other.bos_token = "<|begin_of_text|>"  # type: ignore[attr-defined]
    assert not is_llama2_chat(LLAMA2_CHAT, other)
    assert choose_chat_template(LLAMA2_CHAT, other).template is None


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([{"role": "system", "content": "Be brief."}], "Last message must be from user"),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "Last message must be from user",
        ),
        (
            [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
            "alternating (u/a/u/a/u...)",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            "alternating (u/a/u/a/u...)",
        ),
    ],
)
def test_the_built_in_template_refuses_what_meta_refuses(
    bare_tokenizer: Any, messages: list[Message], reason: str
) -> None:
    # The OpenAI route renders with this template without the job schema's checks.
    with pytest.raises(InvalidInputError) as raised:
        render_chat(messages, LLAMA2_CHAT_TEMPLATE, bare_tokenizer, "m")
    assert str(raised.value).startswith("messages: the chat template refused it: ")
    assert reason in str(raised.value)


def test_start_up_says_which_template_chat_input_uses(
    tokenizer: Any, bare_tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="vllm_worker.chat")
    custom = Settings.from_env({"CUSTOM_CHAT_TEMPLATE": "{{ messages }}"})
    base = Settings(model_name="meta-llama/Llama-2-7b-hf")
    for settings, tok in [
        (custom, tokenizer),
        (LLAMA2_CHAT, tokenizer),
        (LLAMA2_CHAT, bare_tokenizer),
        (base, bare_tokenizer),
    ]:
        log_chat_template(choose_chat_template(settings, tok), settings.model_name)
    assert [record.getMessage() for record in caplog.records][:3] == [
        "chat template: CUSTOM_CHAT_TEMPLATE",
        "chat template: the tokenizer's own: gives Meta's reference token ids",
        "chat template: the built-in Llama 2 template: gives Meta's reference token ids",
    ]
    last = caplog.records[3]
    assert last.levelname == "WARNING"
    assert "'messages' jobs will fail; set CUSTOM_CHAT_TEMPLATE" in last.getMessage()


def test_custom_chat_template_must_be_template_text_not_a_file_name() -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"CUSTOM_CHAT_TEMPLATE": "/templates/llama-2-chat.jinja"})
    assert str(raised.value).startswith(
        "CUSTOM_CHAT_TEMPLATE='/templates/llama-2-chat.jinja' is invalid: must be the text of a "
        "Jinja template"
    )
    template = Settings.from_env({"CUSTOM_CHAT_TEMPLATE": CUSTOM_LLAMA2_TEMPLATE})
    assert template.custom_chat_template == CUSTOM_LLAMA2_TEMPLATE.strip()


# --- a sentencepiece-style Llama tokenizer, as transformers 5 builds Llama 2's ------------


def llama_tokenizer(*, legacy: bool, chat_template: str | None) -> Any:
    texts = [m["content"] for c in CONVERSATIONS.values() for m in c]
    return sentencepiece_llama_tokenizer(texts, legacy=legacy, chat_template=chat_template)


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_without_a_word_start_after_specials_the_spaced_template_gives_metas_ids(
    name: str,
) -> None:
    tokenizer = llama_tokenizer(legacy=False, chat_template=HUB_LLAMA2_TEMPLATE)
    messages = CONVERSATIONS[name]
    expected = reference_ids(tokenizer, messages)
    # The trap: the Hub's own template, rendered and encoded at once, is off Meta's ids.
    own = render_chat(messages, HUB_LLAMA2_TEMPLATE, tokenizer, "m").token_ids
    assert own != expected
    assert tokenizer.convert_ids_to_tokens(own[:2]) == ["<s>", "["]
    assert tokenizer.convert_ids_to_tokens(expected[:2]) == ["<s>", "\u2581["]

    assert choose_chat_template(LLAMA2_CHAT, tokenizer).template is LLAMA2_CHAT_TEMPLATE_SPACED
    assert chat_prompt(LLAMA2_CHAT, tokenizer, messages).token_ids == expected
    # The same without any template of its own.
    bare = llama_tokenizer(legacy=False, chat_template=None)
    assert chat_prompt(LLAMA2_CHAT, bare, messages).token_ids == reference_ids(bare, messages)


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_with_a_word_start_after_specials_the_hubs_template_is_kept(name: str) -> None:
    tokenizer = llama_tokenizer(legacy=True, chat_template=HUB_LLAMA2_TEMPLATE)
    messages = CONVERSATIONS[name]
    assert choose_chat_template(LLAMA2_CHAT, tokenizer).template == HUB_LLAMA2_TEMPLATE
    assert chat_prompt(LLAMA2_CHAT, tokenizer, messages).token_ids == reference_ids(
        tokenizer, messages
    )


def test_when_no_template_gives_metas_ids_the_own_one_is_kept_and_said() -> None:
    tokenizer = llama_tokenizer(legacy=True, chat_template=None)

    def never_metas(messages: Any, template: str) -> list[int]:
        return []

    def refusing(messages: Any, template: str) -> list[int]:
        raise InvalidInputError("messages: the chat template refused it")

    assert template_for("own", tokenizer, never_metas) == ("own", False)
    assert template_for(None, tokenizer, refusing) == (LLAMA2_CHAT_TEMPLATE, False)
