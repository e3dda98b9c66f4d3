"""The layers every BLT stack is made of, top to bottom: Linear, RMSNorm, RoPE, SelfAttention,
CrossAttention, SwiGLU, TransformerBlock, Transformer (docs/architecture.md §5, §6.3).

Attention itself is computed by `bltjax.kernels` (chosen by ``model.attention``); how much the
backward pass recomputes by `bltjax.models.remat` (``model.remat``). The same modules decode:
`SelfAttention`, `TransformerBlock` and `Transformer` have ``prefill`` / ``step`` /
``step_deferred`` methods over explicit KV caches (`bltjax.kernels.kv_cache`, `empty_kv_caches`),
and `CrossAttention` computes its keys once (``keys_values``) and attends to cached ones
(``attend_cached``). Caches are arguments and results rather than a mutable Flax collection
because BLT's stacks advance at different rates (docs/design.md, "One model for decoding"). Shape suffixes in names
follow nanodo: B batch, T queries, S keys, H heads, K kv heads, D head dim, E model width.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from bltjax import kernels
from bltjax.kernels import kv_cache
from bltjax.kernels.contract import contract
from bltjax.kernels.kv_cache import KVCache
from bltjax.models import scan
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
    window (docs/architecture.md §5.4); `kernels.self_attention` computes it. Besides the
    training call, three decoding methods run the same projections against a KV cache
    (`bltjax.kernels.kv_cache`): `prefill` (positions 0..T-1, fills the cache), `step` (one
    position per row, written then attended) and `step_deferred` (one position, not written).
    """

    config: TransformerConfig
    std: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention: str = "auto"  # the `bltjax.kernels` implementation

    def setup(self) -> None:
        cfg = self.config
        e, h, k, d = cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.resolved_head_dim
        dense = dict(std=self.std, dtype=self.dtype, param_dtype=self.param_dtype)
        self.query = Linear((e,), (h, d), ("embed", "heads", "head_dim"), **dense)
        self.key = Linear((e,), (k, d), ("embed", "kv_heads", "head_dim"), **dense)
        self.value = Linear((e,), (k, d), ("embed", "kv_heads", "head_dim"), **dense)
        self.out = Linear((h, d), (e,), ("heads", "head_dim", "embed"), **dense)

    def _project(self, x_BTE: jax.Array, positions_BT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q [B, T, H, D] and k [B, T, K, D] with RoPE at ``positions_BT``, and v [B, T, K, D]."""
        theta = self.config.rope_theta
        q = apply_rope(self.query(x_BTE), positions_BT, theta)
        return q, apply_rope(self.key(x_BTE), positions_BT, theta), self.value(x_BTE)

    def __call__(self, x_BTE: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array | None = None) -> jax.Array:
        q, key, value = self._project(x_BTE, positions_BT)
        # Under "block" remat the first run records what the kernel can replay and the
        # recomputation in the backward pass replays it (`bltjax.models.remat`).
        replay = self.get_variable(ATTENTION_RECORD, "out_lse")
        out, record = kernels.self_attention(
            q,
            key,
            value,
            positions_BT,
            segment_ids_BT,
            self.config.window,
            implementation=self.attention,
            replay=replay,
        )
        if record is not None and replay is None and self.is_mutable_collection(ATTENTION_RECORD):
            if not self.is_initializing():
                self.put_variable(ATTENTION_RECORD, "out_lse", record)
        return self.out(out)

    def prefill(
        self,
        x_BTE: jax.Array,
        positions_BT: jax.Array,
        segment_ids_BT: jax.Array | None,
        cache: KVCache,
        valid_BT: jax.Array,
    ) -> tuple[jax.Array, KVCache]:
        """The training call over positions 0..T-1 that also stores the ``valid_BT`` keys in ``cache``."""
        q, key, value = self._project(x_BTE, positions_BT)
        out, _ = kernels.self_attention(
            q, key, value, positions_BT, segment_ids_BT, self.config.window, implementation=self.attention
        )
        return self.out(out), kv_cache.fill(cache, key, value, segment_ids_BT, valid_BT)

    def _project_one(self, x_BE: jax.Array, positions_B: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`_project` of one position per row: q [B, H, D], k and v [B, K, D]."""
        q, key, value = self._project(x_BE[:, None], positions_B[:, None])
        return q[:, 0], key[:, 0], value[:, 0]

    def step(
        self,
        x_BE: jax.Array,
        positions_B: jax.Array,
        segment_ids_B: jax.Array | None,
        cache: KVCache,
        write_B: jax.Array,
    ) -> tuple[jax.Array, KVCache]:
        """One position per row: writes its key (rows with ``write_B`` False keep their cache), attends."""
        q, key, value = self._project_one(x_BE, positions_B)
        cache = kv_cache.write_step(cache, key, value, positions_B, segment_ids_B, write_B)
        out = kernels.cached_self_attention(q, cache, positions_B, segment_ids_B, self.config.window)
        return self.out(out), cache

    def step_deferred(
        self,
        x_BE: jax.Array,
        positions_B: jax.Array,
        segment_ids_B: jax.Array | None,
        cache: KVCache,
        prefix_chunk: int | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """`step` that leaves ``cache`` alone: (output [B, E], (key [B, K, D], value)) to write later.

        ``prefix_chunk``: see `kernels.cached_self_attention`.
        """
        q, key, value = self._project_one(x_BE, positions_B)
        out = kernels.cached_self_attention(
            q, cache, positions_B, segment_ids_B, self.config.window, new_kv=(key, value), prefix_chunk=prefix_chunk
        )
        return self.out(out), (key, value)


class CrossAttention(nn.Module):
    """CA(Q, KV) = Q + Wo MHA(Wq norm_q(Q), Wk norm_kv(KV), Wv norm_kv(KV)); no RoPE (§6.3).

    The released checkpoints' double residual (2Q + o) is added by the caller,
    `cross_attention_residual`.
    Which keys a query sees is given by exactly one of:
      * ``gather_index_BTR``: the R keys each query names (the decoder's k slots of one patch, §8.3);
      * ``key_patch_BS``: queries come in groups of ``slots_per_patch`` per patch and each group
        sees the keys of its own patch (the encoder's own-patch window, §6.3);
      * ``mask_BTS``: a dense mask over all S keys (wider cross-attention windows).

    Decoding computes the keys once (`keys_values`), caches them heads-major, and attends to
    them with `attend_cached`; the training call is `attend(queries, *keys_values(keys))`.
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

    def setup(self) -> None:
        e, h, kv_heads = self.dim, self.n_heads, self.n_kv_heads or self.n_heads
        d = e // h
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.query_norm = RMSNorm(self.norm_eps, **kw)
        self.kv_norm = RMSNorm(self.norm_eps, **kw)
        self.query = Linear((e,), (h, d), ("embed", "heads", "head_dim"), self.std, **kw)
        self.key = Linear((e,), (kv_heads, d), ("embed", "kv_heads", "head_dim"), self.std, **kw)
        self.value = Linear((e,), (kv_heads, d), ("embed", "kv_heads", "head_dim"), self.std, **kw)
        self.out = Linear((h, d), (e,), ("heads", "head_dim", "embed"), self.std, **kw)

    def __call__(
        self,
        queries_BTE: jax.Array,
        keys_BSE: jax.Array,
        mask_BTS: jax.Array | None = None,
        gather_index_BTR: jax.Array | None = None,
        key_patch_BS: jax.Array | None = None,
    ) -> jax.Array:
        k, v = self.keys_values(keys_BSE)
        return self.attend(queries_BTE, k, v, mask_BTS, gather_index_BTR, key_patch_BS)

    def keys_values(self, keys_SE: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values [..., S, K, D] of the key side: norm_kv, then Wk and Wv."""
        kv = self.kv_norm(keys_SE)
        return self.key(kv), self.value(kv)

    def attend(
        self,
        queries_BTE: jax.Array,
        k_BSKD: jax.Array,
        v_BSKD: jax.Array,
        mask_BTS: jax.Array | None = None,
        gather_index_BTR: jax.Array | None = None,
        key_patch_BS: jax.Array | None = None,
    ) -> jax.Array:
        """The cross-attention of ``queries_BTE`` over keys / values from `keys_values`."""
        out = kernels.cross_attention(
            self.query(self.query_norm(queries_BTE)),
            k_BSKD,
            v_BSKD,
            gather_index=gather_index_BTR,
            key_patch=key_patch_BS,
            slots_per_patch=self.slots_per_patch,
            mask=mask_BTS,
            implementation=self.attention,
        )
        return queries_BTE + self.out(out)

    def attend_cached(
        self,
        queries_BTE: jax.Array,
        k_BKSD: jax.Array,
        v_BKSD: jax.Array,
        mask_BTS: jax.Array | None = None,
        **prefix,
    ) -> jax.Array:
        """`attend` over heads-major cached keys / values [B, K, S, D] (`kernels.cached_cross_attention`).

        ``mask_BTS`` or, for one query per row, ``allowed=, used=, chunk=`` (the written prefix).
        """
        q = self.query(self.query_norm(queries_BTE))
        out = kernels.cached_cross_attention(q, k_BKSD, v_BKSD, mask=mask_BTS, **prefix)
        return queries_BTE + self.out(out)


def cross_attention_residual(x: jax.Array, attended: jax.Array, double: bool) -> jax.Array:
    """The residual stream after a cross-attention whose output is ``attended`` = CA(x) = x + o.

    ``double``: x + CA(x) = 2x + o, the residual the released checkpoints were trained with
    (docs/architecture.md §6.3, ``model.double_cross_attn_residual``). It is added here, outside
    `CrossAttention`, so that under "block" remat only the attention is recomputed: inside the
    recomputation XLA:CPU fused the extra sum's backward into many more passes over the byte
    states (docs/design.md, "The cross-attention residual").
    """
    return x + attended if double else attended


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
    """Pre-norm block: h = x + Attn(norm(x)); out = h + FFN(norm(h)) (docs/architecture.md §5.1).

    `prefill`, `step` and `step_deferred` are the same block around the decoding methods of
    `SelfAttention`; ``implementation`` names the `bltjax.kernels` attention implementation.
    """

    config: TransformerConfig
    layer_index: int = 0
    init_std_factor: str = "disabled"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    implementation: str = "auto"

    def setup(self) -> None:
        cfg = self.config
        f = depth_factor(self.init_std_factor, self.layer_index, cfg.n_layers, cfg.dim)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.attention_norm = RMSNorm(cfg.norm_eps, **kw)
        self.attention = SelfAttention(cfg, cfg.dim**-0.5 / f, attention=self.implementation, **kw)
        self.ffn_norm = RMSNorm(cfg.norm_eps, **kw)
        self.ffn = SwiGLU(cfg.dim, cfg.hidden_dim, cfg.dim**-0.5 / f, cfg.hidden_dim**-0.5 / f, **kw)

    def _feed_forward(self, h: jax.Array) -> jax.Array:
        return h + self.ffn(self.ffn_norm(h))

    def __call__(self, x_BTE: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array | None = None) -> jax.Array:
        return self._feed_forward(x_BTE + self.attention(self.attention_norm(x_BTE), positions_BT, segment_ids_BT))

    def prefill(self, x_BTE, positions_BT, segment_ids_BT, cache: KVCache, valid_BT) -> tuple[jax.Array, KVCache]:
        """See `SelfAttention.prefill`."""
        attended, cache = self.attention.prefill(
            self.attention_norm(x_BTE), positions_BT, segment_ids_BT, cache, valid_BT
        )
        return self._feed_forward(x_BTE + attended), cache

    def step(self, x_BE, positions_B, segment_ids_B, cache: KVCache, write_B) -> tuple[jax.Array, KVCache]:
        """See `SelfAttention.step`."""
        attended, cache = self.attention.step(self.attention_norm(x_BE), positions_B, segment_ids_B, cache, write_B)
        return self._feed_forward(x_BE + attended), cache

    def step_deferred(self, x_BE, positions_B, segment_ids_B, cache: KVCache, prefix_chunk: int | None = None):
        """See `SelfAttention.step_deferred`: (output [B, E], (key, value))."""
        normed = self.attention_norm(x_BE)
        attended, new_kv = self.attention.step_deferred(normed, positions_B, segment_ids_B, cache, prefix_chunk)
        return self._feed_forward(x_BE + attended), new_kv


class Transformer(nn.Module):
    """A stack of `config.n_layers` blocks sharing one mask rule (no final norm).

    ``remat`` names the rematerialisation policy the blocks run under (`bltjax.models.remat`).
    With ``scan`` the blocks' parameters are one stacked ``layers`` sub-tree run by one
    `lax.scan` (`bltjax.models.scan`); otherwise ``layers_0 .. layers_{n-1}``, unrolled.
    Decoding: `prefill`, `step`, `step_deferred` take and return one KV cache per layer
    (`empty_kv_caches`) in both layouts.
    """

    config: TransformerConfig
    init_std_factor: str = "disabled"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: str = "none"
    attention: str = "auto"
    scan: bool = False

    def setup(self) -> None:
        if self.scan:
            self.stacked = stacked_blocks(
                self, self.config, self.init_std_factor, self.dtype, self.param_dtype, self.attention
            )
            return
        block = rematerialise(TransformerBlock, self.remat)
        self.layers = [
            block(self.config, i, self.init_std_factor, self.dtype, self.param_dtype, implementation=self.attention)
            for i in range(self.config.n_layers)
        ]

    def block(self, index: int) -> TransformerBlock:
        """Layer ``index`` as an unbound module, to apply to its slice of the stacked parameters."""
        return unbound_block(self.config, index, self.init_std_factor, self.dtype, self.param_dtype, self.attention)

    def __call__(self, x_BTE: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array | None = None) -> jax.Array:
        if self.scan:
            block = self.block(0)

            def body(x, params):
                return block.apply({"params": params}, x, positions_BT, segment_ids_BT)

            return scan.scan_stacked(body, x_BTE, self.stacked, self.remat)
        for layer in self.layers:
            x_BTE = layer(x_BTE, positions_BT, segment_ids_BT)
        return x_BTE

    def _decode(self, index: int, method: str, *args):
        """Layer ``index``'s decoding ``method``; a scanned stack applies its slice of the parameters."""
        if self.scan:
            params = scan.layer_slice(self.stacked, index)
            return self.block(index).apply({"params": params}, *args, method=method)
        return getattr(self.layers[index], method)(*args)

    def prefill(self, x_BTE, positions_BT, segment_ids_BT, caches: tuple[KVCache, ...], valid_BT):
        """Positions 0..T-1 of every row; the ``valid_BT`` keys fill ``caches``: (x, caches)."""
        filled = []
        for index, cache in enumerate(self._caches(caches)):
            x_BTE, cache = self._decode(index, "prefill", x_BTE, positions_BT, segment_ids_BT, cache, valid_BT)
            filled.append(cache)
        return x_BTE, tuple(filled)

    def step(self, x_BE, positions_B, segment_ids_B, caches: tuple[KVCache, ...], write_B):
        """One position per row through every layer's cache: (x [B, E], caches)."""
        updated = []
        for index, cache in enumerate(self._caches(caches)):
            x_BE, cache = self._decode(index, "step", x_BE, positions_B, segment_ids_B, cache, write_B)
            updated.append(cache)
        return x_BE, tuple(updated)

    def step_deferred(self, x_BE, positions_B, segment_ids_B, caches: tuple[KVCache, ...], prefix_chunk=None):
        """`step` without writing: (x [B, E], per layer (key [B, K, D], value)) for `kv_cache.write_step`."""
        new_kv = []
        for index, cache in enumerate(self._caches(caches)):
            x_BE, kv = self._decode(index, "step_deferred", x_BE, positions_B, segment_ids_B, cache, prefix_chunk)
            new_kv.append(kv)
        return x_BE, tuple(new_kv)

    def _caches(self, caches: tuple[KVCache, ...]) -> tuple[KVCache, ...]:
        if len(caches) != self.config.n_layers:
            raise ValueError(f"caches: expected one per layer ({self.config.n_layers}), got {len(caches)}")
        return caches


def unbound_block(
    config: TransformerConfig,
    index: int,
    init_std_factor: str,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
    attention: str,
) -> TransformerBlock:
    """Block ``index`` of a stack as an unbound module (``parent=None``), applied to parameters explicitly."""
    return TransformerBlock(config, index, init_std_factor, dtype, param_dtype, implementation=attention, parent=None)


def stacked_blocks(
    module: nn.Module,
    config: TransformerConfig,
    init_std_factor: str,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
    attention: str,
) -> dict:
    """Declares ``module``'s ``layers`` sub-tree: its blocks' parameters, stacked (`scan.stacked_parameters`)."""
    n = config.n_layers
    return scan.stacked_parameters(
        module,
        "layers",
        [unbound_block(config, i, init_std_factor, dtype, param_dtype, attention) for i in range(n)],
        [depth_factor(init_std_factor, i, n, config.dim) for i in range(n)],
        lambda: block_example_args(config, dtype),
    )


def block_example_args(config: TransformerConfig, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """The smallest inputs a block initialises on: x [1, 1, E] and positions [1, 1]."""
    return jnp.zeros((1, 1, config.dim), dtype), jnp.zeros((1, 1), jnp.int32)


def empty_kv_caches(config: TransformerConfig, batch: int, max_positions: int, dtype: jnp.dtype) -> tuple[KVCache, ...]:
    """One empty cache per layer of a `Transformer` of ``config``: a ring of its window, or full."""
    slots = kv_cache.cache_slots(config.window, max_positions)
    shape = (batch, slots, config.kv_heads, config.resolved_head_dim)
    return tuple(kv_cache.empty_cache(*shape, dtype) for _ in range(config.n_layers))


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
