"""The layers every BLT stack is made of, top to bottom: Linear, RMSNorm, RoPE, SelfAttention,
CrossAttention, SwiGLU, TransformerBlock, Transformer (docs/architecture.md §5, §6.3).

Attention itself is computed by `bltjax.kernels` (chosen by ``model.attention``); how much the
backward pass recomputes by `bltjax.models.remat` (``model.remat``). Shape suffixes in names
follow nanodo: B batch, T queries, S keys, H heads, K kv heads, D head dim, E model width.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from bltjax import kernels
from bltjax.kernels.contract import contract
from bltjax.models.configs import TransformerConfig
from bltjax.models.remat import ATTENTION_RECORD, rematerialise


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
        return contract(x.astype(self.dtype), kernel.astype(self.dtype), len(self.in_shape))


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g, computed in float32 (docs/architecture.md §5.2)."""

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
    """Rotary embedding with the interleaved-pair convention (docs/architecture.md §5.3).

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


class SelfAttention(nn.Module):
    """Multi-head (or grouped-query) causal self-attention with RoPE on q and k.

    The mask follows from absolute positions, optional document segment ids and the stack's
    window (docs/architecture.md §5.4); `kernels.self_attention` computes it.
    """

    config: TransformerConfig
    std: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention: str = "auto"  # the `bltjax.kernels` implementation

    @nn.compact
    def __call__(self, x_BTE: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        e, h, k, d = cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.resolved_head_dim
        dense = dict(std=self.std, dtype=self.dtype, param_dtype=self.param_dtype)
        q = Linear((e,), (h, d), ("embed", "heads", "head_dim"), name="query", **dense)(x_BTE)
        key = Linear((e,), (k, d), ("embed", "kv_heads", "head_dim"), name="key", **dense)(x_BTE)
        value = Linear((e,), (k, d), ("embed", "kv_heads", "head_dim"), name="value", **dense)(x_BTE)
        q = apply_rope(q, positions_BT, cfg.rope_theta)
        key = apply_rope(key, positions_BT, cfg.rope_theta)
        # Under "block" remat the first run records what the kernel can replay and the
        # recomputation in the backward pass replays it (`bltjax.models.remat`).
        replay = self.get_variable(ATTENTION_RECORD, "out_lse")
        out, record = kernels.self_attention(
            q, key, value, positions_BT, segment_ids_BT, cfg.window, implementation=self.attention, replay=replay
        )
        if record is not None and replay is None and self.is_mutable_collection(ATTENTION_RECORD):
            if not self.is_initializing():
                self.put_variable(ATTENTION_RECORD, "out_lse", record)
        return Linear((h, d), (e,), ("heads", "head_dim", "embed"), name="out", **dense)(out)


class CrossAttention(nn.Module):
    """CA(Q, KV) = Q + Wo MHA(Wq norm_q(Q), Wk norm_kv(KV), Wv norm_kv(KV)); no RoPE (§6.3).

    The caller adds Q once more when `double_cross_attn_residual` is on (the checkpoints' 2Q + o).
    Which keys a query sees is given by exactly one of:
      * ``gather_index_BTR``: the R keys each query names (the decoder's k slots of one patch, §8.3);
      * ``key_patch_BS``: queries come in groups of ``slots_per_patch`` per patch and each group
        sees the keys of its own patch (the encoder's own-patch window, §6.3);
      * ``mask_BTS``: a dense mask over all S keys (wider cross-attention windows).
    """

    dim: int
    n_heads: int
    std: float
    norm_eps: float = 1e-5
    n_kv_heads: int | None = None  # None: multi-head
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention: str = "auto"  # the `bltjax.kernels` implementation
    slots_per_patch: int = 1  # queries per patch, with ``key_patch_BS``

    @nn.compact
    def __call__(
        self,
        queries_BTE: jax.Array,
        keys_BSE: jax.Array,
        mask_BTS: jax.Array | None = None,
        gather_index_BTR: jax.Array | None = None,
        key_patch_BS: jax.Array | None = None,
    ) -> jax.Array:
        e, h, kv_heads = self.dim, self.n_heads, self.n_kv_heads or self.n_heads
        d = e // h
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = RMSNorm(self.norm_eps, name="query_norm", **kw)(queries_BTE)
        kv = RMSNorm(self.norm_eps, name="kv_norm", **kw)(keys_BSE)
        q = Linear((e,), (h, d), ("embed", "heads", "head_dim"), self.std, name="query", **kw)(q)
        k = Linear((e,), (kv_heads, d), ("embed", "kv_heads", "head_dim"), self.std, name="key", **kw)(kv)
        v = Linear((e,), (kv_heads, d), ("embed", "kv_heads", "head_dim"), self.std, name="value", **kw)(kv)
        out = kernels.cross_attention(
            q,
            k,
            v,
            gather_index=gather_index_BTR,
            key_patch=key_patch_BS,
            slots_per_patch=self.slots_per_patch,
            mask=mask_BTS,
            implementation=self.attention,
        )
        o = Linear((h, d), (e,), ("heads", "head_dim", "embed"), self.std, name="out", **kw)(out)
        return queries_BTE + o


class SwiGLU(nn.Module):
    """FFN(x) = W2(silu(W1 x) * W3 x) (docs/architecture.md §5.5)."""

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
    """Pre-norm block: h = x + Attn(norm(x)); out = h + FFN(norm(h)) (docs/architecture.md §5.1)."""

    config: TransformerConfig
    layer_index: int = 0
    init_std_factor: str = "disabled"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x_BTE: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        f = depth_factor(self.init_std_factor, self.layer_index, cfg.n_layers, cfg.dim)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attention = SelfAttention(cfg, cfg.dim**-0.5 / f, attention=self.attention, name="attention", **kw)
        h = x_BTE + attention(RMSNorm(cfg.norm_eps, name="attention_norm", **kw)(x_BTE), positions_BT, segment_ids_BT)
        ffn = SwiGLU(cfg.dim, cfg.hidden_dim, cfg.dim**-0.5 / f, cfg.hidden_dim**-0.5 / f, name="ffn", **kw)
        return h + ffn(RMSNorm(cfg.norm_eps, name="ffn_norm", **kw)(h))


class Transformer(nn.Module):
    """A stack of `config.n_layers` blocks sharing one mask rule (no final norm).

    ``remat`` names the rematerialisation policy the blocks run under (`bltjax.models.remat`).
    """

    config: TransformerConfig
    init_std_factor: str = "disabled"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: str = "none"
    attention: str = "auto"

    @nn.compact
    def __call__(self, x_BTE: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array | None = None) -> jax.Array:
        block = rematerialise(TransformerBlock, self.remat)
        for i in range(self.config.n_layers):
            x_BTE = block(
                self.config,
                i,
                self.init_std_factor,
                self.dtype,
                self.param_dtype,
                attention=self.attention,
                name=f"layers_{i}",
            )(x_BTE, positions_BT, segment_ids_BT)
        return x_BTE


# --- small helpers the stacks share ----------------------------------------------------------


def truncated_normal_init(std: float) -> nn.initializers.Initializer:
    """Truncated normal at +-3 sigma (docs/architecture.md §12), the initialiser of every BLT weight."""

    def init(key, shape, dtype=jnp.float32):
        return (jax.random.truncated_normal(key, -3.0, 3.0, shape, jnp.float32) * std).astype(dtype)

    return init


def depth_factor(mode: str, layer: int, n_layers: int, dim: int) -> float:
    """The `init_std_factor` divisor f of docs/architecture.md §12."""
    if mode == "disabled":
        return 1.0
    if mode == "current_depth":
        return math.sqrt(2 * (layer + 1))
    if mode == "global_depth":
        return math.sqrt(2 * (n_layers + 1))
    if mode == "dim_ratio":
        return dim / 4096
    raise ValueError(f"init_std_factor: expected one of disabled/current_depth/global_depth/dim_ratio, got {mode!r}")


def eos_segment_ids(is_end_BT: jax.Array) -> jax.Array:
    """Segment index of each element: a segment ends at (and includes) each marked element."""
    ends = is_end_BT.astype(jnp.int32)
    return jnp.cumsum(ends, axis=-1) - ends


def positions_like(tokens_BT: jax.Array) -> jax.Array:
    """Absolute positions 0..T-1 of every row (never reset at document boundaries, §5.3)."""
    b, t = tokens_BT.shape[:2]
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def dtype_of(name: str) -> jnp.dtype:
    """Maps a config dtype name ("float32", "bfloat16") to a jnp dtype, naming the field on error."""
    try:
        return jnp.dtype(name)
    except TypeError as err:
        raise ValueError(f"dtype: expected 'float32' or 'bfloat16', got {name!r}") from err
