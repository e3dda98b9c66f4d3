r"""Llama-style byte-level baselines: every byte is a "patch" (the paper's byte baseline).

  python -m bltjax.describe --config experiments/byte_lm.py:400m

Variants (full causal attention over the row, RoPE theta 500000):
  tiny   2 x 128, 4 heads: tests.
  debug  8 x 512, 8 heads: CPU smoke runs.
  400m   24 x 1280, 10 heads: the global model of BLT-400M run over bytes.
  1b     25 x 2048, 16 heads: the global model of BLT-1B run over bytes.
"""

from bltjax.config import base_byte_lm_config, stack_config

VARIANTS = {
    # name: (dim, layers, heads, seq_len, batch)
    "tiny": (128, 2, 4, 128, 4),
    "debug": (512, 8, 8, 1024, 8),
    "400m": (1280, 24, 10, 8192, 256),
    "1b": (2048, 25, 16, 8192, 256),
}


def get_config(arg: str | None = None):
    variant = arg or "tiny"
    if variant not in VARIANTS:
        raise ValueError(f"experiments/byte_lm.py: unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    dim, layers, heads, seq_len, batch = VARIANTS[variant]
    config = base_byte_lm_config()
    config.model.stack = stack_config(dim, layers, heads, rope_theta=500000.0)
    config.data.seq_len = seq_len
    config.data.batch_size = batch
    return config
