"""Every patching mode of BLT (spec §3): token ids (+ entropies) -> patch lengths.

One public entry point, `patch_lengths`, is used by the data pipeline, eval, generation and the
tests; `patch_start_mask` gives the same decision per position. Both are vectorised numpy (no
Python loop over bytes: a start mask, `np.flatnonzero` and a diff). `patch_start_mask_jnp` and
`patch_lengths_jnp` are their jit-compatible twins with static output shapes, for the modes that
must run inside a model forward (in-forward entropy patching, generation).

Conventions (spec §3.1-§3.3)
----------------------------
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
* First-patch rule (§3.2). Every dynamic mode starts patches at positions 0 and 1. `static`
  applies it too by default (`static_first_patch_rule=True`): lengths are [1, s, s, ..., r], i.e.
  the first token alone, then fixed patches from position 1. Why: the BLT decoder requires a
  first patch of exactly one token (§8.2), so the default output is usable by the model. With
  False, static gives the plain MegaByte lengths [s, ..., s, r]; only a MegaByte baseline that
  prepends s - 1 BOE tokens itself (§3.9, out of scope here) should ask for that.
* Combined entropy mode (§3.6, `threshold` and `threshold_add`). Positions 0, 1, 2 always start;
  every p >= 3 starts iff H_{p-1} > threshold and H_{p-1} - H_{p-2} > threshold_add. Position 2
  is forced, as in the monotonic mode (§3.5), because its difference would involve H_0, the
  entropy right after BOS, which neither difference-based mode uses. The official code also
  forbids a start at position 3 (an artefact of how it shifts its masks, with no modelling
  reason); that is reproduced only with `reference_quirks=True`, for parity with checkpoints
  trained by the official code. `reference_quirks` changes nothing else.
* Top-k (§3.7, `mode='entropy'`, no threshold, `patch_size=s`): n = floor(N / s) patches, so
  n - 2 starts are chosen among the candidates by largest H_{p-1}; ties go to the earlier
  position (what `jax.lax.top_k` does, so both twins agree). With `include_next_token=False`
  (undefined in the spec) the candidates are 2..N-1, like every other mode.
* Comparisons run in float32 for float16/float32 entropies (the threshold is rounded to float32,
  as the reference compares float32 tensors with a Python float) and in float64 for float64
  entropies. Differences of float16 entropies are also taken in float32.
* `max_patch_length` (§3.12) splits every patch from its start: L -> floor(L/m) * [m] + [L % m].
* Space mode (§3.8) follows the spec to the letter, including the split of a multi-byte UTF-8
  character after its leading byte. The spec's "always evaluates p = N" is the
  `include_next_token=True` behaviour.

Relation to the Hugging Face patcher (fixtures/hf_blt_tiny, `patcher_cases.npz`): its rows sum
to N but it evaluates the virtual position N, so when H_{N-1} > threshold it ends the row with an
empty patch. Its lengths equal `patch_lengths(..., include_next_token=False)` plus that trailing
zero; with `max_patch_length` (which drops zeros) they are equal outright. Equivalently: our
`include_next_token=True` lengths with the virtual token removed from the last patch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from bltjax.tokenizer import OFFSET, VOCAB_SIZE

if TYPE_CHECKING:
    import jax

MODES = ("static", "space", "entropy", "byte")


def _space_like_table() -> np.ndarray:
    """space_like(id) of §3.8 for all ids: not an ASCII letter/digit, not a continuation byte."""
    byte = np.arange(VOCAB_SIZE) - OFFSET  # negative for special tokens
    word = (
        ((byte >= 48) & (byte <= 57))  # 0-9
        | ((byte >= 65) & (byte <= 90))  # A-Z
        | ((byte >= 97) & (byte <= 122))  # a-z
        | ((byte >= 128) & (byte <= 191))  # UTF-8 continuation bytes
    )
    return ~word


SPACE_LIKE = _space_like_table()
SPACE_LIKE.flags.writeable = False


@dataclasses.dataclass(frozen=True)
class _Rule:
    """A validated patching configuration; `kind` names the concrete rule of §3."""

    kind: str  # byte | static | space | global | monotonic | combined | topk
    threshold: float | None
    threshold_add: float | None
    patch_size: float | None
    max_patch_length: int | None
    include_next_token: bool
    reference_quirks: bool
    static_first_patch_rule: bool

    @property
    def forced_starts(self) -> int:
        """Dynamic modes: positions 0..forced_starts-1 always start a patch (§3.2, §3.5, §3.6)."""
        return 3 if self.kind in ("monotonic", "combined") else 2


def _fail(argument: str, expected: str, got: Any) -> ValueError:
    return ValueError(f"patching: argument `{argument}` must be {expected}; got {got!r}")


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _make_rule(
    *,
    mode: str,
    entropies_given: bool,
    threshold: float | None,
    threshold_add: float | None,
    monotonicity: bool,
    patch_size: float | None,
    max_patch_length: int | None,
    include_next_token: bool,
    reference_quirks: bool,
    static_first_patch_rule: bool,
) -> _Rule:
    """Check the arguments against the mode (§3) and name the rule they select."""
    if mode not in MODES:
        raise _fail("mode", f"one of {MODES}", mode)
    for name, flag in (
        ("monotonicity", monotonicity),
        ("include_next_token", include_next_token),
        ("reference_quirks", reference_quirks),
        ("static_first_patch_rule", static_first_patch_rule),
    ):
        if not isinstance(flag, (bool, np.bool_)):
            raise _fail(name, "a bool", flag)
    if max_patch_length is not None and (
        not isinstance(max_patch_length, numbers.Integral) or isinstance(max_patch_length, bool) or max_patch_length < 1
    ):
        raise _fail("max_patch_length", "None or an int >= 1", max_patch_length)
    for name, value in (("threshold", threshold), ("threshold_add", threshold_add)):
        if value is not None and (not _is_real(value) or math.isnan(value)):
            raise _fail(name, "None or a real number (not NaN)", value)

    if mode != "entropy":
        for name, value, unset in (
            ("entropies", "<array>" if entropies_given else None, None),
            ("threshold", threshold, None),
            ("threshold_add", threshold_add, None),
            ("monotonicity", monotonicity, False),
        ):
            if value != unset:
                raise _fail(name, f"{unset} when mode={mode!r} (it is only used by mode='entropy')", value)

    kind = mode
    if mode == "static":
        if not isinstance(patch_size, numbers.Integral) or isinstance(patch_size, bool) or patch_size < 1:
            raise _fail("patch_size", "an int >= 1 when mode='static'", patch_size)
    elif mode in ("space", "byte"):
        if patch_size is not None:
            raise _fail("patch_size", f"None when mode={mode!r}", patch_size)
    else:  # entropy
        if not entropies_given:
            raise _fail("entropies", "a float array [B, N] when mode='entropy'", None)
        if threshold is None:
            kind = "topk"
            if threshold_add is not None or monotonicity:
                raise _fail(
                    "threshold",
                    "set when threshold_add or monotonicity is used (top-k mode takes neither)",
                    threshold,
                )
            if not _is_real(patch_size) or not patch_size > 0:
                raise _fail(
                    "patch_size",
                    "a number > 0 for top-k entropy patching (no threshold)",
                    patch_size,
                )
        else:
            if patch_size is not None:
                raise _fail("patch_size", "None when an entropy threshold is given", patch_size)
            if monotonicity and threshold_add is not None:
                raise _fail(
                    "threshold_add",
                    "None when monotonicity=True (§3.5 has one threshold)",
                    threshold_add,
                )
            if monotonicity:
                kind = "monotonic"
            elif threshold_add is not None:
                kind = "combined"
            else:
                kind = "global"
    return _Rule(
        kind=kind,
        threshold=None if threshold is None else float(threshold),
        threshold_add=None if threshold_add is None else float(threshold_add),
        patch_size=patch_size,
        max_patch_length=None if max_patch_length is None else int(max_patch_length),
        include_next_token=bool(include_next_token),
        reference_quirks=bool(reference_quirks),
        static_first_patch_rule=bool(static_first_patch_rule),
    )


def _check_tokens(tokens: Any, xp: Any) -> Any:
    tokens = xp.asarray(tokens)
    if tokens.ndim != 2:
        raise _fail("tokens", "a 2-D array [B, N] of token ids", f"shape {tokens.shape}")
    if not xp.issubdtype(tokens.dtype, xp.integer):
        raise _fail("tokens", "an integer array of token ids (offset 4)", f"dtype {tokens.dtype}")
    if tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise _fail("tokens", "non-empty (B >= 1 rows, N >= 1 tokens)", f"shape {tokens.shape}")
    return tokens


def _check_entropies(entropies: Any, shape: tuple[int, ...], xp: Any) -> Any:
    entropies = xp.asarray(entropies)
    if entropies.shape != shape:
        raise _fail("entropies", f"shaped like tokens {shape}", f"shape {entropies.shape}")
    if not xp.issubdtype(entropies.dtype, xp.floating):
        raise _fail("entropies", "a float16/float32/float64 array (nats)", f"dtype {entropies.dtype}")
    return entropies


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
    ordered like the values: ten times faster than numpy's float16 -> float32 conversion, and
    exact (`values > t` iff `bits >= bits of the smallest float16 above t`).
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


# ---------------------------------------------------------------------------------------------
# numpy: the rules


def _rule_start_mask(rule: _Rule, tokens: np.ndarray, entropies: np.ndarray | None) -> np.ndarray:
    """Start decisions of a dynamic mode, before `max_patch_length` splitting: bool [B, T]."""
    batch, n = tokens.shape
    total = n + int(rule.include_next_token)
    mask = np.empty((batch, total), dtype=bool)
    # Candidate column j is position p = j + 2, decided from what is known before token p:
    # H_{p-1} = entropies[:, j + 1] and token p - 1 = tokens[:, j + 1]. Tiles keep temporaries in
    # cache so that every rule stays one pass over memory.
    candidates = mask[:, 2:]
    if rule.kind == "topk":
        cmp = _compare_dtype(entropies.dtype)
        scores = entropies[:, 1 : total - 1].astype(cmp, copy=False)
        _top_k_into(scores, _top_k_count(rule, n), candidates)
    for rows, lo, hi in _tiles(*candidates.shape) if rule.kind != "topk" else ():
        out = candidates[rows, lo:hi]
        if rule.kind == "space":
            ids = tokens[rows, lo : hi + 1]
            if ids.min() < 0 or ids.max() >= VOCAB_SIZE:
                found = f"range [{tokens.min()}, {tokens.max()}]"
                raise _fail("tokens", f"ids in [0, {VOCAB_SIZE}) for mode='space'", found)
            space_like = np.take(SPACE_LIKE, ids)
            # end(i) = space_like(i) and not space_like(i-1), or token i is special.
            np.greater(space_like[:, 1:], space_like[:, :-1], out=out)
            out |= ids[:, 1:] < OFFSET
        else:
            previous = entropies[rows, lo + 1 : hi + 1]  # H_{p-1}
            if rule.kind == "global":
                _greater(previous, rule.threshold, out=out)
                continue
            cmp = _compare_dtype(entropies.dtype)
            rise = np.subtract(previous, entropies[rows, lo:hi], dtype=cmp)  # H_{p-1} - H_{p-2}
            if rule.kind == "monotonic":
                np.greater(rise, _limit(rule.threshold, cmp), out=out)
            else:
                np.greater(rise, _limit(rule.threshold_add, cmp), out=out)
                above = np.empty_like(out)
                _greater(previous, rule.threshold, out=above)
                out &= above
    mask[:, : rule.forced_starts] = True
    if rule.kind == "combined" and rule.reference_quirks and total > 3:
        mask[:, 3] = False
    return mask


_TILE = 1 << 16  # elements per tile: temporaries of a few hundred KiB stay in L2


def _tiles(batch: int, width: int) -> Iterator[tuple[slice, int, int]]:
    """(row slice, first column, end column) tiles covering a [batch, width] array."""
    cols = max(1, min(width, _TILE))
    rows = max(1, _TILE // cols)
    for first_row in range(0, batch, rows):
        for lo in range(0, width, cols):
            yield slice(first_row, first_row + rows), lo, min(lo + cols, width)


def _top_k_count(rule: _Rule, n: int) -> int:
    """n - 2 starts after the forced two, n = floor(N / s) patches (§3.7)."""
    return max(math.floor(n / rule.patch_size) - 2, 0)


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


# ---------------------------------------------------------------------------------------------
# numpy: flat lengths (one 1-D array of every row's non-zero lengths, plus per-row counts)


def _flat_lengths_from_mask(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def _split_flat(lengths: np.ndarray, counts: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
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


def _pack_rows(lengths: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Flat lengths -> int32 [B, max(counts)], right-padded with zeros (§3.1, §3.13)."""
    batch = counts.shape[0]
    width = int(counts.max()) if batch else 0
    out = np.zeros((batch, width), dtype=np.int32)
    if batch == 1:
        out[0, : lengths.size] = lengths
    else:
        out[np.arange(width) < counts[:, None]] = lengths
    return out


