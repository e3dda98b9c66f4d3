"""Conformance for patch ids and masks: the worked examples of docs/architecture.md §5.4, §6.5 and §8.2."""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from bltjax.kernels.masks import local_causal_mask
from bltjax.models.layers import eos_segment_ids
from bltjax.models.local_encoder import encoder_cross_attn_mask, pool_patches
from bltjax.models.patch_ids import (
    AmbiguousPaddingWarning,
    check_patch_lengths,
    decoder_patch_ids,
    patch_ids,
    with_next_token,
)

EXAMPLE = jnp.array([[1, 3, 2, 5]])  # N = 10 tokens, lengths add up to N + 1 = 11


def test_spec_pid_dpid_example():
    assert np.asarray(patch_ids(EXAMPLE, 10))[0].tolist() == [0, 1, 1, 1, 2, 2, 3, 3, 3, 3]
    assert np.asarray(decoder_patch_ids(EXAMPLE, 10))[0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]


def test_trailing_zero_patches_do_not_change_ids():
    padded = jnp.array([[1, 3, 2, 5, 0, 0]])
    assert np.asarray(patch_ids(padded, 10)).tolist() == np.asarray(patch_ids(EXAMPLE, 10)).tolist()
    assert np.asarray(decoder_patch_ids(padded, 10)).tolist() == np.asarray(decoder_patch_ids(EXAMPLE, 10)).tolist()


def test_encoder_cross_attention_mask_example():
    mask = np.asarray(encoder_cross_attn_mask(patch_ids(EXAMPLE, 10), 4, k=2, window=1))[0]
    assert mask.shape == (8, 10)
    seen = [np.flatnonzero(row).tolist() for row in mask]
    assert seen == [[0], [0], [1, 2, 3], [1, 2, 3], [4, 5], [4, 5], [6, 7, 8, 9], [6, 7, 8, 9]]
    windowed = np.asarray(encoder_cross_attn_mask(patch_ids(EXAMPLE, 10), 4, k=2, window=2))[0]
    assert np.flatnonzero(windowed[4]).tolist() == [1, 2, 3, 4, 5]  # patch 2 sees patches 1..2


def test_with_next_token_conventions():
    # HF convention (sum N): the next token extends the last patch, or fills the patcher's empty
    # last patch; rows already at N + 1 are untouched.
    lengths = jnp.array([[1, 3, 2, 4, 0], [1, 3, 2, 4, 1], [1, 9, 0, 0, 0]])
    out = np.asarray(with_next_token(lengths, 10)).tolist()
    assert out == [[1, 3, 2, 4, 1], [1, 3, 2, 4, 1], [1, 9, 1, 0, 0]]
    assert np.asarray(with_next_token(jnp.array([[1, 3, 6]]), 10)).tolist() == [[1, 3, 7]]


@pytest.mark.parametrize(
    "lengths, converted, dpid",
    [  # the table of docs/architecture.md §3.3, N = 6
        ([1, 5], [1, 6], [0, 0, 0, 0, 0, 0]),
        ([1, 5, 0], [1, 5, 1], [0, 0, 0, 0, 0, 1]),
        ([1, 5, 0, 0], [1, 5, 1, 0], [0, 0, 0, 0, 0, 1]),
        ([1, 2, 3, 0, 0], [1, 2, 3, 1, 0], [0, 0, 1, 1, 1, 2]),
    ],
)
def test_zero_padded_row_in_n_convention_reads_first_zero_as_empty_last_patch(lengths, converted, dpid):
    """The rule for the ambiguous padded row: the first zero column is the patcher's empty last patch."""
    row = with_next_token(jnp.array([lengths]), 6)
    assert np.asarray(row)[0].tolist() == converted
    assert np.asarray(decoder_patch_ids(row, 6))[0].tolist() == dpid


def test_ambiguous_padding_warns_and_unambiguous_rows_do_not():
    # Two or more zero columns on a row adding up to N: padded for certain, the last byte's patch is a guess.
    with pytest.warns(AmbiguousPaddingWarning, match=r"row 1 adds up to N = 6 and has 2 zero columns.*N \+ 1 = 7"):
        check_patch_lengths(np.array([[1, 2, 3, 0], [1, 5, 0, 0]]), 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_patch_lengths(np.array([[1, 5, 0]]), 6)  # one zero: the patcher's empty last patch
        check_patch_lengths(np.array([[1, 5]]), 6)
        check_patch_lengths(np.array([[1, 5, 1, 0, 0], [1, 6, 0, 0, 0]]), 6)  # N + 1: padding is plain padding


@pytest.mark.parametrize(
    "lengths, message",
    [
        ([[2, 9]], "first patch must be exactly one token"),
        ([[1, 0, 10]], "non-zero length after a zero"),
        ([[1, 3, 3]], "adds up to 7"),
        ([[1, -1, 11]], ">= 0"),
    ],
)
def test_invalid_patch_lengths_are_rejected(lengths, message):
    with pytest.raises(ValueError, match=message):
        check_patch_lengths(np.array(lengths), 10)


def test_local_mask_window_causal_and_segments():
    positions = jnp.arange(6)[None]
    mask = np.asarray(local_causal_mask(positions, None, window=3))[0]
    assert np.flatnonzero(mask[5]).tolist() == [3, 4, 5]  # itself and the previous w - 1 = 2 keys
    assert not mask[2, 3]
    is_eos = jnp.array([[False, False, True, False, False, False]])
    segments = eos_segment_ids(is_eos)
    assert np.asarray(segments).tolist() == [[0, 0, 0, 1, 1, 1]]  # the EOS closes its segment
    mask = np.asarray(local_causal_mask(positions, segments, window=None))[0]
    assert np.flatnonzero(mask[4]).tolist() == [3, 4]
    assert np.flatnonzero(mask[2]).tolist() == [0, 1, 2]


def test_max_pooling_and_empty_patches():
    x = jnp.arange(12, dtype=jnp.float32).reshape(1, 4, 3) * jnp.array([1.0, -1.0, 1.0])
    pid = jnp.array([[0, 1, 1, 1]])
    pooled = np.asarray(pool_patches(x, pid, 3, "max"))[0]
    np.testing.assert_array_equal(pooled[0], [0, -1, 2])
    np.testing.assert_array_equal(pooled[1], [9, -4, 11])
    np.testing.assert_array_equal(pooled[2], [0, 0, 0])  # empty patch -> zeros
    np.testing.assert_allclose(np.asarray(pool_patches(x, pid, 3, "avg"))[0, 1], [6, -7, 8])
