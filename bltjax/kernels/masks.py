"""Which keys a query sees, as boolean masks: the reference every attention path must equal.

The fast paths never build these [B, T, S] arrays; they apply the same rule (`visible`) per
block or gather the keys instead. The dense implementation and the tests use them directly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# A finite "minus infinity": rows whose keys are all masked stay finite (then get zeroed), so
# no NaN can reach a weight gradient through 0 * NaN (docs/architecture.md §6.4).
MASK_VALUE = -1e30


def visible(q_pos, k_pos, q_seg, k_seg, window: int | None) -> jax.Array:
    """The self-attention rule on broadcastable query / key positions and segments (§5.4).

    Causal, same segment (when segments are given) and ``q_pos - k_pos < window`` (when a
    window is given; the window counts the query itself).
    """
    mask = k_pos <= q_pos
    if window is not None:
        mask &= q_pos - k_pos < window
    if q_seg is not None:
        mask &= q_seg[..., :, None] == k_seg[..., None, :]
    return mask


def local_causal_mask(positions_BT: jax.Array, segment_ids_BT: jax.Array | None, window: int | None) -> jax.Array:
    """[B, T, T] mask: causal, same segment, and i - j < window (docs/architecture.md §5.4)."""
    return visible(positions_BT[:, :, None], positions_BT[:, None, :], segment_ids_BT, segment_ids_BT, window)


def gathered_mask(index_BTR: jax.Array, n_keys: int) -> jax.Array:
    """[B, T, S] mask of the keys each query names in ``index_BTR`` (the decoder's k slots)."""
    return jnp.any(index_BTR[:, :, :, None] == jnp.arange(n_keys, dtype=index_BTR.dtype), axis=2)


def own_patch_mask(key_patch_BS: jax.Array, n_queries: int, slots_per_patch: int) -> jax.Array:
    """[B, T, S] mask: query t (of patch t // slots_per_patch) sees the keys of that patch only."""
    query_patch = jnp.arange(n_queries, dtype=key_patch_BS.dtype) // slots_per_patch
    return query_patch[None, :, None] == key_patch_BS[:, None, :]
