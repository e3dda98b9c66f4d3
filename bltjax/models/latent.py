"""Global (latent) transformer over patches (docs/architecture.md §7): where almost all of BLT's FLOPs go.

It sees one vector per patch (the k encoder slots concatenated), attends block-causally by
document, and has no final norm: the local decoder normalises what it reads.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from bltjax.models.configs import BLTConfig
from bltjax.models.layers import Linear, Transformer, dtype_of
from bltjax.models.partitioning import constrain


class LatentTransformer(nn.Module):
    """[B, P, k*E_enc] patch vectors -> [B, P, E_global] global outputs.

    Decoding drives `project_in` and ``transformer`` (a `Transformer`, with its KV-cache methods).
    """

    config: BLTConfig

    def setup(self) -> None:
        cfg = self.config
        kw = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        width_in = cfg.cross_attn_k * cfg.encoder.dim
        if width_in != cfg.latent.dim:  # W_in exists only when k * h_E != h_G
            self.input_projection = Linear(
                (width_in,), (cfg.latent.dim,), ("patch_slots", "embed"), width_in**-0.5, **kw
            )
        self.transformer = Transformer(
            cfg.latent, cfg.init_std_factor, remat=cfg.remat, attention=cfg.attention, scan=cfg.scan_layers, **kw
        )

    def project_in(self, patches_PX: jax.Array) -> jax.Array:
        """W_in (when it exists) on patch vectors [..., k*E_enc] -> [..., E_global]."""
        if self.config.cross_attn_k * self.config.encoder.dim != self.config.latent.dim:
            return self.input_projection(patches_PX)
        return patches_PX.astype(dtype_of(self.config.dtype))

    def __call__(self, patches_BPX: jax.Array, positions_BP: jax.Array, segment_ids_BP: jax.Array | None) -> jax.Array:
        # The stack's boundaries are named so the scanned / unrolled layers inherit the batch split.
        x = constrain(self.project_in(patches_BPX), ("batch", "patches", "act_embed"))
        return constrain(self.transformer(x, positions_BP, segment_ids_BP), ("batch", "patches", "act_embed"))
