"""A plain causal byte transformer: BLT's entropy model (docs/architecture.md §2) and the byte-level baseline.

Same blocks as every BLT stack; embedding and head are untied, and a final RMSNorm precedes
the head. `next_byte_entropy` turns its logits into the H_t that entropy patching thresholds.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bltjax.kernels.kv_cache import KVCache
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
from bltjax.models.partitioning import constrain
from bltjax.tokenizer import EOS_ID, OFFSET

NEWLINE_ID = ord("\n") + OFFSET  # the byte 0x0A: where `reset_on_newline` starts a new context


class ByteLM(nn.Module):
    """``apply({'params': p}, tokens[B, N]) -> float32 logits [B, N, 260]`` for token i + 1.

    Decoding with a KV cache per layer (`bltjax.models.layers.empty_kv_caches`) runs the same
    layers: ``apply(..., method=ByteLM.prefill)`` over prompts, then ``method=ByteLM.step`` per byte.
    """

    config: ByteLMConfig

    def setup(self) -> None:
        cfg = self.config
        stack = cfg.stack
        kw = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(truncated_normal_init(stack.dim**-0.5), ("vocab", "embed")),
            (cfg.vocab_size, stack.dim),
            kw["param_dtype"],
        )
        self.transformer = Transformer(
            stack, cfg.init_std_factor, remat=cfg.remat, attention=cfg.attention, scan=cfg.scan_layers, **kw
        )
        self.final_norm = RMSNorm(stack.norm_eps, **kw)
        self.output = Linear((stack.dim,), (cfg.vocab_size,), ("embed", "vocab"), stack.dim**-0.5, **kw)

    def _embed(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding, jnp.asarray(tokens, jnp.int32), axis=0).astype(dtype_of(self.config.dtype))

    def _logits(self, x: jax.Array) -> jax.Array:
        return self.output(self.final_norm(x)).astype(jnp.float32)

    def _segments(self, tokens: jax.Array, reset_on_newline: bool, valid: jax.Array | None = None) -> jax.Array | None:
        """Attention segments: a segment ends at each EOS (document masks) and, with
        `reset_on_newline`, at each newline byte (the entropy context reset, docs/architecture.md §2.5)."""
        if not (self.config.document_mask or reset_on_newline):
            return None
        ends = tokens == EOS_ID if self.config.document_mask else jnp.zeros(tokens.shape, bool)
        if reset_on_newline:
            ends = ends | (tokens == NEWLINE_ID)
        return eos_segment_ids(ends if valid is None else ends & valid)

    def __call__(self, tokens: jax.Array, reset_on_newline: bool = False) -> jax.Array:
        tokens = jnp.asarray(tokens, jnp.int32)
        segments = self._segments(tokens, reset_on_newline)
        x = constrain(self._embed(tokens), ("batch", "length", "act_embed"))
        x = constrain(self.transformer(x, positions_like(tokens), segments), ("batch", "length", "act_embed"))
        return constrain(self._logits(x), ("batch", "length", "act_vocab"))

    def prefill(
        self, tokens_BT: jax.Array, valid_BT: jax.Array, caches: tuple[KVCache, ...], reset_on_newline: bool = False
    ) -> tuple[jax.Array, tuple[KVCache, ...]]:
        """The training call over left-aligned prompts that also fills ``caches`` with the ``valid_BT`` keys.

        Padding after a row's prompt cannot affect its real positions (causal attention).
        Returns (logits [B, T, V], caches).
        """
        segments = self._segments(tokens_BT, reset_on_newline, valid_BT)
        x, caches = self.transformer.prefill(
            self._embed(tokens_BT), positions_like(tokens_BT), segments, caches, valid_BT
        )
        return self._logits(x), caches

    def step(
        self,
        token_B: jax.Array,
        positions_B: jax.Array,
        segment_ids_B: jax.Array | None,
        caches: tuple[KVCache, ...],
        write_B: jax.Array,
    ) -> tuple[jax.Array, tuple[KVCache, ...]]:
        """One byte per row at its own position (``segment_ids_B``: its document, or None).

        Rows with ``write_B`` False keep their caches. Returns (logits [B, V], caches).
        """
        x, caches = self.transformer.step(self._embed(token_B), positions_B, segment_ids_B, caches, write_B)
        return self._logits(x), caches


def next_byte_entropy(logits: jax.Array) -> jax.Array:
    """H_t = -sum_v p_t(v) ln p_t(v) over all 260 ids, in nats and float32 (docs/architecture.md §2.1)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
