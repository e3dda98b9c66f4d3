"""Every attention implementation, behind one entry point for self- and one for cross-attention.

The model's modules compute projections and RoPE and call only `self_attention` and
`cross_attention`; the config field ``model.attention`` names the implementation:

* ``"dense"``: masked softmax over all keys (`dense.attend`); the reference.
* ``"xla_blockwise"``: self-attention one query block at a time (`blockwise`); cross-attention
  over gathered keys (`cross`). Plain XLA, so it runs on every backend.
* ``"splash"``: Pallas splash attention (`splash`), the TPU kernel, for self- and
  cross-attention; on other backends it runs in Pallas interpret mode (tests only: slow).
* ``"cudnn"``: cuDNN flash attention through `jax.nn.dot_product_attention` (`cudnn`) for the
  self-attentions it can express; XLA (``xla_blockwise``) for the rest and for cross-attention.
* ``"auto"``: by the platform the step is compiled for (`target_platform`). On TPU splash
  self-attention for rows of at least 128 where the kernel knows its mesh (inside
  `partitioned`, or a one-device process; else XLA, e.g. an unsharded eval on a pod); on GPU
  cudnn; on CPU ``xla_blockwise`` for rows longer than one query block and ``dense``
  otherwise (the same work there). Cross-attention keeps the gather forms of
  ``xla_blockwise`` on every platform (docs/design.md, "Attention kernels per backend":
  splash's full mask computes every [T, S] block).

All give the same values and gradients. A new kernel is a function of the same signature added
to `_SELF_ATTENTION` (and `_CROSS_STRUCTURED` if it has a cross path).

Decoding reads heads-major KV caches (`kv_cache`: layout, masked writes) through two more entry
points: `cached_self_attention` (one query per row at its own position) and
`cached_cross_attention` (queries over cached cross-attention keys). They have one XLA
implementation for every backend.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from bltjax.kernels import blockwise, cross, cudnn, dense, kv_cache, masks, sharding, splash
from bltjax.kernels.sharding import partitioned

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "cached_cross_attention",
    "cached_self_attention",
    "compiling_for",
    "cross_attention",
    "cross_attention_implementation",
    "partitioned",
    "self_attention",
    "self_attention_implementation",
    "target_platform",
]

# Keep in step with `bltjax.models.configs.ATTENTION_IMPLEMENTATIONS` (jax-free, for validation).
ATTENTION_IMPLEMENTATIONS = ("auto", "dense", "xla_blockwise", "splash", "cudnn")

# What a self-attention kernel returns besides its output: something it can replay in a
# rematerialised second run of the same inputs (see `bltjax.models.remat`), or None.
Record = Any

# The platform a step is being traced for, when it differs from the host's (ahead-of-time
# compilation for a TPU slice from a CPU machine); None: `jax.default_backend()`.
_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("bltjax_target_platform", default=None)


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
    """While tracing inside this context, ``auto`` and the kernels act as on ``platform`` ("tpu", "gpu", "cpu").

    `bltjax.runtime.aot` traces the train step for a TPU topology on a CPU host: wrapping its
    ``lower`` call in ``compiling_for(devices[0].platform)`` makes ``auto`` pick splash there.
    """
    token = _TARGET_PLATFORM.set(_platform_name(platform))
    try:
        yield
    finally:
        _TARGET_PLATFORM.reset(token)


def _platform_name(platform: str) -> str:
    platform = platform.lower()
    return "gpu" if platform in ("cuda", "rocm") else platform


def target_platform() -> str:
    """The platform being traced for: the `compiling_for` context, else `jax.default_backend()`."""
    return _TARGET_PLATFORM.get() or _platform_name(jax.default_backend())


def _dense_self_attention(q, k, v, positions, segment_ids, window, replay):
    return dense.attend(q, k, v, masks.local_causal_mask(positions, segment_ids, window)), None


def _blockwise_self_attention(q, k, v, positions, segment_ids, window, replay):
    return blockwise.attend_blockwise(q, k, v, positions, segment_ids, window, replay=replay)


def _splash_self_attention(q, k, v, positions, segment_ids, window, replay):
    # Splash masks by place along the row: positions are 0..T-1 in every caller (`splash`).
    interpret = target_platform() != "tpu"
    return splash.self_attention(q, k, v, segment_ids, window, interpret=interpret), None


def _cudnn_self_attention(q, k, v, positions, segment_ids, window, replay):
    # cuDNN masks by place along the row too; `self_attention_implementation` checked the rest.
    return cudnn.self_attention(q, k, v, segment_ids, window), None


_SELF_ATTENTION: dict[str, Callable[..., tuple[jax.Array, Record]]] = {
    "dense": _dense_self_attention,
    "xla_blockwise": _blockwise_self_attention,
    "splash": _splash_self_attention,
    "cudnn": _cudnn_self_attention,
}


def _unknown(implementation: str) -> ValueError:
    return ValueError(f"model.attention: expected one of {ATTENTION_IMPLEMENTATIONS}, got {implementation!r}")


def _xla_choice(t: int, window: int | None) -> str:
    return "xla_blockwise" if blockwise.blockwise_pays(t, window) else "dense"


def self_attention_implementation(
    t: int,
    window: int | None,
    implementation: str = "auto",
    *,
    platform: str | None = None,
    head_dim: int = 128,
    dtype: Any = jnp.bfloat16,
    segmented: bool = False,
) -> str:
    """The implementation `self_attention` runs for a row of ``t`` queries (resolves ``"auto"``).

    ``platform`` defaults to `target_platform`. ``cudnn`` (asked for, or ``auto`` on GPU) runs
    ``xla_blockwise`` / ``dense`` where cuDNN cannot express the row (`cudnn.fallback_reason`
    for ``head_dim``, ``dtype`` and whether the row has document ``segmented`` ids).
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise _unknown(implementation)
    platform = _platform_name(platform) if platform else target_platform()
    if implementation == "auto":
        # Splash needs its mesh (`partitioned`, entered by the sharded train step) unless the
        # process has one device: XLA cannot partition a Pallas call itself.
        if platform == "tpu" and t >= splash.LANES and (sharding.is_partitioned() or jax.device_count() == 1):
            return "splash"
        implementation = "cudnn" if platform == "gpu" else _xla_choice(t, window)
    if implementation == "cudnn" and (
        platform != "gpu" or cudnn.fallback_reason(t, head_dim, dtype, segmented) is not None
    ):
        return _xla_choice(t, window)
    return implementation


