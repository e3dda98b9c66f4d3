"""KV caches for incremental decoding and the attention that reads them (the decode kernel).

A cache holds the keys and values of one attention layer for every row of a batch in a
buffer of S slots, heads-major ([B, K, S, D]: the layout of the batched dot products that
read it, so XLA never transposes a cache on a step). Position p lives in slot ``p % S``, so
with a sliding window w the buffer is a ring of ``S = min(w, max_positions)`` slots (the
w - 1 previous keys plus the current one), and without a window it is a full buffer of
``S = max_positions`` slots. Each slot also records the absolute position and the document
segment of its key; the attention mask is rebuilt from those (causal, same segment, inside
the window, slot filled), so a stale slot or one never written can never be read. Rows
advance independently (each has its own position), which is what batched prompts of
different lengths need.

Everything here has static shapes: writes are masked scatters, never Python branches on
data, so a decoding step compiles once. The model's attention modules reach the attention
functions through `bltjax.kernels.cached_self_attention` / `cached_cross_attention`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bltjax.kernels.masks import MASK_VALUE

# Position of a slot that holds nothing (it fails every mask: no query position is negative).
EMPTY = -1


class KVCache(NamedTuple):
    """Keys and values of one attention layer, one ring (or full) buffer per row."""

    keys: jax.Array  # [B, K, S, D]
    values: jax.Array  # [B, K, S, D]
    positions: jax.Array  # [B, S] int32 absolute position of each slot's key, EMPTY if none
    segments: jax.Array  # [B, S] int32 document segment of each slot's key


def cache_slots(window: int | None, max_positions: int) -> int:
    """Slots a layer needs: its window (a ring) or, without one, every position."""
    return max_positions if window is None else max(1, min(window, max_positions))


def empty_cache(batch: int, slots: int, kv_heads: int, head_dim: int, dtype: jnp.dtype) -> KVCache:
    """A cache with no key written yet."""
    zeros = jnp.zeros((batch, kv_heads, slots, head_dim), dtype)
    return KVCache(zeros, zeros, jnp.full((batch, slots), EMPTY, jnp.int32), jnp.zeros((batch, slots), jnp.int32))


def write_step(
    cache: KVCache, k_BKD: jax.Array, v_BKD: jax.Array, pos_B: jax.Array, seg_B: jax.Array | None, write_B: jax.Array
) -> KVCache:
    """Stores one key/value per row at slot ``pos % S``; rows with ``write_B`` False keep their cache."""
    slot = pos_B % cache.keys.shape[2]
    return KVCache(
        put_heads_major(cache.keys, slot, k_BKD, write_B),
        put_heads_major(cache.values, slot, v_BKD, write_B),
        put_rows(cache.positions, slot, pos_B, write_B),
        put_rows(cache.segments, slot, jnp.zeros_like(pos_B) if seg_B is None else seg_B, write_B),
    )


def put_rows(buffer_BS: jax.Array, index_B: jax.Array, new_B: jax.Array, mask_B: jax.Array) -> jax.Array:
    """buffer[b, index[b], ...] = new[b] where mask[b] (one position per row)."""
    rows = jnp.arange(buffer_BS.shape[0])
    mask = mask_B.reshape(mask_B.shape + (1,) * (buffer_BS.ndim - 2))
    return buffer_BS.at[rows, index_B].set(jnp.where(mask, new_B.astype(buffer_BS.dtype), buffer_BS[rows, index_B]))


def put_heads_major(buffer_BKSD: jax.Array, index_B: jax.Array, new_BKD: jax.Array, mask_B: jax.Array) -> jax.Array:
    """buffer[b, :, index[b]] = new[b] where mask[b]: one slot per row of a heads-major buffer."""
    rows = jnp.arange(buffer_BKSD.shape[0])
    old = buffer_BKSD[rows, :, index_B]  # [B, K, D]
    return buffer_BKSD.at[rows, :, index_B].set(jnp.where(mask_B[:, None, None], new_BKD.astype(old.dtype), old))


def fill(
    cache: KVCache, k_BTKD: jax.Array, v_BTKD: jax.Array, seg_BT: jax.Array | None, valid_BT: jax.Array
) -> KVCache:
    """Stores the keys of positions 0..T-1 (a prefill) where ``valid_BT``; the latest position of a slot wins.

    Keys come as the projections give them ([B, T, K, D]). With a ring smaller than T several
    positions share a slot; a scatter-max picks, per slot, the largest valid position, so the
    ring ends up holding exactly the last S valid keys.
    """
    b, t = valid_BT.shape
    slots = cache.keys.shape[2]
    rows = jnp.arange(b)[:, None]
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    winner = (
        jnp.full((b, slots), EMPTY, jnp.int32).at[rows, positions % slots].max(jnp.where(valid_BT, positions, EMPTY))
    )
    found = winner >= 0
    source = jnp.maximum(winner, 0)

    def take(new_BTKD, old):
        picked = jnp.take_along_axis(heads_major(new_BTKD), source[:, None, :, None], axis=2)
        return jnp.where(found[:, None, :, None], picked.astype(old.dtype), old)

    segments = jnp.zeros((b, t), jnp.int32) if seg_BT is None else seg_BT
    return KVCache(
        take(k_BTKD, cache.keys),
        take(v_BTKD, cache.values),
        jnp.where(found, winner, cache.positions),
        jnp.where(found, jnp.take_along_axis(segments, source, axis=1), cache.segments),
    )


def attend(q_BTHD: jax.Array, k_BKSD: jax.Array, v_BKSD: jax.Array, mask_BTS: jax.Array) -> jax.Array:
    """Softmax attention in float32 with grouped KV heads, scale 1/sqrt(D); a query with no key gives 0.

    Keys and values are heads-major [B, K, S, D] (cached buffers); the same arithmetic as
    `bltjax.kernels.dense.attend`, which takes the projections' [B, S, K, D] layout.
    """
    b, t, h, d = q_BTHD.shape
    kv_heads = k_BKSD.shape[1]
    q = q_BTHD.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k_BKSD, preferred_element_type=jnp.float32)
    mask = mask_BTS[:, None, None, :, :]
    scores = jnp.where(mask, scores.astype(jnp.float32) / math.sqrt(d), MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask.any(axis=-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bkgts,bksd->btkgd", probs.astype(v_BKSD.dtype), v_BKSD)
    return out.reshape(b, t, h, d)


def heads_major(x_BSKD: jax.Array) -> jax.Array:
    """[B, S, K, D] (what projections give) -> [B, K, S, D] (what caches and `attend` take)."""
    return jnp.swapaxes(x_BSKD, 1, 2)


def visible(cache: KVCache, pos_B: jax.Array, seg_B: jax.Array | None, window: int | None) -> jax.Array:
    """[B, S]: which slots the query at ``pos_B`` may read (the mask of docs/architecture.md §5.4)."""
    kpos = cache.positions
    query = pos_B[:, None]
    mask = (kpos >= 0) & (kpos <= query)
    if window is not None:
        mask &= query - kpos < window
    if seg_B is not None:
        mask &= cache.segments == seg_B[:, None]
    return mask


def attend_cached(
    q_BHD: jax.Array, cache: KVCache, pos_B: jax.Array, seg_B: jax.Array | None, window: int | None
) -> jax.Array:
    """One query per row against its cache (which already holds the query's own key): [B, H, D]."""
    mask = visible(cache, pos_B, seg_B, window)
    return attend(q_BHD[:, None], cache.keys, cache.values, mask[:, None, :])[:, 0]


def attend_cached_and_new(
    q_BHD: jax.Array,
    cache: KVCache,
    k_BKD: jax.Array,
    v_BKD: jax.Array,
    pos_B: jax.Array,
    seg_B: jax.Array | None,
    window: int | None,
) -> jax.Array:
    """Like writing (k, v) at ``pos_B`` and then `attend_cached`, without touching the cache: [B, H, D].

    The slot the new key would take holds nothing visible (an empty slot, or in a ring the key
    of pos - S, which is outside the window), so this is the same softmax over the same keys.
    Used where the write must wait (inside `lax.cond`, whose branches should not pass large
    buffers through: XLA would copy them).
    """
    b, h, d = q_BHD.shape
    kv_heads = k_BKD.shape[1]
    q = q_BHD.reshape(b, kv_heads, h // kv_heads, d)
    mask = visible(cache, pos_B, seg_B, window)[:, None, None, :]
    cached = jnp.einsum("bkgd,bksd->bkgs", q, cache.keys, preferred_element_type=jnp.float32)
    cached = jnp.where(mask, cached.astype(jnp.float32) / math.sqrt(d), MASK_VALUE)
    own = jnp.einsum("bkgd,bkd->bkg", q, k_BKD, preferred_element_type=jnp.float32)[..., None] / math.sqrt(d)
    probs = jax.nn.softmax(jnp.concatenate([cached, own.astype(jnp.float32)], axis=-1), axis=-1)
    out = jnp.einsum("bkgs,bksd->bkgd", probs[..., :-1].astype(v_BKD.dtype), cache.values)
    out = out + probs[..., -1:].astype(v_BKD.dtype) * v_BKD[:, :, None, :]
    return out.reshape(b, h, d)


def attend_used_prefix(
    q_BHD: jax.Array,
    keys_BKSD: jax.Array,
    values_BKSD: jax.Array,
    allowed,
    used: jax.Array,
    chunk: int,
    extra: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """One query per row over the first ``used`` slots of a buffer, ``chunk`` slots at a time: [B, H, D].

    ``allowed(slot_index [C]) -> [B, C]`` is the mask; slots at or after ``used`` never count
    (chunks after the one holding slot used - 1 are not even read). The loop runs
    ceil(used / chunk) times (a traced count) with an online softmax, so the cost follows what
    has been written (closed patches) instead of the buffer's static size.
    ``extra`` = (k [B, K, D], v [B, K, D]) adds one more key every query sees (its own, not yet
    written). S must be a multiple of ``chunk``; every row must see at least one key.
    """
    b, h, d = q_BHD.shape
    kv_heads, s = keys_BKSD.shape[1:3]
    groups = h // kv_heads
    q = q_BHD.reshape(b, kv_heads, groups, d).astype(jnp.float32)

    def body(c, carry):
        peak, total, acc = carry
        start = c * chunk
        keys = jax.lax.dynamic_slice_in_dim(keys_BKSD, start, chunk, axis=2)
        values = jax.lax.dynamic_slice_in_dim(values_BKSD, start, chunk, axis=2)
        slot = start + jnp.arange(chunk)
        mask = (allowed(slot) & (slot < used)[None, :])[:, None, None, :]
        scores = jnp.einsum("bkgd,bksd->bkgs", q, keys, preferred_element_type=jnp.float32) / math.sqrt(d)
        scores = jnp.where(mask, scores, MASK_VALUE)
        new_peak = jnp.maximum(peak, scores.max(axis=-1))
        weights = jnp.where(mask, jnp.exp(scores - new_peak[..., None]), 0.0)
        rescale = jnp.exp(peak - new_peak)
        total = total * rescale + weights.sum(axis=-1)
        acc = acc * rescale[..., None] + jnp.einsum("bkgs,bksd->bkgd", weights, values.astype(jnp.float32))
        return new_peak, total, acc

    if extra is None:
        start = (
            jnp.full((b, kv_heads, groups), MASK_VALUE, jnp.float32),
            jnp.zeros((b, kv_heads, groups), jnp.float32),
            jnp.zeros((b, kv_heads, groups, d), jnp.float32),
        )
    else:
        k_new, v_new = extra
        own = jnp.einsum("bkgd,bkd->bkg", q, k_new.astype(jnp.float32)) / math.sqrt(d)
        values_new = jnp.broadcast_to(v_new.astype(jnp.float32)[:, :, None, :], (b, kv_heads, groups, d))
        start = (own, jnp.ones((b, kv_heads, groups), jnp.float32), values_new)
    n_chunks = jnp.minimum((used + chunk - 1) // chunk, s // chunk)
    _, total, acc = jax.lax.fori_loop(0, n_chunks, body, start)
    out = acc / jnp.where(total > 0, total, 1.0)[..., None]
    return out.reshape(b, h, d).astype(values_BKSD.dtype)
