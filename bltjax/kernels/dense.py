"""Dense masked softmax attention whose backward pass recomputes the scores.

The reference implementation: any [B, T, S] mask, grouped-query heads, float32 statistics.
It is also what `auto` picks for rows of at most one query block.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from bltjax.kernels.masks import MASK_VALUE
from bltjax.kernels.remat import after


def attend(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, mask_BTS: jax.Array) -> jax.Array:
    """Softmax attention in float32 with grouped KV heads; a query with no key returns 0.

    Scores use scale 1/sqrt(D). Grouped-query attention shares each KV head among H/K query
    heads by reshaping the queries, never copying keys.
    """
    b, t, h, d = q_BTHD.shape
    kv_heads = k_BSKD.shape[2]
    q = q_BTHD.reshape(b, t, kv_heads, h // kv_heads, d)
    out = _softmax_attention(q, k_BSKD, v_BSKD, mask_BTS, 1 / math.sqrt(d))
    return out.reshape(b, t, h, d).astype(v_BSKD.dtype)


def _attention_forward(q, k, v, mask, scale):
    """Masked softmax attention; returns (out, log-sum-exp) with float32 statistics.

    q [B, T, K, G, D] (K kv heads, G queries per kv head), k / v [B, S, K, D], mask [B, T, S].
    """
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    peak = jnp.max(scores, axis=-1)  # [B, K, G, T]
    # Masked keys give exp(MASK_VALUE - peak) = 0 whenever the row has a visible key.
    weights = jnp.exp(scores - peak[..., None])
    total = jnp.sum(weights, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    # A query without any visible key (its peak is MASK_VALUE) gets 0, and an infinite
    # log-sum-exp so that its recomputed probabilities in the backward pass are 0 too.
    has_key = peak > MASK_VALUE / 2
    rows = functools.partial(jnp.moveaxis, source=-1, destination=1)  # [B, K, G, T] -> [B, T, K, G]
    out = jnp.where(rows(has_key)[..., None], out / rows(total)[..., None], 0.0)
    lse = jnp.where(has_key, peak + jnp.log(total), jnp.inf)
    return out.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _softmax_attention(q, k, v, mask, scale):
    """Softmax attention that keeps q, k, v, the output and one log-sum-exp per query.

    Autodiff of the plain formula would keep every layer's [queries, keys] scores,
    probabilities and mask alive until the backward pass; recomputing them there (the
    flash-attention backward) keeps activation memory O(T * D) per layer.
    """
    return _attention_forward(q, k, v, mask, scale)[0]


def _softmax_attention_fwd(q, k, v, mask, scale):
    out, lse = _attention_forward(q, k, v, mask, scale)
    return out, (q, k, v, mask, out, lse)


def _softmax_attention_bwd(scale, residuals, d_out):
    q, k, v, mask, out, lse = residuals
    # Recompute only once d_out exists (see `after`), one layer at a time.
    q, k, v = (after(d_out, x.astype(jnp.float32)) for x in (q, k, v))
    d_out32 = d_out.astype(jnp.float32)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k) * scale
    probs = jnp.where(mask[:, None, None], jnp.exp(scores - lse[..., None]), 0.0)
    d_probs = jnp.einsum("btkgd,bskd->bkgts", d_out32, v)
    row_dot = jnp.moveaxis(jnp.sum(d_out32 * out.astype(jnp.float32), axis=-1), 1, -1)  # [B, K, G, T]
    d_scores = probs * (d_probs - row_dot[..., None]) * scale
    d_q = jnp.einsum("bkgts,bskd->btkgd", d_scores, k)
    d_k = jnp.einsum("bkgts,btkgd->bskd", d_scores, q)
    d_v = jnp.einsum("bkgts,btkgd->bskd", probs, d_out32)
    return d_q.astype(residuals[0].dtype), d_k.astype(residuals[1].dtype), d_v.astype(residuals[2].dtype), None


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)
