"""Pallas splash attention (the TPU kernel) for BLT's self- and cross-attentions.

`jax.experimental.pallas.ops.tpu.splash_attention` computes attention block by block in VMEM
and skips the blocks its static mask rules out; a data-dependent rule enters only through
`SegmentIds` (query i sees key j only if their ids are equal), applied inside computed blocks.
BLT's attentions map onto it as follows (docs/design.md, "Attention kernels per backend"):

* local self-attention: `LocalMask` (i - window < j <= i) + document segment ids;
* latent self-attention: `CausalMask` + document segment ids;
* encoder own-patch cross-attention: `FullMask`, query segment = its patch (t // slots), key
  segment = the byte's patch id; no gather, no scatter of key/value-sized tensors;
* decoder cross-attention over its patch's k slots: `FullMask`, query segment = the byte's
  patch, key segment = the slot's patch (s // k).

Splash masks index queries and keys by their place along the row, where BLT's rule speaks of
positions. The two agree because every caller of the self-attention passes positions 0..T-1
(`positions_like`, and `prefill`'s 0..T-1); this module says so where it relies on it.

The kernel runs per example on [heads, length, head_dim], so inputs are transposed and the
batch is vmapped. Lengths are padded to a multiple of 128 (the kernel's smallest key block),
padded keys carry a segment id no query has, padded queries are dropped afterwards. Inside an
`bltjax.kernels.partitioned` context the call is a `shard_map` over the batch (and head) mesh
axes, since XLA cannot split a Pallas call across devices by itself.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from bltjax.kernels import sharding

# Block sizes tried in order; the largest dividing the padded length wins (bigger blocks
# amortise the per-block overhead, and 512 also equals the local window, so a local
# query block touches at most two key blocks).
BLOCK_SIZES = (512, 256, 128)
LANES = 128  # the kernel's key blocks must be multiples of this
# Segment id of padded keys: no query, real or padded, carries it.
_PAD_KEY_SEGMENT = np.iinfo(np.int32).min


def padded_length(n: int) -> int:
    """``n`` rounded up to a multiple of 128, the smallest key block the kernel accepts."""
    return -(-n // LANES) * LANES


def block_size(n: int) -> int:
    """The largest of `BLOCK_SIZES` dividing ``n`` (a multiple of 128)."""
    return next(b for b in BLOCK_SIZES if n % b == 0)


@functools.lru_cache(maxsize=64)
def _kernel(q_len: int, kv_len: int, heads: int, causal: bool, window: int | None, interpret: bool):
    """The splash kernel for one static mask; built once per shape (the mask is analysed in numpy)."""
    shape = (q_len, kv_len)
    if not causal:
        mask = splash.FullMask(shape)
    elif window is None:
        mask = splash.CausalMask(shape)
    else:
        # j >= i - (window - 1) and j <= i: the window counts the query itself (docs/architecture.md §5.4).
        mask = splash.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    bq, bkv = block_size(q_len), block_size(kv_len)
    sizes = splash.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    # Concrete mask tables (not tracers of the trace that first asked), so the cache can reuse them.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(
            splash.MultiHeadMask([mask] * heads),
            block_sizes=sizes,
            head_shards=1,
            q_seq_shards=1,
            interpret=interpret,
        )


def _pad(x: jax.Array, length: int, axis: int, value=0) -> jax.Array:
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def attend(
    q_BTHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    q_segment_BT: jax.Array | None,
    kv_segment_BS: jax.Array | None,
    *,
    causal: bool,
    window: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Splash attention with scale 1/sqrt(D); K divides H (grouped-query heads). [B, T, H, D].

    ``causal``: key j visible to query i iff j <= i (and i - j < ``window``), by place along
    the row; otherwise every key (a `FullMask`). Segment ids restrict both to equal ids. A
    query with no visible key gets an undefined (finite) row here: callers zero it.
    """
    b, t, h, d = q_BTHD.shape
    s, kv_heads = k_BSKD.shape[1:3]
    precision = str(jax.config.jax_default_matmul_precision)
    if not interpret and q_BTHD.dtype != jnp.float32 and precision in ("highest", "float32"):
        # The kernel's dots take the global precision when the step is lowered; Mosaic has no
        # float32-precision matmul of bfloat16 operands (it accumulates in float32 anyway).
        raise ValueError(
            f"splash attention: jax_default_matmul_precision={precision!r} cannot compile for "
            f"{q_BTHD.dtype} inputs on a TPU; leave it at its default or use model.attention='xla_blockwise'"
        )
    if h % kv_heads:
        raise ValueError(f"splash attention: {kv_heads} key/value heads do not divide {h} query heads")
    if causal and t != s:
        raise ValueError(f"splash attention: causal self-attention needs as many keys as queries, got {t} and {s}")
    tp, sp = padded_length(t), padded_length(s)
    if (q_segment_BT is None) != (kv_segment_BS is None):
        raise ValueError("splash attention: give both query and key segment ids, or neither")
    if q_segment_BT is None and not causal and sp != s:
        # Padded keys must be excluded; without segments a causal mask does it, a full mask does not.
        q_segment_BT = jnp.zeros((b, t), jnp.int32)
        kv_segment_BS = jnp.zeros((b, s), jnp.int32)
    # Scale q before the kernel (it applies none); in float32 so bf16 inputs round once.
    q = (q_BTHD.astype(jnp.float32) / math.sqrt(d)).astype(q_BTHD.dtype)
    q = jnp.swapaxes(_pad(q, tp, 1), 1, 2)  # [B, H, Tp, D]
    k = jnp.swapaxes(_pad(k_BSKD, sp, 1), 1, 2)  # [B, K, Sp, D]
    v = jnp.swapaxes(_pad(v_BSKD, sp, 1), 1, 2)
    segments = None
    if q_segment_BT is not None:
        # Padded queries take segment 0 (they are dropped); padded keys a segment no query has.
        segments = (
            _pad(q_segment_BT.astype(jnp.int32), tp, 1),
            _pad(kv_segment_BS.astype(jnp.int32), sp, 1, _PAD_KEY_SEGMENT),
        )

    def per_shard(q, k, v, segments):
        kernel = _kernel(tp, sp, q.shape[1], causal, window, interpret)
        if segments is None:
            return jax.vmap(kernel)(q, k, v)
        return jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=splash.SegmentIds(qs, ks)))(
            q, k, v, *segments
        )

    out = sharding.over_batch_and_heads(per_shard, q, k, v, segments, batch_dim=0, head_dim=1)
    return jnp.swapaxes(out, 1, 2)[:, :t].astype(v_BSKD.dtype)


