"""A cap on the size of a job's input, checked before anything reads its text.

Validating and tokenizing a prompt costs time in proportion to its length, on the event
loop that streams every other job's tokens; a 50 MB prompt would stall them all, only to
be refused as too long for the context. Counting characters costs nothing per character
(``len`` of a Python string is stored), so the input's size is checked first.
"""

from __future__ import annotations

from typing import Any

from vllm_worker.errors import InvalidInputError
from vllm_worker.schema import field_path

# Requests reach vLLM's engine core as MessagePack, whose integers have 64 bits: a larger
# one fails inside vLLM with an empty message, and leaves the request behind in vLLM's
# count of unfinished requests.
MIN_INT, MAX_INT = -(2**63), 2**64 - 1


def check_input_size(raw: object, max_chars: int) -> None:
    """Refuse an input holding more than ``max_chars`` characters of text (MAX_INPUT_CHARS)."""
    if _exceeds(raw, max_chars):
        raise InvalidInputError(
            f"input: holds more than {max_chars} characters of text (keys and values "
            f"together), the most a job may send (MAX_INPUT_CHARS)"
        )


def _exceeds(raw: object, max_chars: int) -> bool:
    """Whether the strings of ``raw`` (keys included) add up to more than ``max_chars``;
    each other value counts as one. Stops as soon as the limit is passed."""
    total = 0
    pending = [raw]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            total += len(value)
        else:
            total += 1
            if isinstance(value, dict):
                pending.extend(value.keys())
                pending.extend(value.values())
            elif isinstance(value, list | tuple):
                pending.extend(value)
        if total > max_chars:
            return True
    return False


def check_integers(raw: object) -> None:
    """Refuse an integer the engine cannot be sent, naming where it is. For inputs that
    vLLM validates itself (the OpenAI routes); the worker's own schema has tighter bounds."""
    pending: list[tuple[tuple[int | str, ...], object]] = [((), raw)]
    while pending:
        location, value = pending.pop()
        if isinstance(value, int) and not isinstance(value, bool):
            if not MIN_INT <= value <= MAX_INT:
                raise InvalidInputError(
                    f"{field_path(location) or 'input'}: an integer beyond 64 bits; integers "
                    "must be between -2^63 and 2^64-1"
                )
        elif isinstance(value, dict):
            pending.extend(((*location, str(key)), item) for key, item in value.items())
        elif isinstance(value, list):
            pending.extend(((*location, index), item) for index, item in enumerate(value))


def default_max_input_chars(tokenizer: Any, max_model_len: int) -> int:
    """The most characters a prompt that fits in the context can have: the context's
    tokens times the tokenizer's longest token. Nothing that could fit is refused."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    longest = max((len(token or "") for token in tokens), default=1)
    return max_model_len * max(longest, 1)
