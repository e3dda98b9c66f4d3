r"""The entropy model: a small causal byte LM whose next-byte entropy places patch boundaries.

  python -m bltjax.train --config experiments/entropy_model.py:released --workdir WORKDIR
  python -m bltjax.train --config experiments/entropy_model.py:tiny --workdir WORKDIR

Variants:
  released  the shape of facebook/blt-entropy (spec §2.2): 14 layers x 768, 12 heads,
            window 512, RoPE theta 10000, 8 KiB rows (the paper's text says width 512).
  tiny      a 2-layer, 64-wide model for tests and the CPU demo.
"""

from bltjax.config import base_byte_lm_config, stack_config


def get_config(arg: str | None = None):
    variant = arg or "released"
    config = base_byte_lm_config()
    if variant == "released":
        config.model.stack = stack_config(768, 14, 12, window=512, rope_theta=10000.0)
        config.data.seq_len = 8192
        config.data.batch_size = 64
    elif variant == "tiny":
        config.model.stack = stack_config(64, 2, 4, window=64, rope_theta=10000.0)
        config.data.seq_len = 128
        config.data.batch_size = 4
    else:
        raise ValueError(f"experiments/entropy_model.py: unknown variant {variant!r}; expected 'released' or 'tiny'")
    return config
