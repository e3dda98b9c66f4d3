"""Local decoder: byte states + global outputs -> next-byte logits (docs/architecture.md §8).

Every byte reads the k key/value slots of the global output dpid(i) (the patch *before* the
one holding its target), then runs a light sliding-window byte transformer. With the default
own-patch window the cross-attention is a softmax over k gathered keys, never an N x P*k mask.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bltjax.models.configs import BLTConfig
from bltjax.models.layers import (
    CrossAttention,
    Linear,
    RMSNorm,
    TransformerBlock,
    cross_attention_residual,
    depth_factor,
    dtype_of,
    stacked_blocks,
    unbound_block,
)
from bltjax.models.partitioning import constrain
from bltjax.models.remat import rematerialise
from bltjax.models.scan import scan_stacked, stacked_parameters


def decoder_cross_layers(config: BLTConfig) -> tuple[int, ...]:
    """Decoder layers preceded by a cross-attention: every layer, or only the first one."""
    return tuple(i for i in range(config.decoder.n_layers) if config.cross_attn_all_layers_decoder or i == 0)


class LocalDecoder(nn.Module):
    """Returns float32 logits [B, N, vocab].

    Decoding drives its parts: `patch_slots`, ``cross_attention[i]`` (`CrossAttention`, for i
    in `decoder_cross_layers`), ``layers[i]`` (`TransformerBlock`) and `logits`.
    """

    config: BLTConfig

    def setup(self) -> None:
        cfg = self.config
        stack = cfg.decoder
        e, k, g = stack.dim, cfg.cross_attn_k, cfg.latent.dim
        kw = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        self.patch_projection = Linear((g,), (k * e,), ("embed", "patch_slots"), g**-0.5, **kw)
        # The cross-attentions are rematerialised like the blocks.
        block, remat_cross = (rematerialise(c, cfg.remat) for c in (TransformerBlock, CrossAttention))
        crossed = decoder_cross_layers(cfg)
        if cfg.scan_layers:
            # One stacked `layers` sub-tree; with a cross-attention before every block, a stacked
            # `cross_attention` sub-tree too, scanned with the blocks; otherwise the one before block 0.
            self.stacked_layers = stacked_blocks(self, stack, cfg.init_std_factor, attention=cfg.attention, **kw)
            if cfg.cross_attn_all_layers_decoder:
                crosses = [self._cross(i, parent=None) for i in crossed]
                example = lambda: (jnp.zeros((1, 1, e), kw["dtype"]),) * 2 + (jnp.ones((1, 1, 1), bool),)  # noqa: E731
                self.stacked_cross = stacked_parameters(
                    self, "cross_attention", crosses, [c.std for c in crosses], example
                )
                crossed = ()
        else:
            self.layers = [
                block(stack, i, cfg.init_std_factor, implementation=cfg.attention, **kw) for i in range(stack.n_layers)
            ]
        self.cross_attention = {i: self._cross(i, remat_cross) for i in crossed}
        self.final_norm = RMSNorm(stack.norm_eps, **kw)
        self.output = Linear((e,), (cfg.vocab_size,), ("embed", "vocab"), e**-0.5, **kw)

    def _cross(self, i: int, module_class: type[CrossAttention] = CrossAttention, **parent) -> CrossAttention:
        """The cross-attention before block ``i`` (``parent=None``: unbound, for stacked parameters)."""
        cfg, stack = self.config, self.config.decoder
        e = stack.dim
        heads, kv_heads = (cfg.cross_attn_heads, None) if cfg.cross_attn_heads else (stack.n_heads, stack.kv_heads)
        return module_class(
            e,
            heads,
            e**-0.5 / depth_factor(cfg.init_std_factor, i, stack.n_layers, e),
            stack.norm_eps,
            kv_heads,
            attention=cfg.attention,
            dtype=dtype_of(cfg.dtype),
            param_dtype=dtype_of(cfg.param_dtype),
            **parent,
        )

    def _cross_residual(self, x: jax.Array, attended: jax.Array) -> jax.Array:
        return cross_attention_residual(x, attended, self.config.double_cross_attn_residual)

    def patch_slots(self, global_PG: jax.Array) -> jax.Array:
        """D_C · O: the k key/value slots of each global output, [..., G] -> [..., k, E]."""
        slots = self.patch_projection(global_PG)
        return slots.reshape(slots.shape[:-1] + (self.config.cross_attn_k, self.config.decoder.dim))

    def logits(self, x: jax.Array) -> jax.Array:
        """Final norm and output projection: float32 logits."""
        x = self.final_norm(x)
        self.sow("intermediates", "decoder_output", x)
        return self.output(x).astype(jnp.float32)

    def __call__(
        self,
        byte_states_BNE: jax.Array,
        global_BPG: jax.Array,
        positions_BN: jax.Array,
        segment_ids_BN: jax.Array | None,
        dpid_BN: jax.Array,
    ) -> jax.Array:
        cfg = self.config
        k = cfg.cross_attn_k
        b, p, _ = global_BPG.shape
        slots = constrain(
            self.patch_slots(global_BPG).reshape(b, p * k, cfg.decoder.dim), ("batch", "patches", "act_embed")
        )

        window = cfg.cross_attn_window_decoder
        if window == 1:
            gather_index = dpid_BN[:, :, None] * k + jnp.arange(k, dtype=jnp.int32)
            cross = dict(gather_index_BTR=constrain(gather_index, ("batch", "length", None)))
        else:
            slot_patch = (jnp.arange(p * k, dtype=jnp.int32) // k)[None, None, :]
            dpid = dpid_BN[:, :, None]
            cross = dict(mask_BTS=(slot_patch <= dpid) & (dpid < slot_patch + window))

        constrained = lambda y: constrain(y, ("batch", "length", "act_embed"))  # noqa: E731
        x = byte_states_BNE
        if cfg.scan_layers:
            return constrain(
                self.logits(self._scanned(x, slots, cross, positions_BN, segment_ids_BN)),
                ("batch", "length", "act_vocab"),
            )
        for i, layer in enumerate(self.layers):
            if i in self.cross_attention:
                x = constrained(self._cross_residual(x, self.cross_attention[i](x, slots, **cross)))
            x = constrained(layer(x, positions_BN, segment_ids_BN))
        return constrain(self.logits(x), ("batch", "length", "act_vocab"))

    def _scanned(self, x, slots, cross: dict, positions_BN, segment_ids_BN) -> jax.Array:
        """The layers of a scanned decoder: cross-attention and block per layer, as one `lax.scan`."""
        cfg = self.config
        constrained = lambda y: constrain(y, ("batch", "length", "act_embed"))  # noqa: E731
        block = unbound_block(
            cfg.decoder, 0, cfg.init_std_factor, dtype_of(cfg.dtype), dtype_of(cfg.param_dtype), cfg.attention
        )
        run_block = lambda y, params: constrained(block.apply({"params": params}, y, positions_BN, segment_ids_BN))  # noqa: E731
        if not cfg.cross_attn_all_layers_decoder:
            x = constrained(self._cross_residual(x, self.cross_attention[0](x, slots, **cross)))
            return scan_stacked(run_block, x, self.stacked_layers, cfg.remat)

        def body(y, params):
            cross_params, block_params = params
            y = constrained(
                self._cross_residual(y, self._cross(0, parent=None).apply({"params": cross_params}, y, slots, **cross))
            )
            return run_block(y, block_params)

        return scan_stacked(body, x, (self.stacked_cross, self.stacked_layers), cfg.remat)
