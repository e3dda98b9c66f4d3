"""The two budget rules of a sweep: model size for an inference budget, schedule for a training budget.

**Fixed inference budget** (paper §"fixed-inference scaling", Table 2): every run spends the same
forward FLOPs per byte (docs/architecture.md §14, analytic, at the run's expected mean patch size). A BLT's local
modules cost the same per byte whatever the patch size, while the global model runs once per
patch, so a larger patch leaves room for a larger latent model. `fit_stack` chooses that model:

1. head_dim stays the base stack's (and the grouped-query ratio, if any); the width is
   ``heads x head_dim`` for heads = 1 .. ``max_width_multiple`` (in steps of the group size);
2. the FLOPs are linear in the depth, so for each width the depth that meets the budget is
   solved for and rounded down and up (1 .. ``max_layers``): the candidates;
3. among the candidates within ``tolerance`` of the budget, the one whose depth/width ratio
   is closest to the base stack's (|log ratio|) wins; ties go to the smaller mismatch, then to
   the narrower model. If no candidate is within tolerance, the smallest mismatch wins and the
   plan says so.

The FFN width follows the base: the SwiGLU rule of the new width when the base leaves it unset,
else scaled in proportion. The byte-level baseline's stack is fitted by the same rule.

**Fixed training budget**: steps x batch x seq_len x training FLOPs per byte = the budget
(`training_schedule`). The batch (rows) stays the base config's, so every run sees the same
bytes per step, unless that leaves fewer than ``min_steps`` steps; then the batch shrinks (in
multiples of ``batch_multiple``, the data-parallel width) until it does not. Steps are rounded
to the nearest integer; the realised total is reported next to the budget.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from bltjax.config import ConfigError
from bltjax.models.configs import TransformerConfig


class BudgetError(ConfigError):
    """A budget no model or schedule of the allowed shapes can meet."""


@dataclasses.dataclass(frozen=True)
class StackFit:
    """The fitted stack and how close it lands to the budget."""

    stack: TransformerConfig
    flops_per_byte: float  # forward, whole model, analytic
    budget: float
    within_tolerance: bool
    candidates: int  # (width, depth) pairs considered

    @property
    def mismatch(self) -> float:
        """realised / budget - 1 (signed)."""
        return self.flops_per_byte / self.budget - 1.0


def _resized(base: TransformerConfig, heads: int, layers: int) -> TransformerConfig:
    head_dim = base.resolved_head_dim
    dim = heads * head_dim
    group = base.n_heads // base.kv_heads
    ffn = None if base.ffn_hidden is None else max(1, round(base.ffn_hidden * dim / base.dim))
    return dataclasses.replace(
        base,
        dim=dim,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=None if base.n_kv_heads is None else heads // group,
        ffn_hidden=ffn,
    )


def fit_stack(
    base: TransformerConfig,
    cost: Callable[[TransformerConfig], float],
    budget: float,
    *,
    tolerance: float = 0.05,
    max_layers: int = 64,
    max_width_multiple: int = 64,
) -> StackFit:
    """The stack (module docstring, rule 1-3) whose model ``cost(stack)`` best spends ``budget``.

    ``cost`` maps a candidate stack to the whole model's forward FLOPs per byte (the other
    modules fixed); it must grow linearly with ``n_layers``.
    """
    if budget <= 0:
        raise BudgetError(f"budget_flops_per_byte: expected a positive number, got {budget!r}")
    group = base.n_heads // base.kv_heads
    aspect = base.n_layers / base.dim
    candidates: list[tuple[TransformerConfig, float]] = []
    cheapest = math.inf
    for heads in range(group, max_width_multiple * group + 1, group):
        fixed = cost(_resized(base, heads, 0))
        per_layer = cost(_resized(base, heads, 1)) - fixed
        cheapest = min(cheapest, fixed + per_layer)
        if per_layer <= 0:
            continue
        exact = (budget - fixed) / per_layer
        for layers in sorted({min(max(math.floor(exact), 1), max_layers), min(max(math.ceil(exact), 1), max_layers)}):
            stack = _resized(base, heads, layers)
            candidates.append((stack, cost(stack)))
    if not candidates or cheapest > budget * (1 + tolerance):
        raise BudgetError(
            f"budget_flops_per_byte: {budget:.4g} is below the cheapest model of this shape ({cheapest:.4g} forward "
            "FLOPs per byte with a 1-layer, 1-head stack: the other modules alone cost about that); raise the budget "
            "or shrink the fixed modules of the base config"
        )

    def miss(item: tuple[TransformerConfig, float]) -> float:
        return abs(item[1] / budget - 1.0)

    def shape_distance(item: tuple[TransformerConfig, float]) -> float:
        return abs(math.log((item[0].n_layers / item[0].dim) / aspect))

    within = [c for c in candidates if miss(c) <= tolerance]
    if within:
        best = min(within, key=lambda c: (shape_distance(c), miss(c), c[0].dim, c[0].n_layers))
    else:
        best = min(candidates, key=lambda c: (miss(c), shape_distance(c), c[0].dim, c[0].n_layers))
    return StackFit(best[0], best[1], float(budget), bool(within), len(candidates))


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Steps and global batch (rows) of one run, and the training FLOPs they add up to."""

    steps: int
    batch_size: int
    train_flops: float  # steps x batch x seq_len x train FLOPs per byte
    budget: float | None  # None: the base config's schedule was kept


def training_schedule(
    train_flops_per_byte: float,
    seq_len: int,
    base_batch: int,
    base_steps: int,
    budget: float | None,
    *,
    min_steps: int = 10,
    batch_multiple: int = 1,
) -> Schedule:
    """Steps and batch for a training budget (module docstring); None keeps the base schedule."""
    if budget is None:
        return Schedule(base_steps, base_batch, base_steps * base_batch * seq_len * train_flops_per_byte, None)
    per_row = seq_len * train_flops_per_byte  # one row of one step
    batch = max(batch_multiple, base_batch // batch_multiple * batch_multiple)
    if budget / (batch * per_row) < min_steps:
        fitting = math.floor(budget / (min_steps * per_row)) // batch_multiple * batch_multiple
        batch = max(batch_multiple, fitting)
    steps = round(budget / (batch * per_row))
    if steps < 1:
        raise BudgetError(
            f"budget_train_flops: {budget:.4g} buys less than one step of {batch} rows x {seq_len} bytes at "
            f"{train_flops_per_byte:.4g} training FLOPs per byte ({batch * per_row:.4g} per step)"
        )
    return Schedule(steps, batch, steps * batch * per_row, float(budget))
