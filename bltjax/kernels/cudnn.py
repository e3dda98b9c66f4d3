"""cuDNN flash attention (GPU) for BLT's self-attentions, via `jax.nn.dot_product_attention`.

What the public API lets cuDNN express (jax/_src/nn/functions.py, the 'cudnn' case):

* causality and a left window: ``is_causal=True`` with ``local_window_size=(window - 1, 0)``
  (cuDNN's sliding window of ``window`` keys, the query included) - computed in-kernel;
* document segments: only as a boolean ``mask`` [B, 1, T, T], which cuDNN receives as a dense
  additive bias of the query dtype. That is T * T * 2 bytes per row: 32 MiB for the latent's
  4096 patches, 512 MiB for a 16 KiB byte row. Segmented rows longer than `MAX_MASKED_LENGTH`
  therefore stay on XLA (the packed-segment form of cuDNN is private API and Hopper-only).

cuDNN also needs a half-precision dtype and a head dim that is a multiple of 8 and at most 256;
`fallback_reason` names the first unmet condition, and the caller then runs ``xla_blockwise``.
Cross-attention has no cuDNN form here (its keys are a few slots per query: gathers, on XLA).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Longest segmented row sent to cuDNN: its dense [T, T] bias stays at 32 MiB (bf16) per row.
MAX_MASKED_LENGTH = 4096
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def fallback_reason(t: int, head_dim: int, dtype: jnp.dtype, segmented: bool) -> str | None:
    """Why cuDNN cannot take this self-attention (None: it can)."""
    if jnp.dtype(dtype) not in _HALF:
        return f"cuDNN flash attention needs bfloat16 or float16 inputs, got {jnp.dtype(dtype).name}"
    if head_dim % 8 or head_dim > 256:
        return f"cuDNN flash attention needs a head dim that is a multiple of 8 and at most 256, got {head_dim}"
    if segmented and t > MAX_MASKED_LENGTH:
        return (
            f"document segments reach cuDNN only as a dense [T, T] bias; a row of {t} > {MAX_MASKED_LENGTH} "
            "would need too much memory"
        )
    return None


def self_attention(
    q_BTHD: jax.Array,
    k_BTKD: jax.Array,
    v_BTKD: jax.Array,
    segment_ids_BT: jax.Array | None,
    window: int | None,
    *,
    implementation: str = "cudnn",
) -> jax.Array:
    """Causal self-attention over positions 0..T-1 (cuDNN masks by place along the row).

    ``implementation="xla"`` runs the same call on XLA: the tests check the masks that way on
    machines without a GPU.
    """
    mask = None
    if segment_ids_BT is not None:
        mask = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]  # [B, 1, T, T]
    return jax.nn.dot_product_attention(
        q_BTHD,
        k_BTKD,
        v_BTKD,
        mask=mask,
        is_causal=True,
        local_window_size=None if window is None else (window - 1, 0),
        implementation=implementation,
    )
