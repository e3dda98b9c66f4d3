"""Every attention implementation, behind one entry point for self- and one for cross-attention.

The model's modules compute projections and RoPE and call only `self_attention` and
`cross_attention`; the config field ``model.attention`` names the implementation:

* ``"dense"``: masked softmax over all keys (`dense.attend`); the reference.
* ``"xla_blockwise"``: self-attention one query block at a time (`blockwise`); cross-attention
  over gathered keys (`cross`). Plain XLA, so it runs on every backend.
* ``"auto"``: ``xla_blockwise`` for rows longer than one query block, ``dense`` otherwise (the
  same work there), on every backend for now.

All give the same values and gradients. A new kernel (e.g. a TPU or GPU one) is a function of
the same signature added to `_SELF_ATTENTION` (and `_CROSS_STRUCTURED` if it has a cross path).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from bltjax.kernels import blockwise, cross, dense, masks

# Keep in step with `bltjax.models.configs.ATTENTION_IMPLEMENTATIONS` (jax-free, for validation).
ATTENTION_IMPLEMENTATIONS = ("auto", "dense", "xla_blockwise")

# What a self-attention kernel returns besides its output: something it can replay in a
# rematerialised second run of the same inputs (see `bltjax.models.remat`), or None.
Record = Any


def _dense_self_attention(q, k, v, positions, segment_ids, window, replay):
    return dense.attend(q, k, v, masks.local_causal_mask(positions, segment_ids, window)), None


def _blockwise_self_attention(q, k, v, positions, segment_ids, window, replay):
    return blockwise.attend_blockwise(q, k, v, positions, segment_ids, window, replay=replay)


_SELF_ATTENTION: dict[str, Callable[..., tuple[jax.Array, Record]]] = {
    "dense": _dense_self_attention,
    "xla_blockwise": _blockwise_self_attention,
}


def _unknown(implementation: str) -> ValueError:
    return ValueError(f"model.attention: expected one of {ATTENTION_IMPLEMENTATIONS}, got {implementation!r}")


def self_attention_implementation(t: int, window: int | None, implementation: str = "auto") -> str:
    """The implementation `self_attention` runs for a row of ``t`` queries (resolves ``"auto"``)."""
    if implementation == "auto":
        return "xla_blockwise" if blockwise.blockwise_pays(t, window) else "dense"
    if implementation not in _SELF_ATTENTION:
        raise _unknown(implementation)
    return implementation


def self_attention(
    q_BTHD: jax.Array,
    k_BTKD: jax.Array,
    v_BTKD: jax.Array,
    positions_BT: jax.Array,
    segment_ids_BT: jax.Array | None,
    window: int | None,
    *,
    implementation: str = "auto",
    replay: Record | None = None,
) -> tuple[jax.Array, Record | None]:
    """Causal self-attention (docs/architecture.md §5.4): key j is visible to query i iff
    j <= i, both lie in the same segment (when ``segment_ids_BT`` is given) and i - j < window
    (when ``window`` is given). Positions are absolute (one per element); K may divide H (GQA).

    Returns (out [B, T, H, D], record): ``record`` is None or what the implementation can
    replay when the same inputs run again under rematerialisation (pass it as ``replay``).
    """
    name = self_attention_implementation(q_BTHD.shape[1], window, implementation)
    return _SELF_ATTENTION[name](q_BTHD, k_BTKD, v_BTKD, positions_BT, segment_ids_BT, window, replay)


def cross_attention(
    q_BTHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    *,
    gather_index: jax.Array | None = None,
    key_patch: jax.Array | None = None,
    slots_per_patch: int = 1,
    mask: jax.Array | None = None,
    implementation: str = "auto",
) -> jax.Array:
    """Attention of T queries over S keys (no causality, no RoPE; docs/architecture.md §6.3, §8.3).

    Which keys a query sees is given by exactly one of:
      * ``gather_index`` [B, T, R]: the R keys each query names (the decoder's k slots);
      * ``key_patch`` [B, S]: query t belongs to patch t // ``slots_per_patch`` and sees the
        keys whose patch is its own (the encoder's own-patch window);
      * ``mask`` [B, T, S]: any dense mask (wider cross-attention windows).
    ``"dense"`` turns the first two into masks; the other implementations gather the keys.
    A query without keys gets 0.
    """
    if sum(x is not None for x in (gather_index, key_patch, mask)) != 1:
        raise ValueError("cross_attention: expected exactly one of gather_index, key_patch, mask")
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise _unknown(implementation)
    if mask is None and implementation == "dense":
        if gather_index is not None:
            mask = masks.gathered_mask(gather_index, k_BSKD.shape[1])
        else:
            mask = masks.own_patch_mask(key_patch, q_BTHD.shape[1], slots_per_patch)
    if mask is not None:
        return dense.attend(q_BTHD, k_BSKD, v_BSKD, mask)
    if gather_index is not None:
        return cross.attend_gathered(q_BTHD, k_BSKD, v_BSKD, gather_index)
    return cross.attend_own_patch(q_BTHD, k_BSKD, v_BSKD, key_patch, slots_per_patch)
