"""The job input: wire models for what a client may send, validated strictly.

Types are strict (a string is not a number) because vLLM builds a ``SamplingParams``
from anything and a wrongly typed field can wedge its engine core for every later
request. Ranges mirror vLLM's own checks so that the client reads our message, which
names the field and the allowed range, instead of an engine error. Unknown keys are
refused by name: a misspelt ``max_token`` must not silently become the default.

The text comes either as a ``prompt``, sent as is, or as chat ``messages``, which the
worker renders with the model's chat template (chat.py). A conversation must have the
shape every Llama 2 chat template and Meta's reference code need: an optional system
message first, then user and assistant turns alternating, ending with the user's.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from vllm_worker.errors import InvalidInputError

# How a job's chunks carry text (streaming.ChunkBuilder): all of it so far, or what is new.
StreamMode = Literal["cumulative", "delta"]

MAX_STOP_SEQUENCES = 16
MAX_SEED = 2**63 - 1
# Ints cross to the engine core as MessagePack; a larger one fails there, not here.
MAX_TOP_K = 2**31 - 1

# Fields of vLLM's or OpenAI's APIs this worker refuses, and why (named in the error).
UNSUPPORTED_FIELDS = {
    "best_of": "vLLM 0.32's engine has no best_of; ask for n completions instead",
    "use_beam_search": "vLLM 0.32's engine has no beam search",
    "length_penalty": "only for beam search, which vLLM 0.32's engine does not have",
    "early_stopping": "only for beam search, which vLLM 0.32's engine does not have",
    # vLLM 0.32's structured output reads these from the engine's settings only.
    "disable_any_whitespace": "vLLM 0.32 takes it from the engine, not per request",
    "disable_additional_properties": "vLLM 0.32 takes it from the engine, not per request",
    "whitespace_pattern": "vLLM 0.32 takes it from the engine, not per request",
}
# Error messages list at most this many problems: a job with thousands of bad keys
# still gets one short line.
MAX_PROBLEMS_SHOWN = 5

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
TokenId = Annotated[int, Field(ge=0)]
StopString = Annotated[str, Field(min_length=1)]
StopList = Annotated[list[StopString], Field(max_length=MAX_STOP_SEQUENCES)]
# OpenAI's range for a token's bias; vLLM clamps to it too.
MAX_LOGIT_BIAS = 100.0
MAX_BIASED_TOKENS = 1024


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty or only whitespace")
    return text


def _is_token_id(key: object) -> bool:
    """A token id written as a JSON object's key (up to 10 digits)."""
    return isinstance(key, str) and key.isdigit() and len(key) <= 10


def _token_id_key(key: str) -> str:
    if not _is_token_id(key):
        raise PydanticCustomError(
            "conversation",
            "sampling_params.logit_bias: each key must be a token id written as a string of "
            f'digits, e.g. {{"1234": -100}} (got {_shown(key)})',
        )
    return key


# A token id as a JSON object's key (logit_bias).
TokenIdKey = Annotated[str, AfterValidator(_token_id_key)]
NonBlank = Annotated[str, AfterValidator(_not_blank)]
STRUCTURED_FORMS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")
_SHOWN_WORD = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,19}")


def _one_stop_as_list(value: object) -> object:
    return [value] if isinstance(value, str) else value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StructuredOutputsInput(_Strict):
    """vLLM's ``StructuredOutputsParams``: the output must match exactly one of these."""

    json_schema: dict[str, Any] | str | None = Field(
        None, alias="json", description="A JSON schema (an object, or its JSON text)."
    )
    regex: str | None = Field(None, description="A regular expression the whole output matches.")
    choice: Annotated[list[StopString], Field(min_length=1, max_length=1024)] | None = Field(
        None, description="The output is one of these strings."
    )
    grammar: NonBlank | None = Field(None, description="A grammar (EBNF, or Lark for guidance).")
    json_object: Literal[True] | None = Field(None, description="Any JSON object.")
    structural_tag: NonBlank | None = Field(None, description="vLLM's structural tag (JSON).")

    @field_validator("json_schema", mode="plain")
    @classmethod
    def _a_schema(cls, schema: Any) -> dict[str, Any] | str | None:
        """An object, or a string of JSON: one message for either shape's problem."""
        if schema is None or isinstance(schema, dict):
            return schema
        if not isinstance(schema, str):
            raise ValueError("must be a JSON schema: an object, or its JSON text")
        try:
            json.loads(schema)
        except json.JSONDecodeError as error:
            raise ValueError(f"not valid JSON ({error.msg} at character {error.pos})") from None
        return schema

    @model_validator(mode="after")
    def _exactly_one_form(self) -> StructuredOutputsInput:
        given = [form for form in STRUCTURED_FORMS if self.form_value(form) is not None]
        if len(given) != 1:
            raise PydanticCustomError(
                "conversation",
                "sampling_params.structured_outputs: set exactly one of "
                f"{', '.join(STRUCTURED_FORMS)} (got {', '.join(given) or 'none'})",
            )
        return self

    def form_value(self, form: str) -> Any:
        """The value of ``form`` (a name of ``STRUCTURED_FORMS``), None when unset."""
        return getattr(self, "json_schema" if form == "json" else form)

    @property
    def form(self) -> str:
        """The one form this request uses."""
        return next(form for form in STRUCTURED_FORMS if self.form_value(form) is not None)


