"""The model's blocks as pure functions over the Linen parameter dicts, for prefill and one step.

Generation reads exactly the parameter trees `BLT.apply` / `ByteLM.apply` read (same names,
same shapes; see `bltjax.models.layers`), but needs what those modules keep internal: each
layer's keys and values, and a way to run one position against a cache. Writing the blocks
again as functions of ``(params, x)`` gives both without touching the training modules; the
arithmetic is the same (RMSNorm in float32, interleaved RoPE via `apply_rope`, float32
softmax), and `tests/test_generate.py` checks the result against `BLT.apply` to 1e-4.

Two ways to run a block:
* ``*_prefill``: T positions 0..T-1 of every row at once, dense causal (windowed,
  document-masked) attention over themselves; returns the keys and values for `cache.fill`
  (heads-major [B, K, T, D], the layout of every cached buffer).
* ``*_step``: one position per row (each row at its own position), attending to its cache
  after writing its own key into it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from bltjax.inference.generation import cache as kv
from bltjax.models.configs import TransformerConfig
from bltjax.models.layers import apply_rope

Params = dict[str, Any]


def linear(x: jax.Array, kernel: jax.Array, dtype: jnp.dtype, n_in: int = 1) -> jax.Array:
    """`layers.Linear`: contracts the last ``n_in`` axes of x with the first ``n_in`` of the kernel."""
    return jnp.tensordot(x.astype(dtype), kernel.astype(dtype), axes=n_in)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype: jnp.dtype) -> jax.Array:
    """`layers.RMSNorm`: y = x / sqrt(mean(x^2) + eps) * g, in float32."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(dtype)


