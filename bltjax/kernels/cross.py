"""Cross-attention over a few known keys per query, without a [T, S] mask.

`attend_gathered`: each query names its R keys (the decoder's k slots of one patch).
`attend_own_patch`: queries come R per patch and see the keys of their own patch (the
encoder's own-patch window). Both equal dense attention with `masks.gathered_mask` /
`masks.own_patch_mask`, and both give 0 to a query without keys.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def attend_gathered(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, index_BTR: jax.Array) -> jax.Array:
    """Attention of each query over the R keys named by ``index_BTR`` (a softmax over R).

    With R this small (the decoder's k = 2 slots) the scores and the weighted sum are
    multiply-and-reduce, not einsums: as dots they were [1, D] x [D, R] products batched over
    every (byte, head), which XLA's CPU backend runs far below its matmul speed.
    """
    b, t, r = index_BTR.shape
    h, d = q_BTHD.shape[2:]
    kv_heads = k_BSKD.shape[2]
    flat = index_BTR.reshape(b, t * r)
    f32 = jnp.float32
    k = jnp.take_along_axis(k_BSKD, flat[:, :, None, None], axis=1).reshape(b, t, r, kv_heads, 1, d).astype(f32)
    v = jnp.take_along_axis(v_BSKD, flat[:, :, None, None], axis=1).reshape(b, t, r, kv_heads, 1, d).astype(f32)
    q = q_BTHD.reshape(b, t, 1, kv_heads, h // kv_heads, d).astype(f32)
    scores = jnp.sum(q * k, axis=-1)  # [B, T, R, K, G]
    probs = jax.nn.softmax(scores / math.sqrt(d), axis=2)
    out = jnp.sum(probs[..., None] * v, axis=2)  # [B, T, K, G, D]
    return out.reshape(b, t, h, d).astype(v_BSKD.dtype)


def attend_own_patch(
    q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, key_patch_BS: jax.Array, slots_per_patch: int
) -> jax.Array:
    """Each patch's R = ``slots_per_patch`` queries attend to the keys of that patch only.

    Query t belongs to patch t // R; key s to patch ``key_patch_BS[s]``. Instead of a [T, S]
    mask this gathers each key's own R queries (scores [B, S, R, H]), takes a softmax per
    patch with segment max / sum (scatters into [B, P, ...]) and scatter-adds the weighted
    values: O(S * R) work. A patch without keys (empty, padding) gets 0.
    """
    b, t, h, d = q_BTHD.shape
    s, kv_heads = k_BSKD.shape[1:3]
    r, g = slots_per_patch, h // kv_heads
    p = t // r
    rows = jnp.arange(b)[:, None]
    q = q_BTHD.reshape(b, p, r, kv_heads, g, d)[rows, key_patch_BS]  # [B, S, R, K, G, D]
    scores = jnp.einsum("bsrkgd,bskd->bsrkg", q, k_BSKD, preferred_element_type=jnp.float32)
    scores = scores.astype(jnp.float32) / math.sqrt(d)
    # The max only shifts the exponent (it cancels in the softmax), so no gradient flows into it.
    peak = (
        jnp.full((b, p, r, kv_heads, g), -jnp.inf, jnp.float32)
        .at[rows, key_patch_BS]
        .max(jax.lax.stop_gradient(scores))
    )
    weights = jnp.exp(scores - peak[rows, key_patch_BS])  # [B, S, R, K, G]
    total = jnp.zeros((b, p, r, kv_heads, g), jnp.float32).at[rows, key_patch_BS].add(weights)
    weighted = weights[..., None] * v_BSKD[:, :, None, :, None, :].astype(jnp.float32)
    summed = jnp.zeros((b, p, r, kv_heads, g, d), jnp.float32).at[rows, key_patch_BS].add(weighted)
    out = summed / jnp.where(total > 0, total, 1.0)[..., None]
    return out.reshape(b, t, h, d).astype(v_BSKD.dtype)
