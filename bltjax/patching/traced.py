"""The numpy patcher's twin in jax.numpy: static output shapes, usable inside `jax.jit`.

    mask = patching.patch_start_mask_jnp(tokens, rule, entropies=h)            # bool [B, N + 1]
    lengths = patching.patch_lengths_jnp(tokens, rule, entropies=h, max_patches=64)

For the modes that must run inside a model forward (in-forward entropy patching, evaluation of a
traced batch). The arrays may be traced; the rule is a Python value. Only the rule's structure
(`PatchingRule.static_part`) is static; its numbers travel as a traced vector
(`PatchingRule.values`), so one compilation serves every threshold. The decisions and
conventions are those of `bltjax.patching.offline`, with two exceptions that a traced value
cannot raise for: NaN entropies never start a patch (a NaN compares False), and token ids are
not range-checked. (Subnormal entropies, below 1.2e-38, may compare as zero: XLA on CPU flushes
them; no entropy model produces them.)

jax is imported on first use, so that numpy-only users of `bltjax.patching` (data-loader
workers, the calibration command line) start without it.
"""

from __future__ import annotations

import functools
import numbers
from typing import TYPE_CHECKING, Any

from bltjax.patching.offline import check_entropies, check_tokens
from bltjax.patching.rule import SPACE_LIKE, PatchingError, PatchingRule, resolve
from bltjax.tokenizer import BPE_ID, OFFSET

if TYPE_CHECKING:
    import jax


def _start_mask(structure: PatchingRule, include_next_token: bool, tokens: Any, entropies: Any, values: Any) -> Any:
    """The rules of §3 on jnp arrays; `structure` and `include_next_token` are static."""
    import jax
    import jax.numpy as jnp

    batch, n = tokens.shape
    total = n + int(include_next_token)
    positions = jnp.arange(total)
    cmp = jnp.float64 if entropies is not None and entropies.dtype == jnp.float64 else jnp.float32
    threshold, threshold_add = values[0].astype(cmp), values[1].astype(cmp)
    static_size, max_len = values[2].astype(jnp.int32), values[3].astype(jnp.int32)
    kind = structure.kind
    if kind == "byte":
        mask = jnp.ones((batch, total), dtype=bool)
    elif kind == "static":
        if structure.static_first_patch_rule:
            row = (positions == 0) | ((positions - 1) % static_size == 0)
        else:
            row = positions % static_size == 0
        mask = jnp.broadcast_to(row, (batch, total))
    else:
        # Column j of `candidates` is position p = j + 2 (as in the numpy rules).
        if kind == "space":
            space_like = jnp.asarray(SPACE_LIKE)[tokens[:, : total - 1]]
            ends = space_like[:, 1:] & ~space_like[:, :-1]
            candidates = ends | (tokens[:, 1 : total - 1] < OFFSET)
        elif kind == "bpe":  # after each BPE delimiter (§3.11)
            candidates = tokens[:, 1 : total - 1] == BPE_ID
        else:
            previous = entropies[:, 1 : total - 1].astype(cmp)  # H_{p-1}
            rise = previous - entropies[:, 0 : total - 2].astype(cmp)  # H_{p-1} - H_{p-2}
            if kind == "global":
                candidates = previous > threshold
            elif kind == "monotonic":
                candidates = rise > threshold
            elif kind == "combined":
                candidates = (previous > threshold) & (rise > threshold_add)
            else:
                k = min(structure.top_k_count(n), previous.shape[1])
                candidates = jnp.zeros(previous.shape, dtype=bool)
                if k:
                    _, chosen = jax.lax.top_k(previous, k)  # ties: lower index first
                    candidates = candidates.at[jnp.arange(batch)[:, None], chosen].set(True)
        head = jnp.ones((batch, min(total, 2)), dtype=bool)
        mask = jnp.concatenate([head, candidates], axis=1)
        if kind == "combined" and structure.reference_quirks:
            mask = mask & (positions != 3)[None, :]
        mask = mask | (positions < structure.forced_starts)[None, :]
    return split_long_starts(mask, positions, max_len)


def split_long_starts(starts: Any, positions: Any, max_len: Any) -> Any:
    """`max_patch_length` (§3.12) on start masks [..., T]: a start every m positions after each
    natural start. m is a traced int (0 = no split), so one program serves both."""
    import jax
    import jax.numpy as jnp

    last_start = jax.lax.cummax(jnp.where(starts, positions, 0), axis=starts.ndim - 1)
    return starts | ((max_len > 0) & ((positions - last_start) % jnp.maximum(max_len, 1) == 0))


def _lengths_from_mask(mask: Any, max_patches: int) -> Any:
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
        return jax.jit(_start_mask, static_argnums=(0, 1))
    return jax.jit(_lengths_from_mask, static_argnums=1)


def patch_start_mask_jnp(
    tokens: jax.Array,
    rule: PatchingRule | None = None,
    *,
    entropies: jax.Array | None = None,
    include_next_token: bool = True,
    **fields: Any,
) -> jax.Array:
    """jnp twin of `patch_start_mask`: bool [B, N (+1)]. `rule` is a PatchingRule or its fields."""
    import jax.numpy as jnp

    rule = resolve(rule, fields)
    rule.check_entropies_given(entropies is not None)
    tokens = check_tokens(tokens, jnp)
    if entropies is not None:
        entropies = check_entropies(entropies, tokens.shape, rule, jnp)
    wide = entropies is not None and entropies.dtype == jnp.float64
    values = jnp.asarray(rule.values(jnp.float64 if wide else jnp.float32))
    return _compiled("start_mask")(rule.static_part(), bool(include_next_token), tokens, entropies, values)


def patch_lengths_jnp(
    tokens: jax.Array,
    rule: PatchingRule | None = None,
    *,
    max_patches: int,
    entropies: jax.Array | None = None,
    include_next_token: bool = True,
    **fields: Any,
) -> jax.Array:
    """jnp twin of `patch_lengths` with a static width: int32 [B, max_patches], zero-padded.

    Rows with more than `max_patches` patches keep their row sum: the surplus is merged into the
    last column (so `max_patch_length` may be exceeded there); check
    `patch_start_mask_jnp(...).sum(-1) <= max_patches` if it matters.
    """
    if not isinstance(max_patches, numbers.Integral) or isinstance(max_patches, bool) or max_patches < 1:
        raise PatchingError("max_patches", "an int >= 1", max_patches)
    mask = patch_start_mask_jnp(
        tokens, resolve(rule, fields), entropies=entropies, include_next_token=include_next_token
    )
    return _compiled("lengths")(mask, int(max_patches))