def swiglu(p: Params, x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """`layers.SwiGLU`: W2(silu(W1 x) * W3 x)."""
    hidden = jax.nn.silu(linear(x, p["gate"]["kernel"], dtype)) * linear(x, p["up"]["kernel"], dtype)
    return linear(hidden, p["down"]["kernel"], dtype)


def kv_heads_of(p_attention: Params) -> tuple[int, int]:
    """(kv heads, head dim) of an attention layer, read from its key kernel [E, K, D]."""
    _, k, d = p_attention["key"]["kernel"].shape
    return k, d


def _qkv(p: Params, x_BTE: jax.Array, pos_BT: jax.Array, theta: float, dtype) -> tuple[jax.Array, ...]:
    q = apply_rope(linear(x_BTE, p["query"]["kernel"], dtype), pos_BT, theta)
    k = apply_rope(linear(x_BTE, p["key"]["kernel"], dtype), pos_BT, theta)
    return q, k, linear(x_BTE, p["value"]["kernel"], dtype)


def causal_mask(t: int, segments_BT: jax.Array | None, window: int | None, batch: int) -> jax.Array:
    """[B, T, T] mask of spec §5.4 for positions 0..T-1."""
    pos = jnp.arange(t)
    mask = pos[None, :] <= pos[:, None]
    if window is not None:
        mask &= pos[:, None] - pos[None, :] < window
    mask = jnp.broadcast_to(mask, (batch, t, t))
    if segments_BT is not None:
        mask &= segments_BT[:, :, None] == segments_BT[:, None, :]
    return mask


def block_prefill(
    p: Params, cfg: TransformerConfig, x_BTE: jax.Array, mask_BTT: jax.Array, dtype
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One `TransformerBlock` over positions 0..T-1: (output, keys [B, K, T, D], values)."""
    t = x_BTE.shape[1]
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), x_BTE.shape[:2])
    normed = rms_norm(x_BTE, p["attention_norm"]["scale"], cfg.norm_eps, dtype)
    q, k, v = _qkv(p["attention"], normed, pos, cfg.rope_theta, dtype)
    k, v = kv.heads_major(k), kv.heads_major(v)
    attended = kv.attend(q, k, v, mask_BTT)
    h = x_BTE + linear(attended, p["attention"]["out"]["kernel"], dtype, n_in=2)
    return h + swiglu(p["ffn"], rms_norm(h, p["ffn_norm"]["scale"], cfg.norm_eps, dtype), dtype), k, v


def block_step(
    p: Params,
    cfg: TransformerConfig,
    x_BE: jax.Array,
    pos_B: jax.Array,
    seg_B: jax.Array | None,
    cache: kv.KVCache,
    write_B: jax.Array,
    dtype,
) -> tuple[jax.Array, kv.KVCache]:
    """One `TransformerBlock` at one position per row, through its cache: (output [B, E], cache)."""
    normed = rms_norm(x_BE, p["attention_norm"]["scale"], cfg.norm_eps, dtype)
    q, k, v = _qkv(p["attention"], normed[:, None], pos_B[:, None], cfg.rope_theta, dtype)
    segments = jnp.zeros_like(pos_B) if seg_B is None else seg_B
    cache = kv.write_step(cache, k[:, 0], v[:, 0], pos_B, segments, write_B)
    attended = kv.attend_cached(q[:, 0], cache, pos_B, seg_B, cfg.window)
    h = x_BE + linear(attended, p["attention"]["out"]["kernel"], dtype, n_in=2)
    return h + swiglu(p["ffn"], rms_norm(h, p["ffn_norm"]["scale"], cfg.norm_eps, dtype), dtype), cache


def block_step_deferred(
    p: Params,
    cfg: TransformerConfig,
    x_BE: jax.Array,
    pos_B: jax.Array,
    seg_B: jax.Array | None,
    cache: kv.KVCache,
    dtype,
    chunk: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`block_step` that leaves the cache alone: (output, key [B, K, D], value) to write later.

    With ``chunk`` (a full, unwindowed cache whose size it divides) only the slots below the
    largest query position are read, ``chunk`` at a time (`cache.attend_used_prefix`).
    """
    normed = rms_norm(x_BE, p["attention_norm"]["scale"], cfg.norm_eps, dtype)
    q, k, v = _qkv(p["attention"], normed[:, None], pos_B[:, None], cfg.rope_theta, dtype)
    q, k, v = q[:, 0], k[:, 0], v[:, 0]
    slots = cache.keys.shape[2]
    if chunk is not None and cfg.window is None and slots % chunk == 0:

        def allowed(slot):
            positions = jnp.take(cache.positions, slot, axis=1)
            mask = (positions >= 0) & (positions < pos_B[:, None])
            if seg_B is not None:
                mask &= jnp.take(cache.segments, slot, axis=1) == seg_B[:, None]
            return mask

        attended = kv.attend_used_prefix(q, cache.keys, cache.values, allowed, jnp.max(pos_B), chunk, (k, v))
    else:
        attended = kv.attend_cached_and_new(q, cache, k, v, pos_B, seg_B, cfg.window)
    h = x_BE + linear(attended, p["attention"]["out"]["kernel"], dtype, n_in=2)
    out = h + swiglu(p["ffn"], rms_norm(h, p["ffn_norm"]["scale"], cfg.norm_eps, dtype), dtype)
    return out, k, v


def empty_stack_caches(
    p_stack: Params, cfg: TransformerConfig, batch: int, max_positions: int, dtype
) -> tuple[kv.KVCache, ...]:
    """One empty cache per layer of a `Transformer` stack (ring of its window, or full)."""
    slots = kv.cache_slots(cfg.window, max_positions)
    return tuple(
        kv.empty_cache(batch, slots, *kv_heads_of(p_stack[f"layers_{i}"]["attention"]), dtype)
        for i in range(cfg.n_layers)
    )


def stack_prefill(
    p_stack: Params,
    cfg: TransformerConfig,
    x_BTE: jax.Array,
    segments_BT: jax.Array | None,
    valid_BT: jax.Array,
    caches: tuple[kv.KVCache, ...],
    dtype,
) -> tuple[jax.Array, tuple[kv.KVCache, ...]]:
    """A `Transformer` stack over positions 0..T-1; the valid positions' keys fill the caches."""
    b, t = x_BTE.shape[:2]
    mask = causal_mask(t, segments_BT, cfg.window, b)
    segments = jnp.zeros((b, t), jnp.int32) if segments_BT is None else segments_BT
    filled = []
    for i in range(cfg.n_layers):
        x_BTE, k, v = block_prefill(p_stack[f"layers_{i}"], cfg, x_BTE, mask, dtype)
        filled.append(kv.fill(caches[i], k, v, segments, valid_BT))
    return x_BTE, tuple(filled)


def stack_step(
    p_stack: Params,
    cfg: TransformerConfig,
    x_BE: jax.Array,
    pos_B: jax.Array,
    seg_B: jax.Array | None,
    caches: tuple[kv.KVCache, ...],
    write_B: jax.Array,
    dtype,
) -> tuple[jax.Array, tuple[kv.KVCache, ...]]:
    """A `Transformer` stack at one position per row."""
    updated = []
    for i in range(cfg.n_layers):
        x_BE, layer_cache = block_step(p_stack[f"layers_{i}"], cfg, x_BE, pos_B, seg_B, caches[i], write_B, dtype)
        updated.append(layer_cache)
    return x_BE, tuple(updated)


def cross_kv(p: Params, keys_XE: jax.Array, eps: float, dtype) -> tuple[jax.Array, jax.Array]:
    """Keys and values of a `CrossAttention` from its key side: norm_kv, then Wk / Wv ([..., K, D]).

    Not heads-major: [B, E] gives [B, K, D]; [B, S, E] gives [B, S, K, D] (`cache.heads_major`).
    """
    normed = rms_norm(keys_XE, p["kv_norm"]["scale"], eps, dtype)
    return linear(normed, p["key"]["kernel"], dtype), linear(normed, p["value"]["kernel"], dtype)


def cross_attend(
    p: Params, queries_BTE: jax.Array, k_BKSD: jax.Array, v_BKSD: jax.Array, mask_BTS: jax.Array, eps: float, dtype
) -> jax.Array:
    """`CrossAttention` with precomputed heads-major keys/values: returns Q + Wo MHA(...) (single residual)."""
    q = linear(rms_norm(queries_BTE, p["query_norm"]["scale"], eps, dtype), p["query"]["kernel"], dtype)
    out = kv.attend(q, k_BKSD, v_BKSD, mask_BTS)
    return queries_BTE + linear(out, p["out"]["kernel"], dtype, n_in=2)


def cross_attend_prefix(
    p: Params,
    queries_BE: jax.Array,
    k_BKSD: jax.Array,
    v_BKSD: jax.Array,
    allowed,
    used: jax.Array,
    chunk: int,
    eps: float,
    dtype,
) -> jax.Array:
    """`cross_attend` of one query per row over the written prefix of a slot buffer (`attend_used_prefix`)."""
    q = linear(rms_norm(queries_BE, p["query_norm"]["scale"], eps, dtype), p["query"]["kernel"], dtype)
    out = kv.attend_used_prefix(q, k_BKSD, v_BKSD, allowed, used, chunk)
    return queries_BE + linear(out, p["out"]["kernel"], dtype, n_in=2)
