r"""The README's main job: a tiny entropy model, then a tiny entropy-patched BLT, on 2 CPU cores.

  python -m bltjax.quickstart --workdir runs/quickstart     (runs every stage below)
  python -m bltjax.train --config experiments/quickstart.py:entropy --workdir W --config.data.path=DATA
  python -m bltjax.train --config experiments/quickstart.py:blt --workdir W --config.data.path=DATA \
      --config.patching.threshold=THETA

Variants (sized so that the whole job finishes in about 10 minutes on 2 CPU cores):
  entropy  a 2-layer, 96-wide byte LM with a 128-byte window: the patcher (docs/architecture.md §2).
  blt      local width 96 (1 encoder / 2 decoder layers, window 128), global 192 x 3 layers,
           k = 2, hash n-grams 3..6, entropy patching at a mean of about 4.5 bytes.
"""

from bltjax.config import base_blt_config, base_byte_lm_config, stack_config


def _schedule(config, steps: int, lr: float, warmup: int):
    config.train.steps = steps
    config.train.log_every = 10
    config.train.eval_every = steps // 2
    config.train.eval_batches = 8
    config.train.checkpoint_every = 50
    config.optimizer.learning_rate = lr
    config.optimizer.warmup_steps = warmup
    config.optimizer.final_lr_ratio = 0.1
    return config


def entropy_config():
    config = base_byte_lm_config()
    config.model.stack = stack_config(96, 2, 4, window=128, rope_theta=10000.0)
    config.data.seq_len = 256
    config.data.batch_size = 16
    return _schedule(config, steps=200, lr=3e-3, warmup=20)


def blt_config():
    config = base_blt_config()
    config.model.encoder = stack_config(96, 1, 4, window=128)
    config.model.latent = stack_config(192, 3, 4)
    config.model.decoder = stack_config(96, 2, 4, window=128)
    config.model.cross_attn_k = 2
    config.model.hash_sizes = [3, 4, 5, 6]
    config.model.hash_vocab = 8192
    config.patching.mode = "entropy"
    config.patching.threshold = 2.0  # the quickstart replaces it with the calibrated value
    config.patching.patch_size = 4.5
    config.data.seq_len = 512
    config.data.batch_size = 8
    config.data.max_patches = 192
    return _schedule(config, steps=250, lr=2e-3, warmup=25)


VARIANTS = {"entropy": entropy_config, "blt": blt_config}


def get_config(arg: str | None = None):
    variant = arg or "blt"
    if variant not in VARIANTS:
        raise ValueError(f"experiments/quickstart.py: unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    return VARIANTS[variant]()
