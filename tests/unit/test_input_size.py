"""The cap on a job input's size, checked before its text is read."""

from typing import Any

import pytest

from vllm_worker.errors import InvalidInputError
from vllm_worker.input_size import check_input_size, check_integers, default_max_input_chars


@pytest.mark.parametrize(
    ("raw", "size"),
    [
        ({"prompt": "x" * 10}, 1 + 6 + 10),  # the object, the key, the value
        # {} "prompt" "ab" "sampling_params" {} "stop" [] "cd" "e"
        (
            {"prompt": "ab", "sampling_params": {"stop": ["cd", "e"]}},
            1 + 6 + 2 + 15 + 1 + 4 + 1 + 2 + 1,
        ),
        ([1, 2, 3], 4),
        ("", 0),
        (None, 1),
    ],
)
def test_every_string_counts_its_characters_and_every_other_value_one(raw: Any, size: int) -> None:
    check_input_size(raw, size)
    with pytest.raises(InvalidInputError) as raised:
        check_input_size(raw, size - 1)
    assert str(raised.value) == (
        f"input: holds more than {size - 1} characters of text (keys and values together), "
        "the most a job may send (MAX_INPUT_CHARS)"
    )


def test_a_huge_input_is_refused_without_reading_it_all() -> None:
    # A million one-item lists: the walk stops at the limit instead of visiting them all.
    huge = {"prompt": "x", "sampling_params": {"stop_token_ids": [[0]] * 1_000_000}}
    with pytest.raises(InvalidInputError, match="more than 1000 characters"):
        check_input_size(huge, 1000)


class _Tokenizer:
    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.tokens[i] for i in ids]


def test_the_default_is_the_context_filled_with_the_longest_token() -> None:
    tokenizer = _Tokenizer(["<s>", "a", "▁establishment", "</s>"])
    assert default_max_input_chars(tokenizer, max_model_len=100) == 100 * 14


@pytest.mark.parametrize(
    ("raw", "where"),
    [
        ({"openai_input": {"top_k": 2**64}}, "openai_input.top_k"),
        ({"a": [1, {"b": -(2**63) - 1}]}, "a[1].b"),
        ({"a private key": 2**70}, "<a key of 13 characters>"),
        (10**30, "input"),
    ],
)
def test_integers_beyond_64_bits_are_refused_where_they_are(raw: Any, where: str) -> None:
    with pytest.raises(InvalidInputError) as raised:
        check_integers(raw)
    assert str(raised.value) == (
        f"{where}: an integer beyond 64 bits; integers must be between -2^63 and 2^64-1"
    )


def test_integers_of_64_bits_pass() -> None:
    check_integers({"a": [2**64 - 1, -(2**63), True, 1.5e300, "x"]})