def self_attention(
    q_BTHD: jax.Array,
    k_BTKD: jax.Array,
    v_BTKD: jax.Array,
    segment_ids_BT: jax.Array | None,
    window: int | None,
    *,
    interpret: bool = False,
) -> jax.Array:
    """`bltjax.kernels.self_attention` for positions 0..T-1 of every row (see the module docstring).

    Every query sees at least itself, so no row is empty.
    """
    return attend(
        q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, segment_ids_BT, causal=True, window=window, interpret=interpret
    )


def cross_own_patch(
    q_BTHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    key_patch_BS: jax.Array,
    slots_per_patch: int,
    *,
    interpret: bool = False,
) -> jax.Array:
    """The encoder's own-patch cross-attention (`cross.attend_own_patch`'s semantics) as splash.

    Query t belongs to patch t // ``slots_per_patch``; key s to ``key_patch_BS[s]``. A patch
    with no byte (padding) gets 0.
    """
    b, t = q_BTHD.shape[:2]
    n_patches = t // slots_per_patch
    query_patch = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) // slots_per_patch, (b, t))
    key_patch = key_patch_BS.astype(jnp.int32)
    out = attend(q_BTHD, k_BSKD, v_BSKD, query_patch, key_patch, causal=False, interpret=interpret)
    # Which patches own a byte: a scatter of one flag per byte (no key/value-sized data).
    # Ids outside [0, P) (negative ones included) go to index P and are dropped.
    in_range = (key_patch >= 0) & (key_patch < n_patches)
    index = jnp.where(in_range, key_patch, n_patches)
    rows = jnp.arange(b)[:, None]
    has_key = jnp.zeros((b, n_patches), bool).at[rows, index].set(True, mode="drop")
    return jnp.where(has_key[:, query_patch[0]][..., None, None], out, 0).astype(out.dtype)


def cross_gathered(
    q_BTHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    index_BTR: jax.Array,
    *,
    interpret: bool = False,
) -> jax.Array:
    """The decoder's cross-attention over its patch's R slots (`cross.attend_gathered`) as splash.

    Reads ``index_BTR`` as the form the decoder builds: row t names slots p*R .. p*R + R - 1 of
    one patch p (docs/architecture.md §8.3), so query t takes segment p and slot s segment
    s // R. A query naming a patch outside the keys gets 0.
    """
    r = index_BTR.shape[-1]
    s = k_BSKD.shape[1]
    first = index_BTR[..., 0].astype(jnp.int32)
    query_patch = jnp.floor_divide(first, r)
    slot_patch = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32) // r, k_BSKD.shape[:2])
    out = attend(q_BTHD, k_BSKD, v_BSKD, query_patch, slot_patch, causal=False, interpret=interpret)
    has_key = (first >= 0) & (first < s)
    return jnp.where(has_key[..., None, None], out, 0).astype(out.dtype)
