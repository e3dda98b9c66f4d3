"""Per-byte patch ids from patch lengths, inside jit (docs/architecture.md §3.1, §8.2).

Everything downstream of patching sees patches only through these ids: which patch pools a
byte (encoder), which global output a byte may read (decoder), and which patches end a
document (global mask). They are derived with static shapes from the zero-padded lengths.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np


def with_next_token(patch_lengths_BP: jax.Array, n_tokens: int) -> jax.Array:
    """Brings rows to the training convention: lengths add up to N + 1 (docs/architecture.md §3.3).

    A row that adds up to N (the Hugging Face convention) gets the virtual next token as in
    `transformers`: in the first zero-length column after its last patch when there is one
    (that column is the patcher's "empty last patch"), otherwise at the end of its last patch.
    Rows already adding up to N + 1 are returned unchanged.
    """
    b, p = patch_lengths_BP.shape
    lengths = patch_lengths_BP.astype(jnp.int32)
    n_patches = jnp.sum(lengths > 0, axis=-1)
    column = jnp.minimum(n_patches, p - 1)
    needs_next = (jnp.sum(lengths, axis=-1) == n_tokens).astype(jnp.int32)
    return lengths.at[jnp.arange(b), column].add(needs_next)


def patch_ids(patch_lengths_BP: jax.Array, n_tokens: int) -> jax.Array:
    """pid(i): index of the patch holding token i, [B, N] int32.

    pid(i) = #{j : C_j <= i} with C_j the cumulative lengths; a binary search per row keeps it
    O(N log P) instead of an N x P comparison.
    """
    ends = jnp.cumsum(patch_lengths_BP.astype(jnp.int32), axis=-1)
    positions = jnp.arange(n_tokens, dtype=jnp.int32)
    ids = jax.vmap(lambda row: jnp.searchsorted(row, positions, side="right"))(ends)
    return jnp.minimum(ids, patch_lengths_BP.shape[-1] - 1).astype(jnp.int32)


def decoder_patch_ids(patch_lengths_BP: jax.Array, n_tokens: int) -> jax.Array:
    """dpid(i) = pid computed from lengths[:, 1:] = pid(i + 1) - 1 (docs/architecture.md §8.2).

    Token i predicts token i + 1 and may only read the global output of the patch before the
    one that contains its target; this shift is what keeps BLT causal. It assumes the N + 1
    convention and a first patch of length exactly 1.
    """
    return patch_ids(patch_lengths_BP[:, 1:], n_tokens)


class AmbiguousPaddingWarning(UserWarning):
    """A row adding up to N carries two or more zero columns (docs/architecture.md §3.3).

    A patcher writes at most one empty last patch, so such a row is padded for certain, and
    whether token N opens a patch cannot be read from its lengths: the model takes the first
    zero as the patcher's empty last patch, `transformers` reads the column before the last, and the row
    run alone may have meant neither. Rows adding up to N + 1 carry the decision explicitly.
    """


def check_patch_lengths(patch_lengths, n_tokens: int, *, name: str = "patch_lengths") -> None:
    """Raises ValueError unless every row is a valid BLT patching of n_tokens tokens.

    Valid: non-negative; no non-zero length after a zero; first length exactly 1 (§3.2, the
    decoder shift needs it); row sum N (HF convention) or N + 1 (training convention). Warns
    (AmbiguousPaddingWarning) on a row adding up to N with two or more zero columns: a valid
    input whose last byte's patch is a guess (docs/architecture.md §3.3).
    """
    lengths = np.asarray(patch_lengths)
    if lengths.ndim != 2 or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"{name}: expected an integer array [B, P], got {lengths.dtype} of shape {lengths.shape}")
    if (lengths < 0).any():
        raise ValueError(f"{name}: lengths must be >= 0")
    zero_then_nonzero = (lengths[:, :-1] == 0) & (lengths[:, 1:] > 0)
    if zero_then_nonzero.any():
        row = int(np.argwhere(zero_then_nonzero)[0, 0])
        raise ValueError(f"{name}: row {row} has a non-zero length after a zero (rows are right-padded)")
    if (lengths[:, 0] != 1).any():
        row = int(np.flatnonzero(lengths[:, 0] != 1)[0])
        raise ValueError(
            f"{name}: row {row} starts with a patch of length {lengths[row, 0]}; "
            "the first patch must be exactly one token (the BOS), docs/architecture.md §3.2"
        )
    sums = lengths.sum(axis=-1)
    bad = np.flatnonzero((sums != n_tokens) & (sums != n_tokens + 1))
    if bad.size:
        raise ValueError(
            f"{name}: row {int(bad[0])} adds up to {int(sums[bad[0]])}; expected N = {n_tokens} "
            f"or N + 1 = {n_tokens + 1} (with the next token)"
        )
    zero_columns = (lengths == 0).sum(axis=-1)
    ambiguous = np.flatnonzero((sums == n_tokens) & (zero_columns >= 2))
    if ambiguous.size:
        row = int(ambiguous[0])
        warnings.warn(
            f"{name}: row {row} adds up to N = {n_tokens} and has {int(zero_columns[row])} zero columns, so it is "
            "padded and whether token N opens a patch is ambiguous; the model reads its first zero column as the "
            "patcher's empty last patch (transformers reads column P - 2). Pass lengths adding up to "
            f"N + 1 = {n_tokens + 1} (patching.patch_lengths(..., include_next_token=True)) to remove the doubt; "
            "docs/architecture.md §3.3",
            AmbiguousPaddingWarning,
            stacklevel=2,
        )
