r"""Llama-style token-level baselines over byte-level BPE ids: the paper's BPE baseline.

  python -m bltjax.bpe --data DATA --vocab-size 4096
  python -m bltjax.train --config experiments/token_lm.py:tiny --workdir runs/token \
      --config.data.path=DATA/bpe-4096

``data.seq_len`` counts tokens; ``model.vocab_size`` is the token folder's BPE ids + 4 (4100 for
``--vocab-size 4096``; set --config.model.vocab_size for another). Bits per byte divide by the
bytes the tokens cover (bltjax/training/token_metrics.py), so they compare with the byte LM's.

Variants (full causal attention over the row, RoPE theta 500000):
  tiny   2 x 128, 4 heads, 64 tokens per row: tests.
  debug  8 x 512, 8 heads, 256 tokens per row: CPU smoke runs.
  400m   24 x 1280, 10 heads, 2048 tokens per row: BLT-400M's global model over tokens.
  1b     25 x 2048, 16 heads, 2048 tokens per row: BLT-1B's global model over tokens.
"""

from bltjax.config import base_token_lm_config, stack_config

VARIANTS = {
    # name: (dim, layers, heads, seq_len in tokens, batch)
    "tiny": (128, 2, 4, 64, 4),
    "debug": (512, 8, 8, 256, 8),
    "400m": (1280, 24, 10, 2048, 256),
    "1b": (2048, 25, 16, 2048, 256),
}


def get_config(arg: str | None = None):
    variant = arg or "tiny"
    if variant not in VARIANTS:
        raise ValueError(f"experiments/token_lm.py: unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    dim, layers, heads, seq_len, batch = VARIANTS[variant]
    config = base_token_lm_config()
    config.model.stack = stack_config(dim, layers, heads, rope_theta=500000.0)
    config.data.seq_len = seq_len
    config.data.batch_size = batch
    return config
