r"""A tiny BLT for tests: runs in seconds on one CPU core.

  python -m bltjax.train --config experiments/blt_tiny.py --workdir runs/tiny --config.data.path=DATA

Same architecture as the released models (hash n-grams, k = 2 pooled slots, double-residual
cross-attention, sliding-window local stacks), shrunk: local width 64, global width 128.
"""

from bltjax.config import base_blt_config, stack_config


def get_config(arg: str | None = None):
    del arg
    config = base_blt_config()
    config.model.encoder = stack_config(64, 1, 4, window=32)
    config.model.latent = stack_config(128, 2, 4)
    config.model.decoder = stack_config(64, 2, 4, window=32)
    config.model.cross_attn_k = 2
    config.model.hash_sizes = [3, 4, 5]
    config.model.hash_vocab = 1024
    config.patching.mode = "space"
    config.patching.threshold = None
    config.data.seq_len = 128
    config.data.batch_size = 4
    config.data.max_patches = 64
    return config
