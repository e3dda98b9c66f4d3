"""Global (latent) transformer over patches (spec §7): where almost all of BLT's FLOPs go.

It sees one vector per patch (the k encoder slots concatenated), attends block-causally by
document, and has no final norm: the local decoder normalises what it reads.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from bltjax.models.configs import BLTConfig
from bltjax.models.layers import Linear, Transformer, dtype_of


class LatentTransformer(nn.Module):
    """[B, P, k*E_enc] patch vectors -> [B, P, E_global] global outputs."""

    config: BLTConfig

    @nn.compact
    def __call__(self, patches_BPX: jax.Array, positions_BP: jax.Array, segment_ids_BP: jax.Array | None) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        width_in = patches_BPX.shape[-1]
        x = patches_BPX
        if width_in != cfg.latent.dim:  # W_in exists only when k * h_E != h_G
            x = Linear(
                (width_in,), (cfg.latent.dim,), ("patch_slots", "embed"), width_in**-0.5, name="input_projection", **kw
            )(x)
        stack = Transformer(
            cfg.latent, cfg.init_std_factor, remat=cfg.remat, attention=cfg.attention, name="transformer", **kw
        )
        return stack(x, positions_BP, segment_ids_BP)