def _static_row(rule: _Rule, total: int) -> np.ndarray:
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


# ---------------------------------------------------------------------------------------------
# numpy: public API


def patch_lengths(
    tokens: np.ndarray,
    *,
    mode: str,
    entropies: np.ndarray | None = None,
    threshold: float | None = None,
    threshold_add: float | None = None,
    monotonicity: bool = False,
    patch_size: float | None = None,
    max_patch_length: int | None = None,
    include_next_token: bool = True,
    reference_quirks: bool = False,
    static_first_patch_rule: bool = True,
) -> np.ndarray:
    """Patch lengths int32 [B, P] of spec §3 for `tokens` [B, N] (and `entropies` [B, N], nats).

    mode='entropy' selects the rule from the arguments: `threshold` -> global (§3.4);
    + `monotonicity=True` -> approximate monotonic with threshold θ_r (§3.5); + `threshold_add`
    -> combined (§3.6); no threshold and `patch_size` -> top-k (§3.7). 'static' needs an int
    `patch_size` (§3.9), 'space' (§3.8) and 'byte' (§3.10) take nothing. See the module docstring
    for the conventions and for `reference_quirks` / `static_first_patch_rule`.
    """
    rule = _make_rule(
        mode=mode,
        entropies_given=entropies is not None,
        threshold=threshold,
        threshold_add=threshold_add,
        monotonicity=monotonicity,
        patch_size=patch_size,
        max_patch_length=max_patch_length,
        include_next_token=include_next_token,
        reference_quirks=reference_quirks,
        static_first_patch_rule=static_first_patch_rule,
    )
    tokens = _check_tokens(tokens, np)
    batch, n = tokens.shape
    if rule.kind in ("static", "byte"):
        row = _static_row(rule, n + int(rule.include_next_token))
        counts = np.array([row.size])
        if rule.max_patch_length is not None:
            row, counts = _split_flat(row, counts, rule.max_patch_length)
        return np.broadcast_to(_pack_rows(row, counts), (batch, int(counts[0]))).copy()
    if entropies is not None:
        entropies = _check_entropies(entropies, tokens.shape, np)
        if _has_nan(entropies):
            raise _fail("entropies", "free of NaN", f"{int(np.isnan(entropies).sum())} NaN values")
    lengths, counts = _flat_lengths_from_mask(_rule_start_mask(rule, tokens, entropies))
    if rule.max_patch_length is not None:
        lengths, counts = _split_flat(lengths, counts, rule.max_patch_length)
    return _pack_rows(lengths, counts)


