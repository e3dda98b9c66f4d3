"""AdamW with warm-up and decay, global-norm clipping and an optional weight-decay mask (docs/architecture.md §13).

Everything is optax: `optax.warmup_cosine_decay_schedule` (or a linear / constant tail joined
with `optax.join_schedules`), `optax.clip_by_global_norm` and `optax.adamw`. Clipping runs once
per optimizer step, on the gradient already summed over the micro-batches (the official code
clips every micro-batch, which the spec calls a bug).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

# Parameters that the official code decays but many recipes do not (decay_all=False).
NO_DECAY_NAMES = ("scale", "byte_embedding", "embedding", "tables")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up to the peak, then cosine / linear decay to final_lr_ratio x peak at the last step."""
    opt = config.optimizer
    peak, steps = float(opt.learning_rate), int(config.train.steps)
    warmup = min(int(opt.warmup_steps), steps)
    final = peak * float(opt.final_lr_ratio)
    if opt.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, warmup + 1), end_value=final)
    ramp = optax.linear_schedule(0.0, peak, max(warmup, 1)) if warmup else optax.constant_schedule(peak)
    if opt.schedule == "linear":
        tail = optax.linear_schedule(peak, final, max(steps - warmup, 1))
    else:  # constant
        tail = optax.constant_schedule(peak)
    return optax.join_schedules([ramp, tail], [warmup])


def weight_decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay when `decay_all` is off: matrices, not norms/embeddings."""

    def decays(path: tuple, _: Any) -> bool:
        # The last dict key is the parameter's name (boxed trees add a trailing `.value`).
        names = [str(entry.key) for entry in path if isinstance(entry, jax.tree_util.DictKey)]
        return not names or names[-1] not in NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The optax chain of `config.optimizer` (docs/architecture.md §13 defaults)."""
    opt = config.optimizer
    adamw = optax.adamw(
        learning_rate_schedule(config),
        b1=float(opt.b1),
        b2=float(opt.b2),
        eps=float(opt.eps),
        weight_decay=float(opt.weight_decay),
        mask=None if opt.decay_all else weight_decay_mask,
    )
    if opt.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(float(opt.clip_norm)), adamw)
