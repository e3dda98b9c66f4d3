"""Patch lengths, start masks and patch ids: the conversions between the views of one patching.

A patching of a row of N tokens is an int32 row of lengths, left-aligned and right-padded with
zeros (docs/architecture.md §3.1); the same patching as a start mask is bool [T] with True where
a patch starts; the model sees it as patch ids (§3.1 pid, §8.2 dpid). These functions are numpy,
vectorised over the batch (a diff over the flattened mask, never a Python loop over bytes).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bltjax.patching.rule import PatchingError, PatchingRule


def check_lengths(lengths: Any) -> np.ndarray:
    """Lengths as an int array [B, P], non-negative and right-padded, or PatchingError."""
    lengths = np.asarray(lengths)
    if lengths.ndim != 2 or not np.issubdtype(lengths.dtype, np.integer):
        raise PatchingError("lengths", "an integer array [B, P]", f"{lengths.dtype} array of shape {lengths.shape}")
    if lengths.size and lengths.min() < 0:
        raise PatchingError("lengths", "non-negative", f"minimum {lengths.min()}")
    gaps = np.flatnonzero(np.any((lengths[:, 1:] > 0) & (lengths[:, :-1] == 0), axis=1))
    if gaps.size:
        row = f"row {gaps[0]}: {lengths[gaps[0]].tolist()}"
        raise PatchingError("lengths", "right-padded (no non-zero length after a zero, §3.1)", row)
    return lengths


# ---------------------------------------------------------------------------------------------
# Flat lengths: one 1-D array of every row's non-zero lengths, plus the number per row


def flat_lengths_from_mask(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-major lengths of all patches and the number of patches per row; mask[:, 0] all True.

    Because every row starts a patch at column 0, the gap after a row's last start runs exactly to
    the row's end, so one diff over the flattened mask gives every length.
    """
    batch, total = mask.shape
    starts = np.flatnonzero(mask)
    lengths = np.empty(starts.shape, dtype=np.int32)  # int32: the output dtype, half the traffic
    np.subtract(starts[1:], starts[:-1], out=lengths[:-1], casting="unsafe")
    lengths[-1:] = batch * total - starts[-1:]
    row_first = np.searchsorted(starts, np.arange(batch + 1) * total)
    return lengths, np.diff(row_first)


def split_flat(lengths: np.ndarray, counts: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """§3.12 on flat positive lengths: L -> floor(L/m) pieces of m, then L % m if non-zero.

    Only the (few) long patches are touched: their extra pieces are inserted after them and the
    rest is moved with one boolean-mask copy.
    """
    long = np.flatnonzero(lengths > max_len)
    if long.size == 0:
        return lengths, counts
    long_lengths = lengths[long].astype(np.int64)
    extra = (long_lengths - 1) // max_len  # pieces - 1
    extra_end = np.cumsum(extra)
    first = long + (extra_end - extra)  # new index of each long patch's first piece
    extra_index = np.repeat(long + 1, extra) + np.arange(int(extra_end[-1]))  # pieces 2, 3, ...
    keeps_original = np.ones(lengths.size + int(extra_end[-1]), dtype=bool)
    keeps_original[extra_index] = False
    split = np.empty(keeps_original.size, dtype=lengths.dtype)
    split[keeps_original] = lengths
    split[first] = max_len
    split[extra_index] = max_len
    split[first + extra] = long_lengths - extra * max_len
    # Extra pieces per row: count them between the row boundaries (B searches, not K).
    long_before_row = np.searchsorted(long, np.concatenate(([0], np.cumsum(counts))))
    extra_before = np.concatenate(([0], extra_end))[long_before_row]
    return split, counts + np.diff(extra_before)


def pack_rows(lengths: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Flat lengths -> int32 [B, max(counts)], right-padded with zeros (§3.1, §3.13)."""
    batch = counts.shape[0]
    width = int(counts.max()) if batch else 0
    out = np.zeros((batch, width), dtype=np.int32)
    if batch == 1:
        out[0, : lengths.size] = lengths
    else:
        out[np.arange(width) < counts[:, None]] = lengths
    return out


# ---------------------------------------------------------------------------------------------
# Public conversions


def start_mask_from_lengths(lengths: np.ndarray, total: int | None = None) -> np.ndarray:
    """bool [B, total]: True where a patch starts. `total` defaults to the largest row sum."""
    lengths = check_lengths(lengths)
    ends = np.cumsum(lengths, axis=1, dtype=np.int64)
    total = int(ends[:, -1].max()) if total is None and lengths.shape[1] else int(total or 0)
    mask = np.zeros((lengths.shape[0], total), dtype=bool)
    rows, cols = np.nonzero((lengths > 0) & (ends - lengths < total))
    mask[rows, (ends - lengths)[rows, cols]] = True
    return mask


def lengths_from_start_mask(mask: np.ndarray) -> np.ndarray:
    """int32 [B, P] lengths from a start mask whose first column is all True (§3.1)."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != bool or mask.shape[1] < 1:
        raise PatchingError("mask", "a non-empty bool array [B, T]", f"{mask.dtype} array of shape {mask.shape}")
    if not mask[:, 0].all():
        raise PatchingError("mask", "True in column 0 of every row (position 0 starts a patch)", mask[:, 0])
    return pack_rows(*flat_lengths_from_mask(mask))


def split_long_patches(lengths: np.ndarray, max_patch_length: int) -> np.ndarray:
    """§3.12 on padded lengths [B, P]: split every patch longer than m from its start."""
    lengths = check_lengths(lengths)
    # The rule record owns what a valid max_patch_length is.
    max_len = PatchingRule(mode="byte", max_patch_length=max_patch_length).max_patch_length
    positive = lengths > 0
    flat, counts = split_flat(lengths[positive].astype(np.int64), positive.sum(axis=1), max_len)
    return pack_rows(flat, counts)


def patch_ids_from_lengths(lengths: np.ndarray, n: int) -> np.ndarray:
    """pid of §3.1 as int32 [B, n]: pid(i) = #{j in 1..P : C_j <= i}, C_j = sum(lengths[:j])."""
    lengths = check_lengths(lengths)
    batch = lengths.shape[0]
    boundaries = np.minimum(np.cumsum(lengths, axis=1, dtype=np.int64), n)  # C_1..C_P, clipped
    flat = (boundaries + np.arange(batch)[:, None] * (n + 1)).ravel()
    hits = np.bincount(flat, minlength=batch * (n + 1)).reshape(batch, n + 1)
    return np.cumsum(hits[:, :n], axis=1).astype(np.int32)


def decoder_patch_ids_from_lengths(lengths: np.ndarray, n: int) -> np.ndarray:
    """dpid of §8.2 as int32 [B, n]: pid computed from lengths[:, 1:] (first patch must be 1)."""
    lengths = check_lengths(lengths)
    if lengths.shape[1] == 0 or np.any(lengths[:, 0] != 1):
        raise PatchingError("lengths", "a first patch of length 1 in every row (§8.2)", lengths[:, :1].ravel())
    return patch_ids_from_lengths(lengths[:, 1:], n)