def patch_start_mask(
    tokens: np.ndarray,
    *,
    mode: str,
    entropies: np.ndarray | None = None,
    threshold: float | None = None,
    threshold_add: float | None = None,
    monotonicity: bool = False,
    patch_size: float | None = None,
    max_patch_length: int | None = None,
    include_next_token: bool = True,
    reference_quirks: bool = False,
    static_first_patch_rule: bool = True,
) -> np.ndarray:
    """bool [B, N (+1)]: does position p start a patch? Same arguments as `patch_lengths`.

    The per-position view is what incremental generation (§16) needs: position p is decided from
    tokens and entropies before p only.
    """
    lengths = patch_lengths(
        tokens,
        mode=mode,
        entropies=entropies,
        threshold=threshold,
        threshold_add=threshold_add,
        monotonicity=monotonicity,
        patch_size=patch_size,
        max_patch_length=max_patch_length,
        include_next_token=include_next_token,
        reference_quirks=reference_quirks,
        static_first_patch_rule=static_first_patch_rule,
    )
    total = np.shape(tokens)[1] + int(include_next_token)
    return start_mask_from_lengths(lengths, total)


def _check_lengths(lengths: Any) -> np.ndarray:
    lengths = np.asarray(lengths)
    if lengths.ndim != 2 or not np.issubdtype(lengths.dtype, np.integer):
        raise _fail("lengths", "an integer array [B, P]", f"{lengths.dtype} array of shape {lengths.shape}")
    if lengths.size and lengths.min() < 0:
        raise _fail("lengths", "non-negative", f"minimum {lengths.min()}")
    gaps = np.flatnonzero(np.any((lengths[:, 1:] > 0) & (lengths[:, :-1] == 0), axis=1))
    if gaps.size:
        row = f"row {gaps[0]}: {lengths[gaps[0]].tolist()}"
        raise _fail("lengths", "right-padded (no non-zero length after a zero, §3.1)", row)
    return lengths


