"""Local encoder: bytes -> byte states and k patch vectors per patch (docs/architecture.md §6).

A light byte transformer (sliding-window attention) whose states are pooled per patch into
queries that then cross-attend to the bytes of their own patch. The pooled-query init, the
double residual and the own-patch window are those of the released checkpoints. With that
window the cross-attention is a per-patch softmax over gathered queries (`kernels.cross`),
never a [P*k, N] mask; wider windows use the dense mask.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bltjax.models.configs import BLTConfig
from bltjax.models.hash_embed import HashNgramEmbedding
from bltjax.models.layers import (
    CrossAttention,
    Linear,
    TransformerBlock,
    cross_attention_residual,
    depth_factor,
    dtype_of,
    stacked_blocks,
    truncated_normal_init,
    unbound_block,
)
from bltjax.models.partitioning import constrain
from bltjax.models.remat import rematerialise
from bltjax.models.scan import scan_stacked


def pool_patches(x_BNE: jax.Array, pid_BN: jax.Array, n_patches: int, mode: str) -> jax.Array:
    """Element-wise max / mean / min of each patch's byte states, [B, P, E]; empty patch -> 0."""
    b, _, e = x_BNE.shape
    rows = jnp.arange(b)[:, None]
    counts = jnp.zeros((b, n_patches), jnp.int32).at[rows, pid_BN].add(1)
    empty = (counts == 0)[..., None]
    if mode == "max":
        pooled = jnp.full((b, n_patches, e), -jnp.inf, x_BNE.dtype).at[rows, pid_BN].max(x_BNE)
    elif mode == "min":
        pooled = jnp.full((b, n_patches, e), jnp.inf, x_BNE.dtype).at[rows, pid_BN].min(x_BNE)
    elif mode == "avg":
        sums = jnp.zeros((b, n_patches, e), x_BNE.dtype).at[rows, pid_BN].add(x_BNE)
        pooled = sums / jnp.maximum(counts, 1)[..., None].astype(x_BNE.dtype)
    else:
        raise ValueError(f"pooling: expected 'max', 'avg' or 'min', got {mode!r}")
    return jnp.where(empty, 0.0, pooled)


def encoder_cross_attn_mask(pid_BN: jax.Array, n_patches: int, k: int, window: int) -> jax.Array:
    """[B, P*k, N]: slot q (patch q // k) sees token i iff pid(i) <= q // k < pid(i) + window."""
    slot_patch = jnp.arange(n_patches * k, dtype=jnp.int32) // k
    pid = pid_BN[:, None, :]
    own = slot_patch[None, :, None]
    return (pid <= own) & (own < pid + window)


def encoder_cross_layers(config: BLTConfig) -> tuple[int, ...]:
    """Encoder layers followed by a cross-attention: every layer, or only the last one."""
    n = config.encoder.n_layers
    return tuple(i for i in range(n) if config.cross_attn_all_layers_encoder or i == n - 1)


def encoder_pooling_layers(config: BLTConfig) -> tuple[int, ...]:
    """Cross-attention layers at which the patch queries are (re-)initialised by pooling."""
    layers = encoder_cross_layers(config)
    return layers if config.repool_every_cross_attn_layer else layers[:1]


