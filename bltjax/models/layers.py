"""Building blocks shared by every BLT stack: RMSNorm, RoPE, attention, SwiGLU, blocks (spec §5).

Shape suffixes in names follow nanodo: B batch, T queries, S keys, H heads, K kv heads,
D head dim, E model width, F FFN width.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from bltjax.models.configs import REMAT_MODES, TransformerConfig

# The Flax collection in which a block's self-attention records its output for block remat.
ATTENTION_RECORD = "attention_record"

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
        return contract(x.astype(self.dtype), kernel.astype(self.dtype), len(self.in_shape))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def contract(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
    """``tensordot(x, kernel, n_in)`` with a hand-written backward pass (same values).

    Autodiff's transpose of the forward dot let XLA's CPU backend fuse the activation's
    derivative into a transposed copy of the output gradient ([T, F] -> [F, T], strided writes)
    for the weight gradient: on a reference SwiGLU (4 x 4096 x 256 -> 768) forward + backward
    took 1130 ms, against 700 ms with these two explicit contractions.
    """
    return jnp.tensordot(x, kernel, axes=n_in)


def _contract_fwd(x, kernel, n_in):
    return jnp.tensordot(x, kernel, axes=n_in), (x, kernel)


def _contract_bwd(n_in, residuals, d_y):
    x, kernel = residuals
    n_batch = x.ndim - n_in
    d_x = jnp.tensordot(d_y, kernel, axes=(tuple(range(n_batch, d_y.ndim)), tuple(range(n_in, kernel.ndim))))
    d_kernel = jnp.tensordot(x, d_y, axes=(tuple(range(n_batch)), tuple(range(n_batch))))
    return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype)


contract.defvjp(_contract_fwd, _contract_bwd)


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
    """Softmax attention whose backward pass recomputes the scores instead of storing them.

    Autodiff of the plain formula keeps the [queries, keys] scores, probabilities and mask of
    every layer alive until the backward pass (about 200 MB per local layer of the reference
    shape at 4096 bytes). This version keeps only q, k, v, the output and one log-sum-exp per
    query (the flash-attention backward), so activation memory is O(T * D) per layer.
    """
    return _attention_forward(q, k, v, mask, scale)[0]


def _softmax_attention_fwd(q, k, v, mask, scale):
    out, lse = _attention_forward(q, k, v, mask, scale)
    return out, (q, k, v, mask, out, lse)


def _softmax_attention_bwd(scale, residuals, d_out):
    q, k, v, mask, out, lse = residuals
    # Recompute only once d_out exists (see `_after`), one layer at a time.
    q, k, v = (_after(d_out, x.astype(jnp.float32)) for x in (q, k, v))
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


def default_block_size(window: int | None) -> int:
    """Query block of the blockwise path: at most 128 queries (one MXU tile on TPU).

    A block reads (1 + ceil((w - 1) / block)) * block keys per query instead of w: 640 for a
    512 window with blocks of 128 (768 with 256, 1024 with 512).
    """
    return 128 if window is None else min(window, 128)


def blockwise_pays(t: int, window: int | None, block_size: int | None = None) -> bool:
    """Whether the row is longer than one query block (else the dense path is the same work).

    Past one block the blockwise path never computes more scores than the dense [T, T] one
    (its key history is clamped to the row) and keeps each block's scores small enough to stay
    in cache: on CPU, one reference decoder layer's attention ran 2.2x faster forward and 1.8x
    forward + backward than with all blocks' scores in one array.
    """
    return t > (block_size or default_block_size(window))


# Query-block groups of a row whose keys span the whole row (full causal): each group is its
# own scan and reads only the key blocks up to its last query block, so about (G + 1) / 2G of
# the [T, T] score square is computed instead of all of it (with G groups; one block per group
# when the row has at most G blocks, the exact causal triangle). Reference latent stack (4 x 912
# patches, 8 blocks of 128, 8 heads), one layer's attention forward + backward on 2 CPU cores:
# 834-863 ms as one scan, 522-636 ms with 4 groups, 493-594 ms with 8. The whole train step was
# the same with 4 or 8 groups within its noise (17.9 / 17.3 s, medians of 5 interleaved steps),
# but compiling 8 left about 300 MiB more of freed heap resident (peak RSS 3.15 against 2.89 GiB).
CAUSAL_GROUPS = 4


class _Blocks(NamedTuple):
    """Static layout of the blockwise path (hashable: a `custom_vjp` non-differentiable argument)."""

    window: int | None  # None: full causal
    block: int  # queries per block
    n_prev: int  # key blocks read before the query's own block, at most
    scale: float
    groups: tuple[tuple[int, int, int], ...]  # (first query block, query blocks, key blocks read per block)

    @classmethod
    def of(cls, t: int, window: int | None, block: int, d: int) -> _Blocks:
        n_blocks = -(-t // block)
        n_prev = n_blocks - 1 if window is None else min(-(-(window - 1) // block), n_blocks - 1)
        if n_prev < n_blocks - 1:  # a sliding window: every block reads the same number of keys
            groups = ((0, n_blocks, n_prev + 1),)
        else:  # each block needs the keys up to its own: group blocks by how many they need
            size = -(-n_blocks // CAUSAL_GROUPS)
            groups = tuple(
                (first, min(size, n_blocks - first), min(first + size, n_blocks)) for first in range(0, n_blocks, size)
            )
        return cls(window, block, n_prev, 1 / math.sqrt(d), groups)

    def key_start(self, i, key_blocks: int):
        """Where query block i's key window (``key_blocks`` blocks ending with its own) starts in
        the key rows padded in front by ``n_prev`` blocks."""
        return (i + 1 - key_blocks + self.n_prev) * self.block


def _head_major_blocks(x_BTND: jax.Array, front: int, t_padded: int) -> jax.Array:
    """[B, T, N, D] -> [B, N, front + T_padded, D]: zeros before (key history) and after (last block)."""
    pad = [(0, 0), (front, t_padded - x_BTND.shape[1]), (0, 0), (0, 0)]
    return jnp.moveaxis(jnp.pad(x_BTND, pad), 2, 1)


def _block_rows(x_BTHD: jax.Array, kv_heads: int, t_padded: int) -> jax.Array:
    """[B, T, H, D] -> [B, K, G, T_padded, D] (queries grouped by their kv head)."""
    b, t, h, d = x_BTHD.shape
    x = jnp.pad(x_BTHD, [(0, 0), (0, t_padded - t), (0, 0), (0, 0)]).reshape(b, t_padded, kv_heads, h // kv_heads, d)
    return jnp.transpose(x, (0, 2, 3, 1, 4))


def _write_rows(rows_BTHD: jax.Array, block_BKGQD: jax.Array, start) -> jax.Array:
    """Writes one block's [B, K, G, Q, D] result into [B, T_padded, H, D] rows at ``start`` (in place).

    Results are written in the row layout as the scan goes, so that no [T, H, D] transpose of
    the whole output follows the loop (XLA duplicated that transpose into each of its users).
    """
    b, k, g, q, d = block_BKGQD.shape
    block = jnp.transpose(block_BKGQD, (0, 3, 1, 2, 4)).reshape(b, q, k * g, d)
    return jax.lax.dynamic_update_slice_in_dim(rows_BTHD, block.astype(rows_BTHD.dtype), start, axis=1)


def _block_masks(positions_BT, segment_ids_BT, layout: _Blocks, t_padded: int):
    """A function (i, key blocks) -> [B, 1, 1, Q, S] mask of query block i over its keys (spec §5.4)."""
    b, t = positions_BT.shape
    front, block = layout.n_prev * layout.block, layout.block
    q_pos = jnp.pad(positions_BT, [(0, 0), (0, t_padded - t)])
    k_pos = jnp.pad(positions_BT, [(0, 0), (front, t_padded - t)])
    k_valid = jnp.pad(jnp.ones((b, t), bool), [(0, 0), (front, t_padded - t)])
    if segment_ids_BT is not None:
        q_seg = jnp.pad(segment_ids_BT, [(0, 0), (0, t_padded - t)])
        k_seg = jnp.pad(segment_ids_BT, [(0, 0), (front, t_padded - t)])

    def mask(i, key_blocks: int):
        keys, key_start = key_blocks * block, layout.key_start(i, key_blocks)

        def rows(x, size, start):
            return jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)

        q_seg_i = k_seg_i = None
        if segment_ids_BT is not None:
            q_seg_i, k_seg_i = rows(q_seg, block, i * block), rows(k_seg, keys, key_start)
        q_pos_i, k_pos_i = rows(q_pos, block, i * block)[:, :, None], rows(k_pos, keys, key_start)[:, None, :]
        k_valid_i = rows(k_valid, keys, key_start)[:, None, :]
        visible = _visible(q_pos_i, k_pos_i, q_seg_i, k_seg_i, layout.window) & k_valid_i
        return visible[:, None, None]

    return mask


def _add_columns(acc_BKDS: jax.Array, new_BKDS: jax.Array, start) -> jax.Array:
    """acc[..., start : start + S] += new, in place inside a scan."""
    window = jax.lax.dynamic_slice_in_dim(acc_BKDS, start, new_BKDS.shape[-1], axis=-1)
    return jax.lax.dynamic_update_slice_in_dim(acc_BKDS, window + new_BKDS, start, axis=-1)


def _scan_block_groups(one_block, init, layout: _Blocks):
    """``one_block(carry, i, key_blocks)`` scanned over every query block, one `lax.scan` per group.

    Returns the final carry and each group's stacked per-block outputs, in block order.
    """
    carry, outputs = init, []
    for first, count, key_blocks in layout.groups:
        body = functools.partial(one_block, key_blocks=key_blocks)
        carry, group_outputs = jax.lax.scan(body, carry, jnp.arange(first, first + count))
        outputs.append(group_outputs)
    return carry, outputs


def _blockwise_forward(q_BTHD, k_BTKD, v_BTKD, positions_BT, segment_ids_BT, layout: _Blocks):
    """Scan over query blocks: out [B, T, H, D] and the log-sum-exp per query [n, B, K, G, Q]."""
    b, t, h, d = q_BTHD.shape
    kv_heads, block = k_BTKD.shape[2], layout.block
    t_padded = -(-t // block) * block
    q = _block_rows(q_BTHD, kv_heads, t_padded)
    k, v = (_head_major_blocks(x, layout.n_prev * block, t_padded) for x in (k_BTKD, v_BTKD))
    mask_of = _block_masks(positions_BT, segment_ids_BT, layout, t_padded)

    def one_block(out_rows, i, key_blocks: int):
        q_i = jax.lax.dynamic_slice_in_dim(q, i * block, block, axis=3)
        start, keys = layout.key_start(i, key_blocks), key_blocks * block
        k_i, v_i = (jax.lax.dynamic_slice_in_dim(x, start, keys, axis=2) for x in (k, v))
        scores = jnp.einsum("bkgqd,bksd->bkgqs", q_i, k_i, preferred_element_type=jnp.float32) * layout.scale
        scores = jnp.where(mask_of(i, key_blocks), scores, MASK_VALUE)
        peak = jnp.max(scores, axis=-1)
        # Masked keys give exp(MASK_VALUE - peak) = 0 whenever the row has a visible key.
        weights = jnp.exp(scores - peak[..., None])
        total = jnp.sum(weights, axis=-1)
        out = jnp.einsum("bkgqs,bksd->bkgqd", weights.astype(v_i.dtype), v_i, preferred_element_type=jnp.float32)
        # A query without any visible key gets 0 and an infinite log-sum-exp (probabilities 0).
        has_key = peak > MASK_VALUE / 2
        out = jnp.where(has_key[..., None], out / total[..., None], 0.0)
        return _write_rows(out_rows, out, i * block), jnp.where(has_key, peak + jnp.log(total), jnp.inf)

    out, lse = _scan_block_groups(one_block, jnp.zeros((b, t_padded, h, d), q_BTHD.dtype), layout)
    return out[:, :t], jnp.concatenate(lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blockwise_attention(q, k, v, positions, segment_ids, layout: _Blocks):
    """Blockwise causal attention whose backward pass is a second scan that recomputes scores.

    Only one block's [Q, S] scores exist at a time, forward and backward: they stay in cache
    (about 1 MB per row at the reference shape) instead of a [B, n, Q, S] array streamed through
    memory several times, and the activations kept for the backward pass are O(T * D).
    Returns (out, lse); the log-sum-exp is for `_blockwise_replay` and gets no gradient.
    """
    return _blockwise_forward(q, k, v, positions, segment_ids, layout)


def _blockwise_attention_fwd(q, k, v, positions, segment_ids, layout):
    out, lse = _blockwise_forward(q, k, v, positions, segment_ids, layout)
    return (out, lse), (q, k, v, positions, segment_ids, out, lse)


def _blockwise_attention_bwd_outputs(layout, residuals, cotangents):
    d_out, _ = cotangents  # callers stop the log-sum-exp's gradient (`blockwise_attend_recorded`)
    return _blockwise_attention_bwd(layout, residuals, d_out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _blockwise_replay(q, k, v, positions, segment_ids, out, lse, layout: _Blocks):
    """The blockwise attention's output recorded by an earlier forward pass, with its gradient.

    Block remat recomputes a block in the backward pass only to differentiate it; the attention
    output and log-sum-exp of the first forward pass (O(T * D) each) make its scores forward
    pass unnecessary there: only the backward scan runs.
    """
    return out


def _blockwise_replay_fwd(q, k, v, positions, segment_ids, out, lse, layout):
    return out, (q, k, v, positions, segment_ids, out, lse)


def _blockwise_replay_bwd(layout: _Blocks, residuals, d_out):
    return (*_blockwise_attention_bwd(layout, residuals, d_out), None, None)


def _blockwise_attention_bwd(layout: _Blocks, residuals, d_out):
    q_BTHD, k_BTKD, v_BTKD, positions, segment_ids, out, lse = residuals
    # Recompute only once d_out exists (see `_after`), one layer at a time.
    q_BTHD, k_BTKD, v_BTKD = (_after(d_out, x) for x in (q_BTHD, k_BTKD, v_BTKD))
    f32 = jnp.float32
    b, t, h, d = q_BTHD.shape
    kv_heads, block, front = k_BTKD.shape[2], layout.block, layout.n_prev * layout.block
    t_padded = -(-t // block) * block
    q, d_o = (_block_rows(x.astype(f32), kv_heads, t_padded) for x in (q_BTHD, d_out))
    k, v = (_head_major_blocks(x.astype(f32), front, t_padded) for x in (k_BTKD, v_BTKD))
    row_dot = _block_rows(jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1, keepdims=True), kv_heads, t_padded)
    mask_of = _block_masks(positions, segment_ids, layout, t_padded)

    def one_block(carry, i, key_blocks: int):
        d_q, d_kv = carry
        rows = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=i * block, slice_size=block, axis=3)
        q_i, d_o_i, row_dot_i = rows(q), rows(d_o), rows(row_dot)[..., 0]
        start, keys = layout.key_start(i, key_blocks), key_blocks * block
        k_i, v_i = (jax.lax.dynamic_slice_in_dim(x, start, keys, axis=2) for x in (k, v))
        scores = jnp.einsum("bkgqd,bksd->bkgqs", q_i, k_i) * layout.scale
        probs = jnp.where(mask_of(i, key_blocks), jnp.exp(scores - lse[i][..., None]), 0.0)
        d_probs = jnp.einsum("bkgqd,bksd->bkgqs", d_o_i, v_i)
        d_scores = probs * (d_probs - row_dot_i[..., None]) * layout.scale
        d_q_i = jnp.einsum("bkgqs,bksd->bkgqd", d_scores, k_i)
        # Key and value gradients are computed transposed, [D, S] = [D, Q] x [Q, S]: as [S, D]
        # = [S, Q] x [Q, D] XLA's CPU backend first wrote probs and d_scores out transposed
        # (strided writes of the largest arrays of the loop). At the reference shape: one
        # decoder layer's attention forward + backward 770-855 -> 700-745 ms; the whole train
        # step 17.8 -> 16.7 s (medians of 6 interleaved steps on 2 cores).
        d_k_i = jnp.einsum("bkgqd,bkgqs->bkds", q_i, d_scores)
        d_v_i = jnp.einsum("bkgqd,bkgqs->bkds", d_o_i, probs)
        # The key histories of neighbouring blocks overlap: accumulate into one [B, K, D, S'].
        d_kv = tuple(_add_columns(acc, new, start) for acc, new in zip(d_kv, (d_k_i, d_v_i), strict=True))
        return (_write_rows(d_q, d_q_i, i * block), d_kv), None

    # Accumulators are anchored to d_out too: XLA otherwise materialised every layer's zeros
    # during the forward pass and kept them alive until that layer's backward.
    d_kv_shape = (b, kv_heads, d, k.shape[2])
    d_q, d_k, d_v = (_after(d_out, jnp.zeros(shape, f32)) for shape in ((b, t_padded, h, d), d_kv_shape, d_kv_shape))
    (d_q, (d_k, d_v)), _ = _scan_block_groups(one_block, (d_q, (d_k, d_v)), layout)
    d_k, d_v = (jnp.transpose(x[..., front : front + t], (0, 3, 1, 2)) for x in (d_k, d_v))
    return d_q[:, :t].astype(q_BTHD.dtype), d_k.astype(k_BTKD.dtype), d_v.astype(v_BTKD.dtype), None, None


_blockwise_attention.defvjp(_blockwise_attention_fwd, _blockwise_attention_bwd_outputs)
_blockwise_replay.defvjp(_blockwise_replay_fwd, _blockwise_replay_bwd)


def blockwise_local_attend(
    q_BTHD: jax.Array,
    k_BTKD: jax.Array,
    v_BTKD: jax.Array,
    positions_BT: jax.Array,
    segment_ids_BT: jax.Array | None,
    window: int | None,
    block_size: int | None = None,
) -> jax.Array:
    """Causal (optionally sliding-window) self-attention computed one query block at a time.

    Queries are cut into blocks of ``block`` rows; a block reads the keys of its own block and
    of the ceil((window - 1) / block) blocks before it (without a window: the blocks up to the
    last one of its group, see `CAUSAL_GROUPS`), which hold every key it may see: O(T * window)
    instead of O(T^2) with a window. The mask inside is exactly `local_causal_mask`'s, so the
    result equals `attend` with it, provided positions grow by one per element (absolute
    positions, as `positions_like` gives).
    """
    out, _ = blockwise_attend_recorded(q_BTHD, k_BTKD, v_BTKD, positions_BT, segment_ids_BT, window, block_size)
    return out


def blockwise_attend_recorded(
    q_BTHD: jax.Array,
    k_BTKD: jax.Array,
    v_BTKD: jax.Array,
    positions_BT: jax.Array,
    segment_ids_BT: jax.Array | None,
    window: int | None,
    block_size: int | None = None,
    replay: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """`blockwise_local_attend` plus its record (output, log-sum-exp), or a replay of a record.

    With ``replay`` (a record of the same inputs) the scores are not computed again: the record
    is returned as the output, and gradients are those of the attention (see `_blockwise_replay`).
    """
    layout = _Blocks.of(q_BTHD.shape[1], window, block_size or default_block_size(window), q_BTHD.shape[-1])
    args = (q_BTHD, k_BTKD, v_BTKD, positions_BT, segment_ids_BT)
    if replay is not None:
        out, lse = replay
        return _blockwise_replay(*args, out, lse, layout).astype(v_BTKD.dtype), replay
    out, lse = _blockwise_attention(*args, layout)
    lse = jax.lax.stop_gradient(lse)
    return out.astype(v_BTKD.dtype), (jax.lax.stop_gradient(out), lse)


def causal_self_attend(
    q_BTHD: jax.Array,
    k_BTKD: jax.Array,
    v_BTKD: jax.Array,
    positions_BT: jax.Array,
    segment_ids_BT: jax.Array | None,
    window: int | None,
    block_size: int | None = None,
) -> jax.Array:
    """Causal (optionally windowed, document-masked) self-attention: blockwise past one block.

    Rows longer than one query block (windowed local stacks and the full causal latent stack
    alike) take `blockwise_local_attend`; a row of one block takes the dense path. Both give
    the same values; the mask is built here from positions and segments, never passed in as
    [B, T, T].
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
        if blockwise_pays(q.shape[1], cfg.window):
            # Under block remat the first forward pass records (output, log-sum-exp) and the
            # recomputation replays them (see `checkpoint_after_cotangent`).
            replay = self.get_variable(ATTENTION_RECORD, "out_lse")
            args = (q, key, value, positions_BT, segment_ids_BT, cfg.window)
            out, record = blockwise_attend_recorded(*args, replay=replay)
            if replay is None and self.is_mutable_collection(ATTENTION_RECORD) and not self.is_initializing():
                self.put_variable(ATTENTION_RECORD, "out_lse", record)
        else:
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
    """Rematerialisation of ``fn(*args, replay) -> (y, record)`` that recomputes only once dy arrives.

    The first ``n_differentiable`` arguments (parameters, activations) get gradients; the rest
    (positions, segment ids, masks, indices) get none. The forward pass keeps only the
    arguments and ``record`` (small results worth keeping, e.g. attention outputs; any pytree);
    the backward pass re-runs ``fn(..., replay=record)`` under `jax.vjp` on inputs anchored to dy
    (see `_after`).
    """

    @jax.custom_vjp
    def run(*args):
        return fn(*args, replay=None)[0]

    def forward(*args):
        y, record = fn(*args, replay=None)
        return y, (args, record)

    def backward(residuals, d_y):
        args, record = residuals
        inputs = jax.tree.map(functools.partial(_after, d_y), args[:n_differentiable])
        aux = args[n_differentiable:]
        _, vjp = jax.vjp(lambda *inputs: fn(*inputs, *aux, replay=record)[0], *inputs)
        return (*vjp(d_y), *(None for _ in aux))

    run.defvjp(forward, backward)
    return run


def _apply_recorded(module: nn.Module, params, *args, replay=None):
    """``module.apply`` returning (output, record of `ATTENTION_RECORD`), or replaying a record."""
    if replay is None:
        y, variables = module.apply({"params": params}, *args, mutable=[ATTENTION_RECORD])
        return y, variables.get(ATTENTION_RECORD, {})
    return module.apply({"params": params, ATTENTION_RECORD: replay}, *args), replay


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

            rematerialised = checkpoint_after_cotangent(functools.partial(_apply_recorded, plain))
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

            def apply_cross(params, queries, keys, mask, gather_index, key_patch, replay):
                out = plain.apply({"params": params}, queries, keys, mask, gather_index, key_patch, slots_per_patch)
                return out, ()  # nothing recorded: the cross-attentions are cheap to recompute

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
    """Attention of each query over the R keys named by ``index_BTR`` (a softmax over R).

    With R (the decoder's k = 2 slots) this small, the scores and the weighted sum are
    multiply-and-reduce, not einsums: as dots they were [1, D] x [D, R] products batched over
    every (byte, head), which XLA's CPU backend runs far below its matmul speed (one reference
    decoder cross-attention, forward + backward: 395 -> 353 ms).
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