def start_mask_from_lengths(lengths: np.ndarray, total: int | None = None) -> np.ndarray:
    """bool [B, total]: True where a patch starts. `total` defaults to the largest row sum."""
    lengths = _check_lengths(lengths)
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
        raise _fail("mask", "a non-empty bool array [B, T]", f"{mask.dtype} array of shape {mask.shape}")
    if not mask[:, 0].all():
        raise _fail("mask", "True in column 0 of every row (position 0 starts a patch)", mask[:, 0])
    return _pack_rows(*_flat_lengths_from_mask(mask))


def split_long_patches(lengths: np.ndarray, max_patch_length: int) -> np.ndarray:
    """§3.12 on padded lengths [B, P]: split every patch longer than m from its start."""
    lengths = _check_lengths(lengths)
    if not isinstance(max_patch_length, numbers.Integral) or max_patch_length < 1:
        raise _fail("max_patch_length", "an int >= 1", max_patch_length)
    positive = lengths > 0
    flat, counts = _split_flat(lengths[positive].astype(np.int64), positive.sum(axis=1), int(max_patch_length))
    return _pack_rows(flat, counts)


def patch_ids_from_lengths(lengths: np.ndarray, n: int) -> np.ndarray:
    """pid of §3.1 as int32 [B, n]: pid(i) = #{j in 1..P : C_j <= i}, C_j = sum(lengths[:j])."""
    lengths = _check_lengths(lengths)
    batch = lengths.shape[0]
    boundaries = np.minimum(np.cumsum(lengths, axis=1, dtype=np.int64), n)  # C_1..C_P, clipped
    flat = (boundaries + np.arange(batch)[:, None] * (n + 1)).ravel()
    hits = np.bincount(flat, minlength=batch * (n + 1)).reshape(batch, n + 1)
    return np.cumsum(hits[:, :n], axis=1).astype(np.int32)