class LocalEncoder(nn.Module):
    """Returns (byte states h_enc [B, N, E], patch slots Z [B, P*k, E]).

    Decoding drives its parts: `embed`, ``layers[i]`` (`TransformerBlock`),
    ``cross_attention[i]`` (`CrossAttention`, for i in `encoder_cross_layers`) and `patch_queries`.
    """

    config: BLTConfig

    def setup(self) -> None:
        cfg = self.config
        stack = cfg.encoder
        e, k = stack.dim, cfg.cross_attn_k
        kw = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        self.byte_embedding = self.param(
            "byte_embedding",
            nn.with_logical_partitioning(truncated_normal_init(e**-0.5), ("vocab", "embed")),
            (cfg.vocab_size, e),
            kw["param_dtype"],
        )
        if cfg.num_hash_tables:
            self.hash_embedding = HashNgramEmbedding(
                cfg.num_hash_tables, cfg.hash_vocab, e, kw["param_dtype"], cfg.hash_rows_multiple
            )
        # The cross-attentions are rematerialised like the blocks.
        block, cross_attention = (rematerialise(c, cfg.remat) for c in (TransformerBlock, CrossAttention))
        if cfg.scan_layers and cfg.cross_attn_all_layers_encoder:
            raise ValueError(
                "config.model.cross_attn_all_layers_encoder: expected False with scan_layers=True (the patch "
                "queries are pooled between the encoder's layers, so its layers are not identical)"
            )
        if cfg.scan_layers:  # one stacked `layers` sub-tree; the cross-attention follows the last block
            self.stacked_layers = stacked_blocks(self, stack, cfg.init_std_factor, attention=cfg.attention, **kw)
        else:
            self.layers = [
                block(stack, i, cfg.init_std_factor, implementation=cfg.attention, **kw) for i in range(stack.n_layers)
            ]
        heads, kv_heads = (cfg.cross_attn_heads, None) if cfg.cross_attn_heads else (stack.n_heads, stack.kv_heads)
        self.cross_attention = {
            i: cross_attention(
                e,
                heads,
                e**-0.5 / depth_factor(cfg.init_std_factor, i, stack.n_layers, e),
                stack.norm_eps,
                kv_heads,
                attention=cfg.attention,
                slots_per_patch=k,
                **kw,
            )
            for i in encoder_cross_layers(cfg)
        }
        self.patch_projection = Linear((e,), (k * e,), ("embed", "patch_slots"), e**-0.5, **kw)

    def embed(self, tokens: jax.Array, hash_ids: jax.Array) -> jax.Array:
        """Byte embedding plus hash n-gram embeddings (§4.2); ``hash_ids`` is [tables, *tokens.shape]."""
        cfg = self.config
        x = jnp.take(self.byte_embedding, tokens, axis=0)
        if cfg.num_hash_tables:
            x = x + self.hash_embedding(hash_ids)
            if cfg.hash_normalize:
                x = x / (len(cfg.hash_sizes) + 1)
        return x.astype(dtype_of(cfg.dtype))

    def patch_queries(self, pooled_BPE: jax.Array) -> jax.Array:
        """The k query slots of each pooled patch: [B, P, E] -> [B, P*k, E]."""
        b, p, e = pooled_BPE.shape
        return self.patch_projection(pooled_BPE).reshape(b, p * self.config.cross_attn_k, e)

    def __call__(
        self,
        tokens_BN: jax.Array,
        hash_ids_TBN: jax.Array,
        positions_BN: jax.Array,
        segment_ids_BN: jax.Array | None,
        pid_BN: jax.Array,
        n_patches: int,
    ) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        x = constrain(self.embed(tokens_BN, hash_ids_TBN), ("batch", "length", "act_embed"))
        self.sow("intermediates", "encoder_input_embeds", x)
        embeddings = x

        if cfg.cross_attn_window_encoder == 1:
            cross = dict(key_patch_BS=pid_BN)
        else:
            cross = dict(
                mask_BTS=encoder_cross_attn_mask(pid_BN, n_patches, cfg.cross_attn_k, cfg.cross_attn_window_encoder)
            )
        slots = None
        for i, block_output in self._block_outputs(x, positions_BN, segment_ids_BN):
            x = block_output
            if i not in self.cross_attention:
                continue
            if slots is None or cfg.repool_every_cross_attn_layer:
                source = embeddings if cfg.patch_query_init == "embedding" else x
                # The pooling scatter and the query gather lose the batch split unless it is named.
                pooled = constrain(
                    pool_patches(source, pid_BN, n_patches, cfg.pooling), ("batch", "patches", "act_embed")
                )
                slots = constrain(self.patch_queries(pooled), ("batch", "patches", "act_embed"))
            attended = self.cross_attention[i](slots, x, **cross)
            slots = cross_attention_residual(slots, attended, cfg.double_cross_attn_residual)
            slots = constrain(slots, ("batch", "patches", "act_embed"))
        return x, slots

    def _block_outputs(self, x: jax.Array, positions_BN: jax.Array, segment_ids_BN: jax.Array | None) -> list:
        """(layer index, output) of the blocks a cross-attention may follow: every one, or the last when scanned."""
        cfg = self.config
        constrained = lambda y: constrain(y, ("batch", "length", "act_embed"))  # noqa: E731
        if cfg.scan_layers:
            stack = cfg.encoder
            dtypes = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
            block = unbound_block(stack, 0, cfg.init_std_factor, *dtypes, cfg.attention)

            def body(y, params):
                return constrained(block.apply({"params": params}, y, positions_BN, segment_ids_BN))

            return [(stack.n_layers - 1, scan_stacked(body, x, self.stacked_layers, cfg.remat))]
        outputs = []
        for i, layer in enumerate(self.layers):
            x = constrained(layer(x, positions_BN, segment_ids_BN))
            outputs.append((i, x))
        return outputs
