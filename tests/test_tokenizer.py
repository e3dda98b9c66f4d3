"""Tokenizer conformance: docs/architecture.md §1 test vectors and round trips."""

import numpy as np
import pytest

from bltjax import tokenizer


def test_spec_example_hi():
    assert tokenizer.encode("Hi!").tolist() == [1, 76, 109, 37, 2]


def test_official_fixture_sentence():
    expected = [
        1,
        80,
        105,
        120,
        43,
        119,
        36,
        103,
        108,
        105,
        103,
        111,
        36,
        109,
        106,
        36,
        120,
        108,
        105,
        119,
        105,
        36,
        120,
        115,
        111,
        105,
        114,
        109,
        126,
        105,
        118,
        119,
        36,
        113,
        101,
        120,
        103,
        108,
        37,
        2,
    ]
    assert tokenizer.encode("Let's check if these tokenizers match!").tolist() == expected


def test_flags_dtype_and_bytes_input():
    ids = tokenizer.encode(b"ab", bos=False, eos=False)
    assert ids.dtype == np.int32
    assert ids.tolist() == [101, 102]
    assert tokenizer.encode("", bos=True, eos=False).tolist() == [1]


@pytest.mark.parametrize("text", ["plain ascii", "Crème brûlée — 東京の夜 🌧️", "Ελληνικά\nРусский\tcode()"])
def test_round_trip(text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_lone_surrogate_is_dropped():
    assert tokenizer.decode(tokenizer.encode("a\ud800b")) == "ab"


def test_decode_drops_special_ids_and_invalid_utf8():
    ids = [0, 1, 3, 4 + ord("x"), 4 + 0xC3, 2, 4 + ord("y")]  # 0xC3 alone is invalid UTF-8
    assert tokenizer.decode(ids) == "xy"
    assert tokenizer.decode(ids, stop_at_eos=True) == "x"


def test_decode_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="ids must lie in"):
        tokenizer.decode([1, 260])