class SamplingParamsInput(_Strict):
    """The subset of vLLM's ``SamplingParams`` a client may set; same names, same meaning."""

    n: int = Field(1, ge=1, description="Number of completions to generate (capped by MAX_N).")
    temperature: FiniteFloat = Field(1.0, ge=0.0, le=2.0, description="Randomness; 0 means greedy.")
    top_p: FiniteFloat = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(
        0, ge=-1, le=MAX_TOP_K, description="Sample from the k likeliest tokens; 0 or -1: all."
    )
    min_p: FiniteFloat = Field(0.0, ge=0.0, le=1.0, description="Minimum relative probability.")
    presence_penalty: FiniteFloat = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: FiniteFloat = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: FiniteFloat = Field(1.0, gt=0.0, le=10.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Same seed, same text.")
    stop: Annotated[StopList | None, BeforeValidator(_one_stop_as_list)] = Field(
        None, description="A string or a list of strings that end a completion."
    )
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    bad_words: list[StopString] | None = Field(None, max_length=64)
    ignore_eos: bool = False
    max_tokens: int | None = Field(
        None, ge=1, description="Tokens to generate per completion; default DEFAULT_MAX_TOKENS."
    )
    min_tokens: int = Field(0, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20, description="Top logprobs per token.")
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: (
        Annotated[
            dict[TokenIdKey, Annotated[FiniteFloat, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]],
            Field(min_length=1, max_length=MAX_BIASED_TOKENS),
        ]
        | None
    ) = Field(None, description="Token id (as a string) -> bias added to its logit.")
    allowed_token_ids: Annotated[list[TokenId], Field(min_length=1)] | None = Field(
        None, description="Only these tokens may be generated."
    )
    prompt_logprobs: int | None = Field(
        None, ge=0, le=20, description="Top logprobs per prompt token, in the final chunk."
    )
    truncate_prompt_tokens: int | None = Field(
        None, ge=1, description="Keep only the prompt's last N tokens."
    )
    structured_outputs: StructuredOutputsInput | None = Field(
        None, description="Constrain the output: a JSON schema, a regex, a choice, a grammar."
    )

    @model_validator(mode="after")
    def _min_tokens_fit(self) -> SamplingParamsInput:
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be at most max_tokens ({self.max_tokens})"
            )
        if self.n > 1 and self.temperature == 0:
            # vLLM refuses it too, but only once it builds its SamplingParams.
            raise PydanticCustomError(
                "conversation",
                "sampling_params.n: must be 1 when temperature is 0 (greedy decoding gives "
                f"one text), got {self.n}",
            )
        return self


class ChatMessage(_Strict):
    """One message of a chat conversation."""

    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content")
    @classmethod
    def _not_blank(cls, content: str) -> str:
        # Llama 2's format strips every message: a blank one would vanish from the prompt.
        return _not_blank(content)


