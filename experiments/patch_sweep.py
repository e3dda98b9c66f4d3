r"""A patch-size sweep small enough for 2 CPU cores: entropy vs space vs static patching, and bytes.

  python -m bltjax.sweep plan --sweep experiments/patch_sweep.py --out runs/patch_sweep
  python -m bltjax.sweep run runs/patch_sweep
  python -m bltjax.sweep report runs/patch_sweep
  python -m bltjax.flops --config experiments/patch_sweep.py:blt --patch-size 6

Eight runs at one inference budget (BUDGET forward FLOPs per byte, what the base BLT spends at
a mean patch of 4 bytes) and one training budget each (STEPS steps of 8 rows x 256 bytes at that
budget): entropy patching at mean patch sizes 4 / 6 / 8 (thresholds calibrated on the tiny
entropy model's sidecars), static patching at 4 / 6 / 8, space patching (its mean is the
data's, about 6.3 on this corpus) and a byte-level baseline. Every BLT's latent model is
resized to spend the budget (bltjax/sweep/scaling.py), so larger patches get a larger latent.

Variants (the configs the sweep starts from):
  blt      local width 64 (1 encoder / 1 decoder layer, window 64), global 192 x 3 at patch size 4,
           k = 2, hash n-grams 3..5; seq_len 256, batch 8.
  byte     the byte-level baseline's starting shape (its stack is refitted to the budget).
  entropy  the patcher: a 2-layer, 64-wide byte LM with a 64-byte window, 150 steps.

Time on 2 shared CPU cores: see docs/sweeps.md (measured per-step times and the estimate).
"""

from ml_collections import ConfigDict

from bltjax.config import base_blt_config, base_byte_lm_config, stack_config

SEQ_LEN = 256
BATCH = 8
STEPS = 240
# The base BLT at a mean patch of 4 bytes: python -m bltjax.flops --config experiments/patch_sweep.py:blt --patch-size 4
BUDGET = 1.0e6
# English prose and Python code. Not the Chinese poems: a tiny entropy model finds almost every
# CJK byte surprising, so those rows hold 3-4x the patches of the others and would need 3-4x the
# patch columns (or be truncated by the pipeline).
CORPUS = ["en_jargon_file_excerpt.jsonl", "en_fortunes.jsonl", "code_python_stdlib.jsonl"]


def _schedule(config, steps: int, lr: float, warmup: int):
    config.train.steps = steps
    config.train.log_every = 10
    config.train.eval_every = steps // 4
    config.train.eval_batches = 8
    config.train.checkpoint_every = steps // 4
    config.optimizer.learning_rate = lr
    config.optimizer.warmup_steps = warmup
    config.optimizer.final_lr_ratio = 0.1
    return config


def blt_config():
    config = base_blt_config()
    config.model.encoder = stack_config(64, 1, 4, window=64)
    config.model.latent = stack_config(192, 3, 6)
    config.model.decoder = stack_config(64, 1, 4, window=64)
    config.model.cross_attn_k = 2
    config.model.hash_sizes = [3, 4, 5]
    config.model.hash_vocab = 4096
    config.patching.mode = "static"
    config.patching.threshold = None
    config.patching.patch_size = 4.0
    config.data.seq_len = SEQ_LEN
    config.data.batch_size = BATCH
    config.data.max_patches = 65
    return _schedule(config, steps=STEPS, lr=2e-3, warmup=20)


def byte_config():
    config = base_byte_lm_config()
    config.model.stack = stack_config(128, 2, 4, rope_theta=500000.0)
    config.data.seq_len = SEQ_LEN
    config.data.batch_size = BATCH
    return _schedule(config, steps=STEPS, lr=2e-3, warmup=20)


def entropy_config():
    config = base_byte_lm_config()
    config.model.stack = stack_config(64, 2, 4, window=64, rope_theta=10000.0)
    config.data.seq_len = 256
    config.data.batch_size = 16
    return _schedule(config, steps=150, lr=3e-3, warmup=15)


VARIANTS = {"blt": blt_config, "byte": byte_config, "entropy": entropy_config}


def get_config(arg: str | None = None):
    variant = arg or "blt"
    if variant not in VARIANTS:
        raise ValueError(f"experiments/patch_sweep.py: unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    return VARIANTS[variant]()


def get_sweep(arg: str | None = None) -> ConfigDict:
    """The sweep (keys: bltjax/sweep/spec.py); ``:quick`` is the same sweep at a tenth of the steps."""
    steps = STEPS if arg != "quick" else STEPS // 10
    return ConfigDict(
        dict(
            base="experiments/patch_sweep.py:blt",
            baseline="experiments/patch_sweep.py:byte",
            modes=["entropy", "space", "static"],
            patch_sizes=[4.0, 6.0, 8.0],
            budget_flops_per_byte=BUDGET,
            budget_train_flops=steps * BATCH * SEQ_LEN * 3 * BUDGET,
            evals=4,
            # Entropy patching's patches per row have a long tail (a few rows are nearly a patch per
            # byte): 3 x seq_len / patch size columns keep the truncated rows under 1%.
            max_patches_factor=3.0,
            data=dict(corpus=CORPUS, val_fraction=0.05),
            entropy=dict(config="experiments/patch_sweep.py:entropy", context=2048),
        )
    )
