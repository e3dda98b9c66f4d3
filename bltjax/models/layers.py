"""Building blocks shared by every BLT stack: RMSNorm, RoPE, attention, SwiGLU, blocks (spec §5).

Shape suffixes in names follow nanodo: B batch, T queries, S keys, H heads, K kv heads,
D head dim, E model width, F FFN width.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from bltjax.models.configs import TransformerConfig

# A finite "minus infinity": rows whose keys are all masked stay finite (then get zeroed),
# so no NaN can reach a weight gradient through 0 * NaN (spec §6.4).
MASK_VALUE = -1e30


def truncated_normal_init(std: float) -> nn.initializers.Initializer:
    """Truncated normal at +-3 sigma (spec §12), the initialiser of every BLT weight."""

    def init(key, shape, dtype=jnp.float32):
        return (jax.random.truncated_normal(key, -3.0, 3.0, shape, jnp.float32) * std).astype(dtype)

    return init


def depth_factor(mode: str, layer: int, n_layers: int, dim: int) -> float:
    """The `init_std_factor` divisor f of spec §12."""
    if mode == "disabled":
        return 1.0
    if mode == "current_depth":
        return math.sqrt(2 * (layer + 1))
    if mode == "global_depth":
        return math.sqrt(2 * (n_layers + 1))
    if mode == "dim_ratio":
        return dim / 4096
    raise ValueError(f"init_std_factor: expected one of disabled/current_depth/global_depth/dim_ratio, got {mode!r}")


class Linear(nn.Module):
    """A bias-free projection contracting the last ``len(in_shape)`` input axes.

    Kernels keep the head axes separate (e.g. E x H x D) so that the sharding rules can name
    them; `convert/hf.py` reshapes from and to PyTorch's [out, in] matrices.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical names of the kernel axes (in..., out...)
    std: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(truncated_normal_init(self.std), self.axes),
            self.in_shape + self.out_shape,
            self.param_dtype,
        )
        n_in = len(self.in_shape)
        return jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=n_in)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g, computed in float32 (spec §5.2)."""

    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


def apply_rope(x_BTHD: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding with the interleaved-pair convention of spec §5.3.

    Dims (2m, 2m+1) rotate together with frequency theta^(-2m/D). Most JAX Llama ports rotate
    the two halves of the head instead; with BLT checkpoints that silently gives wrong logits.
    """
    d = x_BTHD.shape[-1]
    freqs = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)  # [D/2]
    angles = positions_BT[..., None].astype(jnp.float32) * freqs  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x = x_BTHD.astype(jnp.float32).reshape(*x_BTHD.shape[:-1], d // 2, 2)
    even, odd = x[..., 0], x[..., 1]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(x_BTHD.shape).astype(x_BTHD.dtype)


def local_causal_mask(positions_BT: jax.Array, segment_ids_BT: jax.Array | None, window: int | None) -> jax.Array:
    """[B, T, T] mask: causal, same segment, and i - j < window (spec §5.4)."""
    q = positions_BT[:, :, None]
    k = positions_BT[:, None, :]
    mask = k <= q
    if window is not None:
        mask &= q - k < window
    if segment_ids_BT is not None:
        mask &= segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    return mask


def eos_segment_ids(is_end_BT: jax.Array) -> jax.Array:
    """Segment index of each element: a segment ends at (and includes) each marked element."""
    ends = is_end_BT.astype(jnp.int32)
    return jnp.cumsum(ends, axis=-1) - ends


def attend(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, mask_BTS: jax.Array) -> jax.Array:
    """Softmax attention in float32 with grouped KV heads; a query with no key returns 0.

    Scores use scale 1/sqrt(D). Grouped-query attention shares each KV head among H/K query
    heads by reshaping the queries, never copying keys.
    """
    b, t, h, d = q_BTHD.shape
    kv_heads = k_BSKD.shape[2]
    q = q_BTHD.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k_BSKD, preferred_element_type=jnp.float32)
    scores = scores.astype(jnp.float32) / math.sqrt(d)
    mask = mask_BTS[:, None, None, :, :]
    scores = jnp.where(mask, scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask.any(axis=-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v_BSKD.dtype), v_BSKD)
    return out.reshape(b, t, h, d)


class SelfAttention(nn.Module):
    """Multi-head (or grouped-query) self-attention with RoPE on q and k."""

    config: TransformerConfig
    std: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTE: jax.Array, positions_BT: jax.Array, mask_BTT: jax.Array) -> jax.Array:
        cfg = self.config
        e, h, k, d = cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.resolved_head_dim
        dense = dict(std=self.std, dtype=self.dtype, param_dtype=self.param_dtype)
        q = Linear((e,), (h, d), ("embed", "heads", "head_dim"), name="query", **dense)(x_BTE)
        key = Linear((e,), (k, d), ("embed", "kv_heads", "head_dim"), name="key", **dense)(x_BTE)
        value = Linear((e,), (k, d), ("embed", "kv_heads", "head_dim"), name="value", **dense)(x_BTE)
        q = apply_rope(q, positions_BT, cfg.rope_theta)
        key = apply_rope(key, positions_BT, cfg.rope_theta)
        out = attend(q, key, value, mask_BTT)
        return Linear((h, d), (e,), ("heads", "head_dim", "embed"), name="out", **dense)(out)


