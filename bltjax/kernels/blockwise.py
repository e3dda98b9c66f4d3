"""Causal self-attention one query block at a time (the `xla_blockwise` implementation).

Queries are cut into blocks; each block reads only the keys it may see (its sliding window, or
for full-causal rows the keys up to the last block of its group), so one block's [Q, S] scores
exist at a time, forward and backward. The mask inside is `masks.visible`, so the result equals
dense attention with `masks.local_causal_mask`, provided positions grow by one per element.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bltjax.kernels.masks import MASK_VALUE, visible
from bltjax.kernels.remat import after


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
    in cache (docs/design.md, "Attention paths").
    """
    return t > (block_size or default_block_size(window))


# Query-block groups of a row whose keys span the whole row (full causal): each group is its
# own scan and reads only the key blocks up to its last query block, so about (G + 1) / 2G of
# the [T, T] score square is computed instead of all of it (one block per group when the row
# has at most G blocks: the exact causal triangle). 4, not 8: the same speed, less compiled
# memory (docs/design.md, "Attention paths").
CAUSAL_GROUPS = 4


class BlockLayout(NamedTuple):
    """Static layout of the blockwise path (hashable: a `custom_vjp` non-differentiable argument)."""

    window: int | None  # None: full causal
    block: int  # queries per block
    n_prev: int  # key blocks read before the query's own block, at most
    scale: float
    groups: tuple[tuple[int, int, int], ...]  # (first query block, query blocks, key blocks read per block)

    @classmethod
    def of(cls, t: int, window: int | None, block: int, d: int) -> BlockLayout:
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


def _block_masks(positions_BT, segment_ids_BT, layout: BlockLayout, t_padded: int):
    """A function (i, key blocks) -> [B, 1, 1, Q, S] mask of query block i over its keys (docs/architecture.md §5.4)."""
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
        seen = visible(q_pos_i, k_pos_i, q_seg_i, k_seg_i, layout.window) & k_valid_i
        return seen[:, None, None]

    return mask


def _add_columns(acc_BKDS: jax.Array, new_BKDS: jax.Array, start) -> jax.Array:
    """acc[..., start : start + S] += new, in place inside a scan."""
    window = jax.lax.dynamic_slice_in_dim(acc_BKDS, start, new_BKDS.shape[-1], axis=-1)
    return jax.lax.dynamic_update_slice_in_dim(acc_BKDS, window + new_BKDS, start, axis=-1)


def _scan_block_groups(one_block, init, layout: BlockLayout):
    """``one_block(carry, i, key_blocks)`` scanned over every query block, one `lax.scan` per group.

    Returns the final carry and each group's stacked per-block outputs, in block order.
    """
    carry, outputs = init, []
    for first, count, key_blocks in layout.groups:
        body = functools.partial(one_block, key_blocks=key_blocks)
        carry, group_outputs = jax.lax.scan(body, carry, jnp.arange(first, first + count))
        outputs.append(group_outputs)
    return carry, outputs


def _blockwise_forward(q_BTHD, k_BTKD, v_BTKD, positions_BT, segment_ids_BT, layout: BlockLayout):
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
def _blockwise_attention(q, k, v, positions, segment_ids, layout: BlockLayout):
    """Blockwise causal attention whose backward pass is a second scan that recomputes scores.

    Only one block's [Q, S] scores exist at a time, forward and backward: they stay in cache
    instead of a [B, n, Q, S] array streamed through memory several times, and the activations
    kept for the backward pass are O(T * D).
    Returns (out, lse); the log-sum-exp is for `_blockwise_replay` and gets no gradient.
    """
    return _blockwise_forward(q, k, v, positions, segment_ids, layout)


def _blockwise_attention_fwd(q, k, v, positions, segment_ids, layout):
    out, lse = _blockwise_forward(q, k, v, positions, segment_ids, layout)
    return (out, lse), (q, k, v, positions, segment_ids, out, lse)