class JobInput(_Strict):
    """A job's ``input``: the prompt or conversation, how to sample, how to stream."""

    prompt: str | None = Field(None, min_length=1, description="The text to complete, as is.")
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, description="A chat conversation, rendered by the chat template."
    )
    sampling_params: SamplingParamsInput = SamplingParamsInput()  # frozen: safe to share
    stream: bool = Field(True, description="False: one final chunk instead of a stream.")
    echo: bool = Field(
        True, description="Start each text with the prompt (default for a prompt, not messages)."
    )
    stream_mode: StreamMode = Field(
        "cumulative",
        description="cumulative: each chunk holds all text so far; delta: only the new text.",
    )
    model: str | None = Field(
        None,
        min_length=1,
        description="The served model's name (the default) or a LoRA adapter's (LORA_MODULES).",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_echo_for_messages(cls, data: Any) -> Any:
        # A chat client wants the answer, not the rendered template: echo defaults to off.
        if isinstance(data, dict) and data.get("messages") is not None and "echo" not in data:
            return {**data, "echo": False}
        return data

    @field_validator("messages")
    @classmethod
    def _conversation_shape(cls, messages: list[ChatMessage] | None) -> list[ChatMessage] | None:
        if messages is not None:
            problem = _conversation_problem([message.role for message in messages])
            if problem is not None:
                raise PydanticCustomError("conversation", problem)
        return messages

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> JobInput:
        if self.prompt is None and self.messages is None:
            raise PydanticCustomError(
                "conversation", "prompt: required (or 'messages' for a chat conversation)"
            )
        if self.prompt is not None and self.messages is not None:
            raise PydanticCustomError(
                "conversation", "messages: send either 'prompt' or 'messages', not both"
            )
        return self


def _conversation_problem(roles: list[str]) -> str | None:
    """What is wrong with the order of a conversation's roles, naming the message."""
    start = 1 if roles[0] == "system" else 0
    for index, role in enumerate(roles[start:], start):
        expected = "user" if (index - start) % 2 == 0 else "assistant"
        if role != expected:
            rule = (
                "a system message may only come first"
                if role == "system"
                else "after an optional system message, roles alternate user, assistant, user, ..."
            )
            return f"messages[{index}].role: must be '{expected}': {rule} (got '{role}')"
    if roles[-1] != "user":
        return (
            f"messages[{len(roles) - 1}].role: the last message must be from the 'user' "
            f"(got '{roles[-1]}')"
        )
    return None


def parse_job_input(raw: object, *, max_n: int) -> JobInput:
    """Validate a job's ``input``; every problem is reported in one ``InvalidInputError``."""
    if not isinstance(raw, dict):
        raise InvalidInputError(
            f"input must be a JSON object with a 'prompt' or 'messages', got {type(raw).__name__}"
        )
    try:
        job_input = JobInput.model_validate(raw)
    except ValidationError as error:
        raise InvalidInputError(_describe(error)) from None
    if job_input.sampling_params.n > max_n:
        raise InvalidInputError(
            f"sampling_params.n: must be between 1 and {max_n} (MAX_N), "
            f"got {job_input.sampling_params.n}"
        )
    return job_input


def _describe(error: ValidationError) -> str:
    problems = list(dict.fromkeys(_problem(detail) for detail in error.errors(include_url=False)))
    more = len(problems) - MAX_PROBLEMS_SHOWN
    shown = problems[:MAX_PROBLEMS_SHOWN] + ([f"and {more} more"] if more > 0 else [])
    return "; ".join(shown)


def _problem(detail: ErrorDetails) -> str:
    path = field_path(detail["loc"])
    if detail["type"] == "conversation":  # our own message, naming its field
        return detail["msg"]
    if detail["type"] == "extra_forbidden":
        name = detail["loc"][-1]
        if name in UNSUPPORTED_FIELDS:
            return f"{path}: not supported: {UNSUPPORTED_FIELDS[str(name)]}"
        return f"{path}: unknown field; allowed: {_allowed_fields(detail['loc'])}"
    message = detail["msg"].removeprefix("Value error, ")
    return f"{path or 'input'}: {message} (got {_shown(detail['input'])})"


def _shown(value: object) -> str:
    """The offending value for the error message. A string is shown only if it is a short
    word (a role, a mode): any other may be (part of) a prompt, and errors are logged."""
    if isinstance(value, str):
        if not value or _SHOWN_WORD.fullmatch(value):
            return repr(value)
        return f"a string of {_count(len(value), 'character')}"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return f"a list of {_count(len(value), 'item')}"
    return repr(value)[:40]


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def field_path(location: tuple[int | str, ...]) -> str:
    """``("messages", 2, "role")`` -> ``messages[2].role``."""
    path = ""
    for part in location:
        name = str(part)
        if _is_token_id(part):  # a key of logit_bias
            path += f'["{part}"]'
            continue
        if isinstance(part, str) and not _FIELD_NAME.fullmatch(part):
            # An unknown key is the client's text too: named only if it looks like a field.
            name = f"<a key of {len(part)} characters>"
        path += f"[{name}]" if isinstance(part, int) else f".{name}" if path else name
    return path


def _allowed_fields(location: tuple[int | str, ...]) -> str:
    if location[:2] == ("sampling_params", "structured_outputs"):
        return ", ".join(STRUCTURED_FORMS)
    models: dict[int | str, type[BaseModel]] = {
        "sampling_params": SamplingParamsInput,
        "messages": ChatMessage,
    }
    return ", ".join(models.get(location[0], JobInput).model_fields)