class SwiGLU(nn.Module):
    """FFN(x) = W2(silu(W1 x) * W3 x) (spec §5.5)."""

    dim: int
    hidden: int
    std_in: float
    std_out: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTE: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gate = Linear((self.dim,), (self.hidden,), ("embed", "mlp"), self.std_in, name="gate", **kw)(x_BTE)
        up = Linear((self.dim,), (self.hidden,), ("embed", "mlp"), self.std_in, name="up", **kw)(x_BTE)
        return Linear((self.hidden,), (self.dim,), ("mlp", "embed"), self.std_out, name="down", **kw)(
            nn.silu(gate) * up
        )


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + Attn(norm(x)); out = h + FFN(norm(h)) (spec §5.1)."""

    config: TransformerConfig
    layer_index: int = 0
    init_std_factor: str = "disabled"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTE: jax.Array, positions_BT: jax.Array, mask_BTT: jax.Array) -> jax.Array:
        cfg = self.config
        f = depth_factor(self.init_std_factor, self.layer_index, cfg.n_layers, cfg.dim)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        normed = RMSNorm(cfg.norm_eps, name="attention_norm", **kw)(x_BTE)
        h = x_BTE + SelfAttention(cfg, cfg.dim**-0.5 / f, name="attention", **kw)(normed, positions_BT, mask_BTT)
        normed = RMSNorm(cfg.norm_eps, name="ffn_norm", **kw)(h)
        ffn = SwiGLU(cfg.dim, cfg.hidden_dim, cfg.dim**-0.5 / f, cfg.hidden_dim**-0.5 / f, name="ffn", **kw)
        return h + ffn(normed)


class Transformer(nn.Module):
    """A stack of `config.n_layers` blocks sharing one mask (no final norm)."""

    config: TransformerConfig
    init_std_factor: str = "disabled"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTE: jax.Array, positions_BT: jax.Array, mask_BTT: jax.Array) -> jax.Array:
        for i in range(self.config.n_layers):
            x_BTE = TransformerBlock(
                self.config, i, self.init_std_factor, self.dtype, self.param_dtype, name=f"layers_{i}"
            )(x_BTE, positions_BT, mask_BTT)
        return x_BTE


class CrossAttention(nn.Module):
    """CA(Q, KV) = Q + Wo MHA(Wq norm_q(Q), Wk norm_kv(KV), Wv norm_kv(KV)); no RoPE (spec §6.3).

    The caller adds Q once more when `double_cross_attn_residual` is on (the checkpoints' 2Q + o).
    With ``gather_index_BTR`` each query attends only to the R keys it names (the decoder's
    k slots of one patch, spec §8.3); otherwise ``mask_BTS`` selects keys among all S.
    """

    dim: int
    n_heads: int
    std: float
    norm_eps: float = 1e-5
    n_kv_heads: int | None = None  # None: multi-head
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        queries_BTE: jax.Array,
        keys_BSE: jax.Array,
        mask_BTS: jax.Array | None = None,
        gather_index_BTR: jax.Array | None = None,
    ) -> jax.Array:
        e, h, kv_heads = self.dim, self.n_heads, self.n_kv_heads or self.n_heads
        d = e // h
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = RMSNorm(self.norm_eps, name="query_norm", **kw)(queries_BTE)
        kv = RMSNorm(self.norm_eps, name="kv_norm", **kw)(keys_BSE)
        q = Linear((e,), (h, d), ("embed", "heads", "head_dim"), self.std, name="query", **kw)(q)
        k = Linear((e,), (kv_heads, d), ("embed", "kv_heads", "head_dim"), self.std, name="key", **kw)(kv)
        v = Linear((e,), (kv_heads, d), ("embed", "kv_heads", "head_dim"), self.std, name="value", **kw)(kv)
        if gather_index_BTR is None:
            out = attend(q, k, v, mask_BTS)
        else:
            out = _attend_gathered(q, k, v, gather_index_BTR)
        o = Linear((h, d), (e,), ("heads", "head_dim", "embed"), self.std, name="out", **kw)(out)
        return queries_BTE + o


def _attend_gathered(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, index_BTR: jax.Array) -> jax.Array:
    """Attention of each query over the R keys named by ``index_BTR`` (a softmax over R)."""
    b, t, r = index_BTR.shape
    h, d = q_BTHD.shape[2:]
    kv_heads = k_BSKD.shape[2]
    flat = index_BTR.reshape(b, t * r)
    k = jnp.take_along_axis(k_BSKD, flat[:, :, None, None], axis=1).reshape(b, t, r, kv_heads, d)
    v = jnp.take_along_axis(v_BSKD, flat[:, :, None, None], axis=1).reshape(b, t, r, kv_heads, d)
    q = q_BTHD.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,btrkd->btkgr", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores.astype(jnp.float32) / math.sqrt(d), axis=-1)
    out = jnp.einsum("btkgr,btrkd->btkgd", probs.astype(v.dtype), v)
    return out.reshape(b, t, h, d)


def dtype_of(name: str) -> jnp.dtype:
    """Maps a config dtype name ("float32", "bfloat16") to a jnp dtype, naming the field on error."""
    try:
        return jnp.dtype(name)
    except TypeError as err:
        raise ValueError(f"dtype: expected 'float32' or 'bfloat16', got {name!r}") from err


def positions_like(tokens_BT: jax.Array) -> jax.Array:
    """Absolute positions 0..T-1 of every row (never reset at document boundaries, spec §5.3)."""
    b, t = tokens_BT.shape[:2]
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