def _blockwise_attention_bwd_outputs(layout, residuals, cotangents):
    d_out, _ = cotangents  # callers stop the log-sum-exp's gradient (`attend_blockwise`)
    return _blockwise_attention_bwd(layout, residuals, d_out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _blockwise_replay(q, k, v, positions, segment_ids, out, lse, layout: BlockLayout):
    """The blockwise attention's output recorded by an earlier forward pass, with its gradient.

    Block remat recomputes a block in the backward pass only to differentiate it; the attention
    output and log-sum-exp of the first forward pass (O(T * D) each) make its scores forward
    pass unnecessary there: only the backward scan runs.
    """
    return out


def _blockwise_replay_fwd(q, k, v, positions, segment_ids, out, lse, layout):
    return out, (q, k, v, positions, segment_ids, out, lse)


def _blockwise_replay_bwd(layout: BlockLayout, residuals, d_out):
    return (*_blockwise_attention_bwd(layout, residuals, d_out), None, None)


def _blockwise_attention_bwd(layout: BlockLayout, residuals, d_out):
    q_BTHD, k_BTKD, v_BTKD, positions, segment_ids, out, lse = residuals
    # Recompute only once d_out exists (see `remat.after`), one layer at a time.
    q_BTHD, k_BTKD, v_BTKD = (after(d_out, x) for x in (q_BTHD, k_BTKD, v_BTKD))
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
        # (strided writes of the largest arrays of the loop).
        d_k_i = jnp.einsum("bkgqd,bkgqs->bkds", q_i, d_scores)
        d_v_i = jnp.einsum("bkgqd,bkgqs->bkds", d_o_i, probs)
        # The key histories of neighbouring blocks overlap: accumulate into one [B, K, D, S'].
        d_kv = tuple(_add_columns(acc, new, start) for acc, new in zip(d_kv, (d_k_i, d_v_i), strict=True))
        return (_write_rows(d_q, d_q_i, i * block), d_kv), None

    # Accumulators are anchored to d_out too: XLA otherwise materialised every layer's zeros
    # during the forward pass and kept them alive until that layer's backward.
    d_kv_shape = (b, kv_heads, d, k.shape[2])
    d_q, d_k, d_v = (after(d_out, jnp.zeros(shape, f32)) for shape in ((b, t_padded, h, d), d_kv_shape, d_kv_shape))
    (d_q, (d_k, d_v)), _ = _scan_block_groups(one_block, (d_q, (d_k, d_v)), layout)
    d_k, d_v = (jnp.transpose(x[..., front : front + t], (0, 3, 1, 2)) for x in (d_k, d_v))
    return d_q[:, :t].astype(q_BTHD.dtype), d_k.astype(k_BTKD.dtype), d_v.astype(v_BTKD.dtype), None, None


_blockwise_attention.defvjp(_blockwise_attention_fwd, _blockwise_attention_bwd_outputs)
_blockwise_replay.defvjp(_blockwise_replay_fwd, _blockwise_replay_bwd)


def attend_blockwise(
    q_BTHD: jax.Array,
    k_BTKD: jax.Array,
    v_BTKD: jax.Array,
    positions_BT: jax.Array,
    segment_ids_BT: jax.Array | None,
    window: int | None,
    block_size: int | None = None,
    replay: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Causal (optionally sliding-window) self-attention one query block at a time, and its record.

    A block reads the keys of its own block and of the ceil((window - 1) / block) blocks before
    it (without a window: the blocks up to the last one of its group, see `CAUSAL_GROUPS`),
    which hold every key it may see: O(T * window) instead of O(T^2) with a window.

    Returns (out, record): the record (output, log-sum-exp) is what a rematerialised second
    run passes back as ``replay`` (same inputs); the scores are then not computed again, the
    record is the output, and gradients are those of the attention (see `_blockwise_replay`).
    """
    layout = BlockLayout.of(q_BTHD.shape[1], window, block_size or default_block_size(window), q_BTHD.shape[-1])
    args = (q_BTHD, k_BTKD, v_BTKD, positions_BT, segment_ids_BT)
    if replay is not None:
        out, lse = replay
        return _blockwise_replay(*args, out, lse, layout).astype(v_BTKD.dtype), replay
    out, lse = _blockwise_attention(*args, layout)
    lse = jax.lax.stop_gradient(lse)
    return out.astype(v_BTKD.dtype), (jax.lax.stop_gradient(out), lse)
