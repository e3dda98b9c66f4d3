"""Building blocks shared by every BLT stack: RMSNorm, RoPE, attention, SwiGLU, blocks (spec §5).

Shape suffixes in names follow nanodo: B batch, T queries, S keys, H heads, K kv heads,
D head dim, E model width, F FFN width.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from bltjax.models.configs import REMAT_MODES, TransformerConfig

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
    return _visible(positions_BT[:, :, None], positions_BT[:, None, :], segment_ids_BT, segment_ids_BT, window)


def _visible(q_pos, k_pos, q_seg, k_seg, window: int | None) -> jax.Array:
    """The mask rule of spec §5.4 on broadcastable query/key positions and segments."""
    mask = k_pos <= q_pos
    if window is not None:
        mask &= q_pos - k_pos < window
    if q_seg is not None:
        mask &= q_seg[..., :, None] == k_seg[..., None, :]
    return mask


def eos_segment_ids(is_end_BT: jax.Array) -> jax.Array:
    """Segment index of each element: a segment ends at (and includes) each marked element."""
    ends = is_end_BT.astype(jnp.int32)
    return jnp.cumsum(ends, axis=-1) - ends


def _no_expand(x_BSKD: jax.Array) -> jax.Array:
    """[B, S, K, D] -> [B, 1, S, K, D]: the dense path is the blockwise one with a single block."""
    return x_BSKD[:, None]


def _attention_forward(q, k, v, mask, expand, scale):
    """Masked softmax attention over blocks; returns (out, log-sum-exp) with f32 statistics.

    q [B, n, Q, K, G, D] (n blocks of Q queries, K kv heads, G queries per kv head),
    k / v [B, S', K, D] expanded by ``expand`` to [B, n, S, K, D], mask [B, n, Q, S].
    """
    keys, values = expand(k), expand(v)
    scores = jnp.einsum("bnqkgd,bnskd->bnkgqs", q, keys, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, :, None, None], scores, MASK_VALUE)
    peak = jnp.max(scores, axis=-1)  # [B, n, K, G, Q]
    # Masked keys give exp(MASK_VALUE - peak) = 0 whenever the row has a visible key.
    weights = jnp.exp(scores - peak[..., None])
    total = jnp.sum(weights, axis=-1)
    out = jnp.einsum("bnkgqs,bnskd->bnqkgd", weights.astype(values.dtype), values, preferred_element_type=jnp.float32)
    # A query without any visible key (its peak is MASK_VALUE) gets 0, and an infinite
    # log-sum-exp so that its recomputed probabilities in the backward pass are 0 too.
    has_key = peak > MASK_VALUE / 2
    out = jnp.where(jnp.moveaxis(has_key, -1, 2)[..., None], out / jnp.moveaxis(total, -1, 2)[..., None], 0.0)
    lse = jnp.where(has_key, peak + jnp.log(total), jnp.inf)
    return out.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _softmax_attention(q, k, v, mask, expand, scale):
    """Softmax attention whose backward pass recomputes the scores instead of storing them.

    Autodiff of the plain formula keeps the [queries, keys] scores, probabilities and mask of
    every layer alive until the backward pass (about 200 MB per local layer of the reference
    shape at 4096 bytes). This version keeps only q, k, v, the output and one log-sum-exp per
    query (the flash-attention backward), so activation memory is O(T * D) per layer.
    """
    return _attention_forward(q, k, v, mask, expand, scale)[0]


def _softmax_attention_fwd(q, k, v, mask, expand, scale):
    out, lse = _attention_forward(q, k, v, mask, expand, scale)
    return out, (q, k, v, mask, out, lse)


def _softmax_attention_bwd(expand, scale, residuals, d_out):
    q, k, v, mask, out, lse = residuals
    # Recompute only once d_out exists (see `_after`), one layer at a time.
    q, k, v = (_after(d_out, x) for x in (q, k, v))
    (keys, expand_keys), (values, expand_values) = jax.vjp(expand, k), jax.vjp(expand, v)
    f32 = jnp.float32
    scores = jnp.einsum("bnqkgd,bnskd->bnkgqs", q, keys, preferred_element_type=f32) * scale
    visible = mask[:, :, None, None]
    probs = jnp.where(visible, jnp.exp(scores - lse[..., None]), 0.0)
    d_out32 = d_out.astype(f32)
    d_probs = jnp.einsum("bnqkgd,bnskd->bnkgqs", d_out32, values.astype(f32))
    row_dot = jnp.moveaxis(jnp.sum(d_out32 * out.astype(f32), axis=-1), 2, -1)  # [B, n, K, G, Q]
    d_scores = probs * (d_probs - row_dot[..., None]) * scale
    d_q = jnp.einsum("bnkgqs,bnskd->bnqkgd", d_scores, keys.astype(f32))
    d_keys = jnp.einsum("bnkgqs,bnqkgd->bnskd", d_scores, q.astype(f32))
    d_values = jnp.einsum("bnkgqs,bnqkgd->bnskd", probs, d_out32)
    (d_k,) = expand_keys(d_keys.astype(keys.dtype))
    (d_v,) = expand_values(d_values.astype(values.dtype))
    return d_q.astype(q.dtype), d_k, d_v, None


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def attend(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, mask_BTS: jax.Array) -> jax.Array:
    """Softmax attention in float32 with grouped KV heads; a query with no key returns 0.

    Scores use scale 1/sqrt(D). Grouped-query attention shares each KV head among H/K query
    heads by reshaping the queries, never copying keys.
    """
    b, t, h, d = q_BTHD.shape
    kv_heads = k_BSKD.shape[2]
    q = q_BTHD.reshape(b, 1, t, kv_heads, h // kv_heads, d)
    out = _softmax_attention(q, k_BSKD, v_BSKD, mask_BTS[:, None], _no_expand, 1 / math.sqrt(d))
    return out.reshape(b, t, h, d).astype(v_BSKD.dtype)


def default_block_size(window: int) -> int:
    """Query block of the blockwise path: at most 128 queries (one MXU tile on TPU).

    A block reads (1 + ceil((w - 1) / block)) * block keys per query instead of w: 640 for a
    512 window with blocks of 128 (768 with 256, 1024 with 512); on CPU 128 and 256 measured
    within noise of each other for w = 512, T = 4096.
    """
    return min(window, 128)


def blockwise_pays(t: int, window: int | None, block_size: int | None = None) -> bool:
    """Whether the blockwise path computes fewer scores than the dense [T, T] one."""
    if window is None:
        return False
    block = block_size or default_block_size(window)
    return (1 + -(-(window - 1) // block)) * block < t


def _with_history(x_BT: jax.Array, block: int, n_prev: int, fill) -> jax.Array:
    """[B, T, ...] -> [B, nb, (n_prev + 1) * block, ...]: each block preceded by its n_prev blocks.

    T is padded at the end to nb * block, and n_prev blocks of ``fill`` precede the first block.
    """
    b, t = x_BT.shape[:2]
    nb = -(-t // block)
    pad = [(0, 0), (n_prev * block, nb * block - t)] + [(0, 0)] * (x_BT.ndim - 2)
    padded = jnp.pad(x_BT, pad, constant_values=fill).reshape(b, nb + n_prev, block, *x_BT.shape[2:])
    return jnp.concatenate([padded[:, j : j + nb] for j in range(n_prev + 1)], axis=2)


def blockwise_local_attend(
    q_BTHD: jax.Array,
    k_BTKD: jax.Array,
    v_BTKD: jax.Array,
    positions_BT: jax.Array,
    segment_ids_BT: jax.Array | None,
    window: int,
    block_size: int | None = None,
) -> jax.Array:
    """Sliding-window self-attention computed block-locally: O(T * window) instead of O(T^2).

    Queries are cut into blocks of ``block`` rows; a block reads the keys of its own block and
    of the ceil((window - 1) / block) blocks before it, which hold every key within the window.
    The mask inside is exactly `local_causal_mask`'s, so the result equals `attend` with it,
    provided positions grow by one per element (absolute positions, as `positions_like` gives).
    """
    b, t, h, d = q_BTHD.shape
    kv_heads = k_BTKD.shape[2]
    block = block_size or default_block_size(window)
    n_prev = -(-(window - 1) // block)
    nb = -(-t // block)
    q = jnp.pad(q_BTHD, [(0, 0), (0, nb * block - t), (0, 0), (0, 0)])
    q = q.reshape(b, nb, block, kv_heads, h // kv_heads, d)
    q_pos = jnp.pad(positions_BT, [(0, 0), (0, nb * block - t)]).reshape(b, nb, block)
    k_pos = _with_history(positions_BT, block, n_prev, 0)
    k_valid = _with_history(jnp.ones((b, t), bool), block, n_prev, False)
    q_seg = k_seg = None
    if segment_ids_BT is not None:
        q_seg = jnp.pad(segment_ids_BT, [(0, 0), (0, nb * block - t)]).reshape(b, nb, block)
        k_seg = _with_history(segment_ids_BT, block, n_prev, 0)
    mask = _visible(q_pos[..., :, None], k_pos[..., None, :], q_seg, k_seg, window) & k_valid[..., None, :]
    # Keys and values enter as [B, T, K, D]; each block's key history is built inside the
    # attention (forward and backward), so the (n_prev + 1)-fold copies are never stored.
    expand = functools.partial(_with_history, block=block, n_prev=n_prev, fill=0)
    out = _softmax_attention(q, k_BTKD, v_BTKD, mask, expand, 1 / math.sqrt(d))
    return out.reshape(b, nb * block, h, d)[:, :t].astype(v_BTKD.dtype)


def causal_self_attend(
    q_BTHD: jax.Array,
    k_BTKD: jax.Array,
    v_BTKD: jax.Array,
    positions_BT: jax.Array,
    segment_ids_BT: jax.Array | None,
    window: int | None,
    block_size: int | None = None,
) -> jax.Array:
    """Causal (optionally windowed, document-masked) self-attention: blockwise when it pays.

    Full causal stacks (the latent transformer over patches) and short rows take the dense
    path; a sliding window over a long row takes `blockwise_local_attend`. Both give the same
    values; the mask is built here from positions and segments, never passed in as [B, T, T].
    """
    if blockwise_pays(q_BTHD.shape[1], window, block_size):
        return blockwise_local_attend(q_BTHD, k_BTKD, v_BTKD, positions_BT, segment_ids_BT, window, block_size)
    mask = local_causal_mask(positions_BT, segment_ids_BT, window)
    return attend(q_BTHD, k_BTKD, v_BTKD, mask)


class SelfAttention(nn.Module):
    """Multi-head (or grouped-query) self-attention with RoPE on q and k.

    The mask follows from absolute positions, optional document segment ids and the stack's
    window (spec §5.4); see `causal_self_attend` for how it is computed.
    """

    config: TransformerConfig
    std: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

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
        out = causal_self_attend(q, key, value, positions_BT, segment_ids_BT, cfg.window)
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


def _after(cotangent: jax.Array, x: jax.Array) -> jax.Array:
    """``x`` made data-dependent on ``cotangent`` (adds 0 * one element of it).

    XLA's CPU scheduler is free to run a recomputation as soon as its inputs exist, i.e. at the
    start of the backward pass, which keeps every layer's recomputed activations alive at once
    (this is why `jax.checkpoint` alone does not bound memory there, and an optimization
    barrier does not survive to scheduling). Anchoring the inputs to the incoming gradient
    makes each layer's recomputation wait for the layer above.
    """
    return x + (0.0 * cotangent.reshape(-1)[0]).astype(x.dtype)


def checkpoint_after_cotangent(fn, n_differentiable: int = 2):
    """Rematerialisation of ``fn(*args) -> y`` that recomputes only once dy arrives.

    The first ``n_differentiable`` arguments (parameters, activations) get gradients; the rest
    (positions, segment ids, masks, indices) get none. The forward pass keeps only the
    arguments; the backward pass re-runs ``fn`` under `jax.vjp` on inputs anchored to dy (see
    `_after`).
    """

    @jax.custom_vjp
    def run(*args):
        return fn(*args)

    def forward(*args):
        return fn(*args), args

    def backward(args, d_y):
        inputs = jax.tree.map(functools.partial(_after, d_y), args[:n_differentiable])
        aux = args[n_differentiable:]
        _, vjp = jax.vjp(lambda *inputs: fn(*inputs, *aux), *inputs)
        return (*vjp(d_y), *(None for _ in aux))

    run.defvjp(forward, backward)
    return run


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + Attn(norm(x)); out = h + FFN(norm(h)) (spec §5.1).

    With ``remat`` the block keeps only its input for the backward pass and recomputes its
    attention and FFN activations there (`checkpoint_after_cotangent`), trading about one extra
    forward for activation memory; parameters and values are the same either way.
    """

    config: TransformerConfig
    layer_index: int = 0
    init_std_factor: str = "disabled"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x_BTE: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array | None = None) -> jax.Array:
        if self.remat and not self.is_initializing():
            plain = self.clone(parent=None, remat=False)

            def apply_block(params, x, positions, segment_ids):
                return plain.apply({"params": params}, x, positions, segment_ids)

            rematerialised = checkpoint_after_cotangent(apply_block)
            return rematerialised(self.variables["params"], x_BTE, positions_BT, segment_ids_BT)
        cfg = self.config
        f = depth_factor(self.init_std_factor, self.layer_index, cfg.n_layers, cfg.dim)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        normed = RMSNorm(cfg.norm_eps, name="attention_norm", **kw)(x_BTE)
        h = x_BTE + SelfAttention(cfg, cfg.dim**-0.5 / f, name="attention", **kw)(normed, positions_BT, segment_ids_BT)
        normed = RMSNorm(cfg.norm_eps, name="ffn_norm", **kw)(h)
        ffn = SwiGLU(cfg.dim, cfg.hidden_dim, cfg.dim**-0.5 / f, cfg.hidden_dim**-0.5 / f, name="ffn", **kw)
        return h + ffn(normed)