def decoder_patch_ids_from_lengths(lengths: np.ndarray, n: int) -> np.ndarray:
    """dpid of §8.2 as int32 [B, n]: pid computed from lengths[:, 1:] (first patch must be 1)."""
    lengths = _check_lengths(lengths)
    if lengths.shape[1] == 0 or np.any(lengths[:, 0] != 1):
        raise _fail("lengths", "a first patch of length 1 in every row (§8.2)", lengths[:, :1].ravel())
    return patch_ids_from_lengths(lengths[:, 1:], n)


# ---------------------------------------------------------------------------------------------
# jnp twin: static shapes, usable inside jit (NaN entropies cannot be rejected there: a NaN
# compares False, so it never starts a patch; token ids are not range-checked either).
# jax is imported on first use, so that numpy-only users (data-loader workers, the calibration
# command line) start without it.


def _start_mask_traced(rule: _Rule, tokens: Any, entropies: Any, params: Any) -> Any:
    """The rules of §3 on jnp arrays. `rule` is static (it fixes shapes and branches); the
    numbers in `params` = [threshold, threshold_add, static patch size, max_patch_length] are
    traced, so one compilation serves every threshold."""
    import jax
    import jax.numpy as jnp

    batch, n = tokens.shape
    total = n + int(rule.include_next_token)
    positions = jnp.arange(total)
    cmp = jnp.float64 if entropies is not None and entropies.dtype == jnp.float64 else jnp.float32
    threshold, threshold_add = params[0].astype(cmp), params[1].astype(cmp)
    static_size, max_len = params[2].astype(jnp.int32), params[3].astype(jnp.int32)
    if rule.kind == "byte":
        mask = jnp.ones((batch, total), dtype=bool)
    elif rule.kind == "static":
        if rule.static_first_patch_rule:
            row = (positions == 0) | ((positions - 1) % static_size == 0)
        else:
            row = positions % static_size == 0
        mask = jnp.broadcast_to(row, (batch, total))
    else:
        # Column j of `candidates` is position p = j + 2 (as in the numpy rules).
        if rule.kind == "space":
            space_like = jnp.asarray(SPACE_LIKE)[tokens[:, : total - 1]]
            ends = space_like[:, 1:] & ~space_like[:, :-1]
            candidates = ends | (tokens[:, 1 : total - 1] < OFFSET)
        else:
            previous = entropies[:, 1 : total - 1].astype(cmp)  # H_{p-1}
            rise = previous - entropies[:, 0 : total - 2].astype(cmp)  # H_{p-1} - H_{p-2}
            if rule.kind == "global":
                candidates = previous > threshold
            elif rule.kind == "monotonic":
                candidates = rise > threshold
            elif rule.kind == "combined":
                candidates = (previous > threshold) & (rise > threshold_add)
            else:
                k = min(_top_k_count(rule, n), previous.shape[1])
                candidates = jnp.zeros(previous.shape, dtype=bool)
                if k:
                    _, chosen = jax.lax.top_k(previous, k)  # ties: lower index first
                    candidates = candidates.at[jnp.arange(batch)[:, None], chosen].set(True)
        head = jnp.ones((batch, min(total, 2)), dtype=bool)
        mask = jnp.concatenate([head, candidates], axis=1)
        if rule.kind == "combined" and rule.reference_quirks:
            mask = mask & (positions != 3)[None, :]
        mask = mask | (positions < rule.forced_starts)[None, :]
    if rule.max_patch_length is not None:
        last_start = jax.lax.cummax(jnp.where(mask, positions, 0), axis=1)
        mask = mask | ((positions - last_start) % max_len == 0)
    return mask


