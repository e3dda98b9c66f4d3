r"""The MegaByte baseline (docs/architecture.md §19): fixed patches, s - 1 BOE prefix, concatenation pooling.

  python -m bltjax.train --config experiments/megabyte.py:tiny --workdir runs/megabyte \
      --config.data.path=DATA
  python -m bltjax.flops --config experiments/megabyte.py:sweep

Same trainer, data pipeline (byte rows, no patch lengths, no sidecars) and `python -m bltjax.eval`
as every other model. Variants:
  tiny   local width 64, global 128 x 2, s = 4, seq_len 128: tests.
  sweep  the shapes of experiments/patch_sweep.py's BLT (local 64, 1 + 1 layers, window 64;
         global 192 x 3), s = 4, seq_len 256, batch 8: a MegaByte row next to the static BLT's.
"""

from bltjax.config import base_megabyte_config, stack_config

VARIANTS = {
    # name: (local dim, local heads, local window, global dim, global layers, global heads, decoder layers,
    #        patch size, seq_len, batch)
    "tiny": (64, 4, 32, 128, 2, 4, 2, 4, 128, 4),
    "sweep": (64, 4, 64, 192, 3, 6, 1, 4, 256, 8),
}


def get_config(arg: str | None = None):
    variant = arg or "tiny"
    if variant not in VARIANTS:
        raise ValueError(f"experiments/megabyte.py: unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    e, heads, window, g, g_layers, g_heads, d_layers, s, seq_len, batch = VARIANTS[variant]
    config = base_megabyte_config()
    config.model.encoder = stack_config(e, 1, heads, window=window)
    config.model.latent = stack_config(g, g_layers, g_heads)
    config.model.decoder = stack_config(e, d_layers, heads, window=window)
    config.model.patch_size = s
    config.data.seq_len = seq_len
    config.data.batch_size = batch
    if variant == "sweep":
        config.train.steps = 240
        config.train.log_every = 10
        config.train.eval_every = 60
        config.train.eval_batches = 8
        config.train.checkpoint_every = 60
        config.optimizer.learning_rate = 2e-3
        config.optimizer.warmup_steps = 20
        config.optimizer.final_lr_ratio = 0.1
    return config