def block_class(remat: str):
    """The block constructor for a remat mode: `TransformerBlock`, rematerialised for "block"."""
    if remat == "none":
        return TransformerBlock
    if remat == "block":
        return functools.partial(TransformerBlock, remat=True)
    raise ValueError(f"remat: expected one of {REMAT_MODES}, got {remat!r}")


class Transformer(nn.Module):
    """A stack of `config.n_layers` blocks sharing one mask rule (no final norm)."""

    config: TransformerConfig
    init_std_factor: str = "disabled"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, x_BTE: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array | None = None) -> jax.Array:
        block = block_class(self.remat)
        for i in range(self.config.n_layers):
            x_BTE = block(self.config, i, self.init_std_factor, self.dtype, self.param_dtype, name=f"layers_{i}")(
                x_BTE, positions_BT, segment_ids_BT
            )
        return x_BTE


class CrossAttention(nn.Module):
    """CA(Q, KV) = Q + Wo MHA(Wq norm_q(Q), Wk norm_kv(KV), Wv norm_kv(KV)); no RoPE (spec §6.3).

    The caller adds Q once more when `double_cross_attn_residual` is on (the checkpoints' 2Q + o).
    Which keys a query sees is given by exactly one of:
      * ``gather_index_BTR``: the R keys each query names (the decoder's k slots of one patch, §8.3);
      * ``key_patch_BS``: queries come in groups of ``slots_per_patch`` per patch and each group
        sees the keys of its own patch (the encoder's own-patch window, §6.3), in O(S);
      * ``mask_BTS``: a dense mask over all S keys (wider cross-attention windows).
    """

    dim: int
    n_heads: int
    std: float
    norm_eps: float = 1e-5
    n_kv_heads: int | None = None  # None: multi-head
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False  # recompute in the backward pass, as `TransformerBlock` does

    @nn.compact
    def __call__(
        self,
        queries_BTE: jax.Array,
        keys_BSE: jax.Array,
        mask_BTS: jax.Array | None = None,
        gather_index_BTR: jax.Array | None = None,
        key_patch_BS: jax.Array | None = None,
        slots_per_patch: int = 1,
    ) -> jax.Array:
        if self.remat and not self.is_initializing():
            plain = self.clone(parent=None, remat=False)

            def apply_cross(params, queries, keys, mask, gather_index, key_patch):
                return plain.apply({"params": params}, queries, keys, mask, gather_index, key_patch, slots_per_patch)

            return checkpoint_after_cotangent(apply_cross, 3)(
                self.variables["params"], queries_BTE, keys_BSE, mask_BTS, gather_index_BTR, key_patch_BS
            )
        e, h, kv_heads = self.dim, self.n_heads, self.n_kv_heads or self.n_heads
        d = e // h
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = RMSNorm(self.norm_eps, name="query_norm", **kw)(queries_BTE)
        kv = RMSNorm(self.norm_eps, name="kv_norm", **kw)(keys_BSE)
        q = Linear((e,), (h, d), ("embed", "heads", "head_dim"), self.std, name="query", **kw)(q)
        k = Linear((e,), (kv_heads, d), ("embed", "kv_heads", "head_dim"), self.std, name="key", **kw)(kv)
        v = Linear((e,), (kv_heads, d), ("embed", "kv_heads", "head_dim"), self.std, name="value", **kw)(kv)
        if gather_index_BTR is not None:
            out = _attend_gathered(q, k, v, gather_index_BTR)
        elif key_patch_BS is not None:
            out = attend_own_patch(q, k, v, key_patch_BS, slots_per_patch)
        else:
            out = attend(q, k, v, mask_BTS)
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


def attend_own_patch(
    q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, key_patch_BS: jax.Array, slots_per_patch: int
) -> jax.Array:
    """Each patch's R = ``slots_per_patch`` queries attend to the keys of that patch only.

    Query t belongs to patch t // R; key s to patch ``key_patch_BS[s]``. Instead of a [T, S]
    mask this gathers each key's own R queries (scores [B, S, R, H]), takes a softmax per
    patch with segment max / sum (scatters into [B, P, ...]) and scatter-adds the weighted
    values: O(S * R) work. A patch without keys (empty, padding) gets 0, as with `attend`.
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
