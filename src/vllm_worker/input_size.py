"""A cap on the size of a job's input, checked before anything reads its text.

Validating and tokenizing a prompt costs time in proportion to its length, on the event
loop that streams every other job's tokens; a 50 MB prompt would stall them all, only to
be refused as too long for the context. Counting characters costs nothing per character
(``len`` of a Python string is stored), so the input's size is checked first.
"""

from __future__ import annotations

from typing import Any

from vllm_worker.errors import InvalidInputError


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


def default_max_input_chars(tokenizer: Any, max_model_len: int) -> int:
    """The most characters a prompt that fits in the context can have: the context's
    tokens times the tokenizer's longest token. Nothing that could fit is refused."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    longest = max((len(token or "") for token in tokens), default=1)
    return max_model_len * max(longest, 1)
