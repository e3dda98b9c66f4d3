r"""The official debug/test shape (docs/architecture.md §15.3): a small but complete BLT for smoke runs.

  python -m bltjax.describe --config experiments/blt_debug.py

Global 512 x 8 layers, local 256 x 8 layers each, k = 8 slots, cross-attention in every local
layer with a 512-patch window, hash n = 4 with 3 functions of 50002 rows, space patching.
"""

from bltjax.config import base_blt_config, stack_config


def get_config(arg: str | None = None):
    del arg
    config = base_blt_config()
    config.model.encoder = stack_config(256, 8, 8, window=512)
    config.model.latent = stack_config(512, 8, 8)
    config.model.decoder = stack_config(256, 8, 8, window=512)
    config.model.cross_attn_k = 8
    config.model.cross_attn_heads = 4
    config.model.cross_attn_all_layers_encoder = True
    config.model.cross_attn_all_layers_decoder = True
    config.model.cross_attn_window_encoder = 512
    config.model.cross_attn_window_decoder = 512
    config.model.hash_sizes = [4]
    config.model.hash_functions = 3
    config.model.hash_vocab = 50002
    config.patching.mode = "space"
    config.patching.threshold = None
    config.patching.patch_size = 6
    config.data.seq_len = 12288
    config.data.max_patches = 4096
    config.data.batch_size = 2
    return config
