"""Every attention implementation, behind one entry point for self- and one for cross-attention.

The model's modules compute projections and RoPE and call only `self_attention` and
`cross_attention`; the config field ``model.attention`` names the implementation:

* ``"dense"``: masked softmax over all keys (`dense.attend`); the reference.
* ``"xla_blockwise"``: self-attention one query block at a time (`blockwise`); cross-attention
  over gathered keys (`cross`). Plain XLA, so it runs on every backend.
* ``"auto"``: ``xla_blockwise`` for rows longer than one query block, ``dense`` otherwise (the
  same work there), on every backend for now.

All give the same values and gradients. A new kernel (e.g. a TPU or GPU one) is a function of
the same signature added to `_SELF_ATTENTION` (and `_CROSS_STRUCTURED` if it has a cross path).

Decoding reads heads-major KV caches (`kv_cache`: layout, masked writes) through two more entry
points: `cached_self_attention` (one query per row at its own position) and
`cached_cross_attention` (queries over cached cross-attention keys). They have one XLA
implementation for every backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from bltjax.kernels import blockwise, cross, dense, kv_cache, masks

# Keep in step with `bltjax.models.configs.ATTENTION_IMPLEMENTATIONS` (jax-free, for validation).
ATTENTION_IMPLEMENTATIONS = ("auto", "dense", "xla_blockwise")

# What a self-attention kernel returns besides its output: something it can replay in a
# rematerialised second run of the same inputs (see `bltjax.models.remat`), or None.
Record = Any


def _dense_self_attention(q, k, v, positions, segment_ids, window, replay):
    return dense.attend(q, k, v, masks.local_causal_mask(positions, segment_ids, window)), None


def _blockwise_self_attention(q, k, v, positions, segment_ids, window, replay):
    return blockwise.attend_blockwise(q, k, v, positions, segment_ids, window, replay=replay)


_SELF_ATTENTION: dict[str, Callable[..., tuple[jax.Array, Record]]] = {
    "dense": _dense_self_attention,
    "xla_blockwise": _blockwise_self_attention,
}


def _unknown(implementation: str) -> ValueError:
    return ValueError(f"model.attention: expected one of {ATTENTION_IMPLEMENTATIONS}, got {implementation!r}")


def self_attention_implementation(t: int, window: int | None, implementation: str = "auto") -> str:
    """The implementation `self_attention` runs for a row of ``t`` queries (resolves ``"auto"``)."""
    if implementation == "auto":
        return "xla_blockwise" if blockwise.blockwise_pays(t, window) else "dense"
    if implementation not in _SELF_ATTENTION:
        raise _unknown(implementation)
    return implementation


def self_attention(
    q_BTHD: jax.Array,
    k_BTKD: jax.Array,
    v_BTKD: jax.Array,
    positions_BT: jax.Array,
    segment_ids_BT: jax.Array | None,
    window: int | None,
    *,
    implementation: str = "auto",
    replay: Record | None = None,
) -> tuple[jax.Array, Record | None]:
    """Causal self-attention (docs/architecture.md §5.4): key j is visible to query i iff
    j <= i, both lie in the same segment (when ``segment_ids_BT`` is given) and i - j < window
    (when ``window`` is given). Positions are absolute (one per element); K may divide H (GQA).

    Returns (out [B, T, H, D], record): ``record`` is None or what the implementation can
    replay when the same inputs run again under rematerialisation (pass it as ``replay``).
    """
    name = self_attention_implementation(q_BTHD.shape[1], window, implementation)
    return _SELF_ATTENTION[name](q_BTHD, k_BTKD, v_BTKD, positions_BT, segment_ids_BT, window, replay)


def cross_attention(
    q_BTHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    *,
    gather_index: jax.Array | None = None,
    key_patch: jax.Array | None = None,
    slots_per_patch: int = 1,
    mask: jax.Array | None = None,
    implementation: str = "auto",
) -> jax.Array:
    """Attention of T queries over S keys (no causality, no RoPE; docs/architecture.md §6.3, §8.3).

    Which keys a query sees is given by exactly one of:
      * ``gather_index`` [B, T, R]: the R keys each query names (the decoder's k slots);
      * ``key_patch`` [B, S]: query t belongs to patch t // ``slots_per_patch`` and sees the
        keys whose patch is its own (the encoder's own-patch window);
      * ``mask`` [B, T, S]: any dense mask (wider cross-attention windows).
    ``"dense"`` turns the first two into masks; the other implementations gather the keys.
    A query without keys gets 0.
    """
    if sum(x is not None for x in (gather_index, key_patch, mask)) != 1:
        raise ValueError("cross_attention: expected exactly one of gather_index, key_patch, mask")
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise _unknown(implementation)
    if mask is None and implementation == "dense":
        if gather_index is not None:
            mask = masks.gathered_mask(gather_index, k_BSKD.shape[1])
        else:
            mask = masks.own_patch_mask(key_patch, q_BTHD.shape[1], slots_per_patch)
    if mask is not None:
        return dense.attend(q_BTHD, k_BSKD, v_BSKD, mask)
    if gather_index is not None:
        return cross.attend_gathered(q_BTHD, k_BSKD, v_BSKD, gather_index)
    return cross.attend_own_patch(q_BTHD, k_BSKD, v_BSKD, key_patch, slots_per_patch)


def cached_self_attention(
    q_BHD: jax.Array,
    cache: kv_cache.KVCache,
    positions_B: jax.Array,
    segment_ids_B: jax.Array | None,
    window: int | None,
    *,
    new_kv: tuple[jax.Array, jax.Array] | None = None,
    prefix_chunk: int | None = None,
) -> jax.Array:
    """One decoding step of `self_attention`: each row's query at its own position over its cache.

    Without ``new_kv`` the cache already holds the query's own key (`kv_cache.write_step`). With
    ``new_kv`` = (k [B, K, D], v) the own key is not written yet (the caller writes it later,
    e.g. outside a `lax.cond`); then a full (unwindowed) cache whose size ``prefix_chunk``
    divides is read only up to the largest query position, ``prefix_chunk`` slots at a time.
    Returns [B, H, D].
    """
    if new_kv is None:
        return kv_cache.attend_cached(q_BHD, cache, positions_B, segment_ids_B, window)
    k_BKD, v_BKD = new_kv
    slots = cache.keys.shape[2]
    if prefix_chunk is not None and window is None and slots % prefix_chunk == 0:

        def allowed(slot):
            slot_positions = jnp.take(cache.positions, slot, axis=1)
            mask = (slot_positions >= 0) & (slot_positions < positions_B[:, None])
            if segment_ids_B is not None:
                mask &= jnp.take(cache.segments, slot, axis=1) == segment_ids_B[:, None]
            return mask

        used = jnp.max(positions_B)
        return kv_cache.attend_used_prefix(q_BHD, cache.keys, cache.values, allowed, used, prefix_chunk, new_kv)
    return kv_cache.attend_cached_and_new(q_BHD, cache, k_BKD, v_BKD, positions_B, segment_ids_B, window)


def cached_cross_attention(
    q_BTHD: jax.Array,
    k_BKSD: jax.Array,
    v_BKSD: jax.Array,
    *,
    mask: jax.Array | None = None,
    allowed: Callable[[jax.Array], jax.Array] | None = None,
    used: jax.Array | None = None,
    chunk: int | None = None,
) -> jax.Array:
    """`cross_attention` over heads-major cached keys and values [B, K, S, D]: [B, T, H, D].

    Either ``mask`` [B, T, S] (dense), or for one query per row (T = 1) ``allowed(slots [C]) ->
    [B, C]`` over the first ``used`` slots only, read ``chunk`` at a time
    (`kv_cache.attend_used_prefix`), so the cost follows what has been written. A query
    without keys gets 0.
    """
    if (mask is None) == (allowed is None):
        raise ValueError("cached_cross_attention: expected exactly one of mask, allowed")
    if mask is not None:
        return kv_cache.attend(q_BTHD, k_BKSD, v_BKSD, mask)
    return kv_cache.attend_used_prefix(q_BTHD[:, 0], k_BKSD, v_BKSD, allowed, used, chunk)[:, None]
