r"""The entropy model: a small causal byte LM whose next-byte entropy places patch boundaries.

  python -m bltjax.describe --config experiments/entropy_model.py:released

Variants:
  released  the shape of facebook/blt-entropy (docs/architecture.md §2.2): 14 layers x 768, 12 heads,
            window 512, RoPE theta 10000, 8 KiB rows (the paper's text says width 512).
  tiny      a 2-layer, 64-wide model for tests and the CPU demo.
"""

from bltjax.config import base_byte_lm_config, stack_config

VARIANTS = {
    # name: (dim, layers, heads, window, seq_len, batch)
    "released": (768, 14, 12, 512, 8192, 64),
    "tiny": (64, 2, 4, 64, 128, 4),
}


def get_config(arg: str | None = None):
    variant = arg or "released"
    if variant not in VARIANTS:
        raise ValueError(
            f"experiments/entropy_model.py: unknown variant {variant!r}; expected one of {sorted(VARIANTS)}"
        )
    dim, layers, heads, window, seq_len, batch = VARIANTS[variant]
    config = base_byte_lm_config()
    config.model.stack = stack_config(dim, layers, heads, window=window, rope_theta=10000.0)
    config.data.seq_len = seq_len
    config.data.batch_size = batch
    return config