def _lengths_from_mask_traced(mask: Any, max_patches: int) -> Any:
    import jax
    import jax.numpy as jnp

    total = mask.shape[1]
    starts = jax.vmap(lambda row: jnp.nonzero(row, size=max_patches, fill_value=total)[0])(mask)
    ends = jnp.concatenate([starts[:, 1:], jnp.full((mask.shape[0], 1), total, starts.dtype)], axis=1)
    return (ends - starts).astype(jnp.int32)


@functools.cache
def _compiled(name: str) -> Any:
    import jax

    if name == "start_mask":
        return jax.jit(_start_mask_traced, static_argnums=0)
    return jax.jit(_lengths_from_mask_traced, static_argnums=1)


def patch_start_mask_jnp(
    tokens: jax.Array,
    *,
    mode: str,
    entropies: jax.Array | None = None,
    threshold: float | None = None,
    threshold_add: float | None = None,
    monotonicity: bool = False,
    patch_size: float | None = None,
    max_patch_length: int | None = None,
    include_next_token: bool = True,
    reference_quirks: bool = False,
    static_first_patch_rule: bool = True,
) -> jax.Array:
    """jnp twin of `patch_start_mask`: bool [B, N (+1)]. Arrays may be traced; the other
    arguments are Python values (static under an enclosing jit)."""
    import jax.numpy as jnp

    rule = _make_rule(
        mode=mode,
        entropies_given=entropies is not None,
        threshold=threshold,
        threshold_add=threshold_add,
        monotonicity=monotonicity,
        patch_size=patch_size,
        max_patch_length=max_patch_length,
        include_next_token=include_next_token,
        reference_quirks=reference_quirks,
        static_first_patch_rule=static_first_patch_rule,
    )
    tokens = _check_tokens(tokens, jnp)
    if entropies is not None:
        entropies = _check_entropies(entropies, tokens.shape, jnp)
    wide = entropies is not None and entropies.dtype == jnp.float64
    params = jnp.array(
        [
            rule.threshold or 0.0,
            rule.threshold_add or 0.0,
            rule.patch_size if rule.kind == "static" else 0,
            rule.max_patch_length or 0,
        ],
        dtype=jnp.float64 if wide else jnp.float32,
    )
    # Only what fixes shapes or branches stays static; the numbers travel in `params`.
    static_rule = dataclasses.replace(
        rule,
        threshold=None,
        threshold_add=None,
        patch_size=rule.patch_size if rule.kind == "topk" else None,
        max_patch_length=None if rule.max_patch_length is None else 1,
    )
    return _compiled("start_mask")(static_rule, tokens, entropies, params)


def patch_lengths_jnp(tokens: jax.Array, *, max_patches: int, **kwargs: Any) -> jax.Array:
    """jnp twin of `patch_lengths` with a static width: int32 [B, max_patches], zero-padded.

    Keyword arguments are those of `patch_lengths`. Rows with more than `max_patches` patches keep
    their row sum: the surplus is merged into the last column (so `max_patch_length` may be
    exceeded there); check `patch_start_mask_jnp(...).sum(-1) <= max_patches` if it matters.
    """
    if not isinstance(max_patches, numbers.Integral) or isinstance(max_patches, bool) or max_patches < 1:
        raise _fail("max_patches", "an int >= 1", max_patches)
    mask = patch_start_mask_jnp(tokens, **kwargs)
    return _compiled("lengths")(mask, int(max_patches))
