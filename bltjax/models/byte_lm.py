"""A plain causal byte transformer: BLT's entropy model (spec §2) and the byte-level baseline.

Same blocks as every BLT stack; embedding and head are untied, and a final RMSNorm precedes
the head. `next_byte_entropy` turns its logits into the H_t that entropy patching thresholds.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bltjax.models.configs import ByteLMConfig
from bltjax.models.layers import (
    Linear,
    RMSNorm,
    Transformer,
    dtype_of,
    eos_segment_ids,
    positions_like,
    truncated_normal_init,
)
from bltjax.tokenizer import EOS_ID


class ByteLM(nn.Module):
    """``apply({'params': p}, tokens[B, N]) -> float32 logits [B, N, 260]`` for token i + 1."""

    config: ByteLMConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.config
        stack = cfg.stack
        kw = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(truncated_normal_init(stack.dim**-0.5), ("vocab", "embed")),
            (cfg.vocab_size, stack.dim),
            kw["param_dtype"],
        )
        tokens = jnp.asarray(tokens, jnp.int32)
        x = jnp.take(table, tokens, axis=0).astype(kw["dtype"])
        positions = positions_like(tokens)
        segments = eos_segment_ids(tokens == EOS_ID) if cfg.document_mask else None
        transformer = Transformer(
            stack, cfg.init_std_factor, remat=cfg.remat, attention=cfg.attention, name="transformer", **kw
        )
        x = transformer(x, positions, segments)
        x = RMSNorm(stack.norm_eps, name="final_norm", **kw)(x)
        logits = Linear((stack.dim,), (cfg.vocab_size,), ("embed", "vocab"), stack.dim**-0.5, name="output", **kw)(x)
        return logits.astype(jnp.float32)


def next_byte_entropy(logits: jax.Array) -> jax.Array:
    """H_t = -sum_v p_t(v) ln p_t(v) over all 260 ids, in nats and float32 (spec §2.1)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
