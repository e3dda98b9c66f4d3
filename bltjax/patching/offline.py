"""Patching whole rows in numpy: token ids (+ entropies) -> patch lengths or start masks.

    lengths = patching.patch_lengths(tokens, rule, entropies=h)           # int32 [B, P]
    lengths = patching.patch_lengths(tokens, mode="entropy", entropies=h, threshold=1.33)

This is the patcher of the data pipeline, the entropy sidecars, calibration checks and eval.
`rule` is a `PatchingRule`; its fields may be passed as keywords instead. Everything is
vectorised numpy (a start mask, `np.flatnonzero` and a diff; no Python loop over bytes).

Conventions (docs/architecture.md §3.1-§3.3)
--------------------------------------------
* `tokens` is [B, N] of tokenizer ids (byte b -> b + 4, BOS = 1, EOS = 2, BOE = 0);
  `entropies` is [B, N], H_t in nats for the next token after position t.
* Rows are patched independently and all have N tokens; the patcher does not know about
  padding. Token values are only read by `mode='space'`.
* With `include_next_token=True` (default; training batches and generation) position N is a
  virtual "next token": candidate starts are 2..N and every row sums to N + 1. With False
  (whole documents, §10) candidates are 2..N-1 and rows sum to N.
* Output: int32 [B, P], each row's lengths left-aligned and right-padded with zeros; columns that
  are zero in every row are dropped.

Decisions
---------
* First-patch rule (§3.2). Every dynamic mode starts patches at positions 0 and 1; static does by
  default (lengths [1, s, s, ..., r]) because the BLT decoder needs a first patch of exactly one
  token (§8.2). `static_first_patch_rule=False` gives MegaByte's [s, ..., s, r], for a baseline
  that prepends s - 1 BOE tokens itself (§3.9).
* Combined mode (§3.6): positions 0, 1, 2 always start; every p >= 3 starts iff
  H_{p-1} > threshold and H_{p-1} - H_{p-2} > threshold_add. Position 2 is forced as in the
  monotonic mode (§3.5) because its difference would involve H_0, the entropy right after BOS.
  The official code also forbids a start at position 3 (an artefact of how it shifts its masks);
  that is reproduced only with `reference_quirks=True`, for checkpoints trained by that code.
* Top-k (§3.7, no threshold, `patch_size=s`): n = floor(N / s) patches, so n - 2 starts are
  chosen among the candidates by largest H_{p-1}; ties go to the earlier position (what
  `jax.lax.top_k` does, so the traced twin agrees).
* Comparisons run in float32 for float16/float32 entropies (the threshold is rounded to float32,
  as the reference compares float32 tensors with a Python float) and in float64 for float64
  entropies. Differences of float16 entropies are also taken in float32.
* Space mode (§3.8) splits a multi-byte UTF-8 character after its leading byte, as specified.

Relation to the Hugging Face patcher (fixtures/hf_blt_tiny, `patcher_cases.npz`): its rows sum
to N but it evaluates the virtual position N, so when H_{N-1} > threshold it ends the row with an
empty patch. Its lengths equal `patch_lengths(..., include_next_token=False)` plus that trailing
zero; with `max_patch_length` (which drops zeros) they are equal outright.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from bltjax.patching.lengths import flat_lengths_from_mask, pack_rows, split_flat, start_mask_from_lengths
from bltjax.patching.rule import SPACE_LIKE, PatchingError, PatchingRule, resolve
from bltjax.tokenizer import BPE_ID, OFFSET, VOCAB_SIZE

_TILE = 1 << 16  # elements per tile: temporaries of a few hundred KiB stay in L2


def check_tokens(tokens: Any, xp: Any = np) -> Any:
    """Tokens as an integer array [B, N] of `xp` (numpy or jax.numpy), or PatchingError."""
    tokens = xp.asarray(tokens)
    if tokens.ndim != 2:
        raise PatchingError("tokens", "a 2-D array [B, N] of token ids", f"shape {tokens.shape}")
    if not xp.issubdtype(tokens.dtype, xp.integer):
        raise PatchingError("tokens", "an integer array of token ids (offset 4)", f"dtype {tokens.dtype}")
    if tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise PatchingError("tokens", "non-empty (B >= 1 rows, N >= 1 tokens)", f"shape {tokens.shape}")
    return tokens


def check_entropies(entropies: Any, shape: tuple[int, ...], rule: PatchingRule, xp: Any = np) -> Any:
    """Entropies as a float array shaped like the tokens, rounded through float16 if the rule says so."""
    entropies = xp.asarray(entropies)
    if entropies.shape != shape:
        raise PatchingError("entropies", f"shaped like tokens {shape}", f"shape {entropies.shape}")
    if not xp.issubdtype(entropies.dtype, xp.floating):
        raise PatchingError("entropies", "a float16/float32/float64 array (nats)", f"dtype {entropies.dtype}")
    return entropies.astype(xp.float16) if rule.entropy_float16 else entropies


def _compare_dtype(dtype: np.dtype) -> type:
    """float32 unless the entropies are float64 (see the module docstring)."""
    return np.float64 if np.dtype(dtype).itemsize > 4 else np.float32


def _limit(threshold: float, dtype: np.dtype) -> np.floating:
    """The threshold in the comparison dtype (beyond float32's range: +-inf, as the reference)."""
    with np.errstate(over="ignore"):
        return _compare_dtype(dtype)(threshold)


def _greater(values: np.ndarray, threshold: float, out: np.ndarray) -> None:
    """out = values > threshold, compared as float32 (float64 for float64 values).

    float16 (the sidecar format) is compared on its bit patterns, which for values >= 0 are
    ordered like the values: this skips numpy's slow float16 -> float32 conversion, and is exact
    (`values > t` iff `bits >= bits of the smallest float16 above t`).
    """
    limit = _limit(threshold, values.dtype)
    if values.dtype != np.float16 or not limit >= 0:
        np.greater(values, limit, out=out)
        return
    if np.isinf(limit):
        out[:] = False
        return
    with np.errstate(over="ignore"):  # limits above 65504: only +inf is above them
        smallest_above = np.float16(limit)
        if not np.float32(smallest_above) > limit:
            smallest_above = np.nextafter(smallest_above, np.float16(np.inf))
    # Negative values and -0.0 have negative int16 patterns, so they are never above.
    np.greater_equal(values.view(np.int16), smallest_above.view(np.int16), out=out)


def _has_nan(entropies: np.ndarray) -> bool:
    """One pass; float16 is checked on its bits (exponent all ones, mantissa non-zero)."""
    if entropies.dtype != np.float16:
        return bool(np.isnan(np.max(entropies)))
    bits = entropies.view(np.uint16)
    return any((bits[rows, lo:hi] & 0x7FFF).max() > 0x7C00 for rows, lo, hi in _tiles(*bits.shape))


def _tiles(batch: int, width: int) -> Iterator[tuple[slice, int, int]]:
    """(row slice, first column, end column) tiles covering a [batch, width] array."""
    cols = max(1, min(width, _TILE))
    rows = max(1, _TILE // cols)
    for first_row in range(0, batch, rows):
        for lo in range(0, width, cols):
            yield slice(first_row, first_row + rows), lo, min(lo + cols, width)


def _top_k_into(scores: np.ndarray, k: int, out: np.ndarray) -> None:
    """Mark the k largest scores of each row; ties go to the earlier position. O(N), no sort."""
    width = scores.shape[1]
    k = min(k, width)
    if k == 0 or k == width:
        out[:] = k == width
        return
    kth_largest = np.partition(scores, width - k, axis=1)[:, width - k : width - k + 1]
    np.greater_equal(scores, kth_largest, out=out)
    surplus = np.count_nonzero(out, axis=1) - k  # > 0 where the k-th value is tied
    rows = np.flatnonzero(surplus)
    if rows.size:
        tied = scores[rows] == kth_largest[rows]
        keep = np.cumsum(tied, axis=1) <= (tied.sum(axis=1) - surplus[rows])[:, None]
        out[rows] = (scores[rows] > kth_largest[rows]) | (tied & keep)


def _rule_start_mask(
    rule: PatchingRule, tokens: np.ndarray, entropies: np.ndarray | None, include_next_token: bool
) -> np.ndarray:
    """Start decisions of a dynamic mode, before `max_patch_length` splitting: bool [B, T]."""
    batch, n = tokens.shape
    total = n + int(include_next_token)
    mask = np.empty((batch, total), dtype=bool)
    # Candidate column j is position p = j + 2, decided from what is known before token p:
    # H_{p-1} = entropies[:, j + 1] and token p - 1 = tokens[:, j + 1]. Tiles keep temporaries in
    # cache so that every rule stays one pass over memory.
    candidates = mask[:, 2:]
    kind = rule.kind
    if kind == "topk":
        scores = entropies[:, 1 : total - 1].astype(_compare_dtype(entropies.dtype), copy=False)
        _top_k_into(scores, rule.top_k_count(n), candidates)
    for rows, lo, hi in _tiles(*candidates.shape) if kind != "topk" else ():
        out = candidates[rows, lo:hi]
        if kind == "space":
            ids = tokens[rows, lo : hi + 1]
            if ids.min() < 0 or ids.max() >= VOCAB_SIZE:
                found = f"range [{tokens.min()}, {tokens.max()}]"
                raise PatchingError("tokens", f"ids in [0, {VOCAB_SIZE}) for patching.mode='space'", found)
            space_like = np.take(SPACE_LIKE, ids)
            # end(i) = space_like(i) and not space_like(i-1), or token i is special.
            np.greater(space_like[:, 1:], space_like[:, :-1], out=out)
            out |= ids[:, 1:] < OFFSET
            continue
        if kind == "bpe":  # p starts a patch iff token p - 1 is a BPE delimiter (it ends its patch, §3.11)
            np.equal(tokens[rows, lo + 1 : hi + 1], BPE_ID, out=out)
            continue
        previous = entropies[rows, lo + 1 : hi + 1]  # H_{p-1}
        if kind == "global":
            _greater(previous, rule.threshold, out=out)
            continue
        cmp = _compare_dtype(entropies.dtype)
        rise = np.subtract(previous, entropies[rows, lo:hi], dtype=cmp)  # H_{p-1} - H_{p-2}
        if kind == "monotonic":
            np.greater(rise, _limit(rule.threshold, cmp), out=out)
        else:
            np.greater(rise, _limit(rule.threshold_add, cmp), out=out)
            above = np.empty_like(out)
            _greater(previous, rule.threshold, out=above)
            out &= above
    mask[:, : rule.forced_starts] = True
    if kind == "combined" and rule.reference_quirks and total > 3:
        mask[:, 3] = False
    return mask


def _static_row(rule: PatchingRule, total: int) -> np.ndarray:
    """Lengths of one static or byte row over `total` positions."""
    if rule.kind == "byte":
        return np.ones(total, dtype=np.int32)
    size = int(rule.patch_size)
    head = int(rule.static_first_patch_rule)
    full, tail = divmod(total - head, size)
    row = np.full(head + full + (tail > 0), size, dtype=np.int32)
    if head:
        row[0] = 1
    if tail:
        row[-1] = tail
    return row


def patch_lengths(
    tokens: np.ndarray,
    rule: PatchingRule | None = None,
    *,
    entropies: np.ndarray | None = None,
    include_next_token: bool = True,
    **fields: Any,
) -> np.ndarray:
    """Patch lengths int32 [B, P] of `tokens` [B, N] (and `entropies` [B, N], nats) under `rule`
    (a PatchingRule, or its fields as keywords: ``mode='static', patch_size=4``)."""
    rule = resolve(rule, fields)
    rule.check_entropies_given(entropies is not None)
    tokens = check_tokens(tokens)
    batch, n = tokens.shape
    if rule.kind in ("static", "byte"):
        row = _static_row(rule, n + int(include_next_token))
        counts = np.array([row.size])
        if rule.max_patch_length is not None:
            row, counts = split_flat(row, counts, rule.max_patch_length)
        return np.broadcast_to(pack_rows(row, counts), (batch, int(counts[0]))).copy()
    if entropies is not None:
        entropies = check_entropies(entropies, tokens.shape, rule)
        if _has_nan(entropies):
            raise PatchingError("entropies", "free of NaN", f"{int(np.isnan(entropies).sum())} NaN values")
    lengths, counts = flat_lengths_from_mask(_rule_start_mask(rule, tokens, entropies, include_next_token))
    if rule.max_patch_length is not None:
        lengths, counts = split_flat(lengths, counts, rule.max_patch_length)
    return pack_rows(lengths, counts)


def patch_start_mask(
    tokens: np.ndarray,
    rule: PatchingRule | None = None,
    *,
    entropies: np.ndarray | None = None,
    include_next_token: bool = True,
    **fields: Any,
) -> np.ndarray:
    """bool [B, N (+1)]: does position p start a patch? Arguments as `patch_lengths`.

    The per-position view is what incremental generation (§16) needs: position p is decided from
    tokens and entropies before p only.
    """
    rule = resolve(rule, fields)
    lengths = patch_lengths(tokens, rule, entropies=entropies, include_next_token=include_next_token)
    return start_mask_from_lengths(lengths, np.shape(tokens)[1] + int(include_next_token))
