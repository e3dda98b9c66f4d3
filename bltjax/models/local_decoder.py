"""Local decoder: byte states + global outputs -> next-byte logits (spec §8).

Every byte reads the k key/value slots of the global output dpid(i) (the patch *before* the
one holding its target), then runs a light sliding-window byte transformer. With the default
own-patch window the cross-attention is a softmax over k gathered keys, never an N x P*k mask.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bltjax.models.configs import BLTConfig
from bltjax.models.layers import CrossAttention, Linear, RMSNorm, TransformerBlock, depth_factor, dtype_of
from bltjax.models.remat import rematerialise


class LocalDecoder(nn.Module):
    """Returns float32 logits [B, N, vocab]."""

    config: BLTConfig

    @nn.compact
    def __call__(
        self,
        byte_states_BNE: jax.Array,
        global_BPG: jax.Array,
        positions_BN: jax.Array,
        segment_ids_BN: jax.Array | None,
        dpid_BN: jax.Array,
    ) -> jax.Array:
        cfg = self.config
        stack = cfg.decoder
        e, k = stack.dim, cfg.cross_attn_k
        b, p, g = global_BPG.shape
        kw = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        slots = Linear((g,), (k * e,), ("embed", "patch_slots"), g**-0.5, name="patch_projection", **kw)(global_BPG)
        slots = slots.reshape(b, p * k, e)

        window = cfg.cross_attn_window_decoder
        if window == 1:
            gather_index = dpid_BN[:, :, None] * k + jnp.arange(k, dtype=jnp.int32)
            cross = dict(gather_index_BTR=gather_index)
        else:
            slot_patch = (jnp.arange(p * k, dtype=jnp.int32) // k)[None, None, :]
            dpid = dpid_BN[:, :, None]
            cross = dict(mask_BTS=(slot_patch <= dpid) & (dpid < slot_patch + window))

        heads, kv_heads = (cfg.cross_attn_heads, None) if cfg.cross_attn_heads else (stack.n_heads, stack.kv_heads)
        # The cross-attentions are rematerialised like the blocks.
        block, cross_attention = (rematerialise(c, cfg.remat) for c in (TransformerBlock, CrossAttention))
        x = byte_states_BNE
        for i in range(stack.n_layers):
            if cfg.cross_attn_all_layers_decoder or i == 0:
                f = depth_factor(cfg.init_std_factor, i, stack.n_layers, e)
                kind = dict(attention=cfg.attention, name=f"cross_attention_{i}", **kw)
                updated = cross_attention(e, heads, e**-0.5 / f, stack.norm_eps, kv_heads, **kind)(x, slots, **cross)
                x = x + updated if cfg.double_cross_attn_residual else updated
            layer = block(stack, i, cfg.init_std_factor, attention=cfg.attention, name=f"layers_{i}", **kw)
            x = layer(x, positions_BN, segment_ids_BN)
        x = RMSNorm(stack.norm_eps, name="final_norm", **kw)(x)
        self.sow("intermediates", "decoder_output", x)
        logits = Linear((e,), (cfg.vocab_size,), ("embed", "vocab"), e**-0.5, name="output", **kw)(x)
        return logits.astype(jnp.float32)