def cudnn_fallback_reason(
    t: int, head_dim: int, dtype: Any, segmented: bool, platform: str | None = None
) -> str | None:
    """Why ``cudnn`` runs XLA for this row (None: it runs cuDNN); for logs and docs."""
    platform = _platform_name(platform) if platform else target_platform()
    if platform != "gpu":
        return f"cuDNN runs on GPUs only; compiling for {platform}"
    return cudnn.fallback_reason(t, head_dim, dtype, segmented)


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
    The kernels (splash, cudnn) mask by place along the row, which is the same rule because
    every caller passes positions 0..T-1 (`bltjax.models.layers.positions_like`, ``prefill``).

    Returns (out [B, T, H, D], record): ``record`` is None or what the implementation can
    replay when the same inputs run again under rematerialisation (pass it as ``replay``).
    """
    t, d = q_BTHD.shape[1], q_BTHD.shape[3]
    name = self_attention_implementation(
        t, window, implementation, head_dim=d, dtype=q_BTHD.dtype, segmented=segment_ids_BT is not None
    )
    return _SELF_ATTENTION[name](q_BTHD, k_BTKD, v_BTKD, positions_BT, segment_ids_BT, window, replay)


def cross_attention_implementation(implementation: str = "auto") -> str:
    """The implementation `cross_attention` runs for its structured (gathered / own-patch) forms.

    Only ``dense`` and ``splash`` have their own; ``auto``, ``xla_blockwise`` and ``cudnn`` run
    the gather forms of `cross` (docs/design.md, "Attention kernels per backend").
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise _unknown(implementation)
    return implementation if implementation in ("dense", "splash") else "xla_blockwise"


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
    ``"dense"`` turns the first two into masks; ``"splash"`` into segment ids (the decoder's
    ``gather_index`` must then name the R consecutive slots of one patch, the form it builds);
    the others gather the keys. A query without keys gets 0.
    """
    if sum(x is not None for x in (gather_index, key_patch, mask)) != 1:
        raise ValueError("cross_attention: expected exactly one of gather_index, key_patch, mask")
    name = cross_attention_implementation(implementation)
    if mask is None and name == "dense":
        if gather_index is not None:
            mask = masks.gathered_mask(gather_index, k_BSKD.shape[1])
        else:
            mask = masks.own_patch_mask(key_patch, q_BTHD.shape[1], slots_per_patch)
    if mask is not None:
        return dense.attend(q_BTHD, k_BSKD, v_BSKD, mask)
    if name == "splash":
        interpret = target_platform() != "tpu"
        if gather_index is not None:
            return splash.cross_gathered(q_BTHD, k_BSKD, v_BSKD, gather_index, interpret=interpret)
        return splash.cross_own_patch(q_BTHD, k_BSKD, v_BSKD, key_patch, slots_per_patch, interpret=interpret)
    if gather_index is not None:
        return cross.attend_gathered(q_BTHD, k_BSKD, v_BSKD, gather_index)
    return cross.attend_own_patch(q_BTHD, k_BSKD, v_BSKD, key_patch, slots_per_patch)


def cached_self_attention(
    q_BHD: jax.Array,
    cache: kv_cache.KVCache,
    positions_B: jax.Array,
    segment_ids_B: jax.Array | None,
    window: int | None,
    *,
    new_kv: tuple[jax.Array, jax.Array] | None = None,
    prefix_chunk: int | None = None,
) -> jax.Array:
    """One decoding step of `self_attention`: each row's query at its own position over its cache.

    Without ``new_kv`` the cache already holds the query's own key (`kv_cache.write_step`). With
    ``new_kv`` = (k [B, K, D], v) the own key is not written yet (the caller writes it later,
    e.g. outside a `lax.cond`); then a full (unwindowed) cache whose size ``prefix_chunk``
    divides is read only up to the largest query position, ``prefix_chunk`` slots at a time.
    Returns [B, H, D].
    """
    if new_kv is None:
        return kv_cache.attend_cached(q_BHD, cache, positions_B, segment_ids_B, window)
    k_BKD, v_BKD = new_kv
    slots = cache.keys.shape[2]
    if prefix_chunk is not None and window is None and slots % prefix_chunk == 0:

        def allowed(slot):
            slot_positions = jnp.take(cache.positions, slot, axis=1)
            mask = (slot_positions >= 0) & (slot_positions < positions_B[:, None])
            if segment_ids_B is not None:
                mask &= jnp.take(cache.segments, slot, axis=1) == segment_ids_B[:, None]
            return mask

        used = jnp.max(positions_B)
        return kv_cache.attend_used_prefix(q_BHD, cache.keys, cache.values, allowed, used, prefix_chunk, new_kv)
    return kv_cache.attend_cached_and_new(q_BHD, cache, k_BKD, v_BKD, positions_B, segment_ids_B, window)


def cached_cross_attention(
    q_BTHD: jax.Array,
    k_BKSD: jax.Array,
    v_BKSD: jax.Array,
    *,
    mask: jax.Array | None = None,
    allowed: Callable[[jax.Array], jax.Array] | None = None,
    used: jax.Array | None = None,
    chunk: int | None = None,
) -> jax.Array:
    """`cross_attention` over heads-major cached keys and values [B, K, S, D]: [B, T, H, D].

    Either ``mask`` [B, T, S] (dense), or for one query per row (T = 1) ``allowed(slots [C]) ->
    [B, C]`` over the first ``used`` slots only, read ``chunk`` at a time
    (`kv_cache.attend_used_prefix`), so the cost follows what has been written. A query
    without keys gets 0.
    """
    if (mask is None) == (allowed is None):
        raise ValueError("cached_cross_attention: expected exactly one of mask, allowed")
    if mask is not None:
        return kv_cache.attend(q_BTHD, k_BKSD, v_BKSD, mask)
    return kv_cache.attend_used_prefix(q_BTHD[:, 0], k_BKSD, v_BKSD, allowed, used, chunk)[:, None]
