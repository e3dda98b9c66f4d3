"""What padding costs: padded patch columns, padded bytes, and the FLOPs spent on the full shapes.

A BLT row has fixed shapes, N byte positions and P patch columns, whatever the data puts in them:
fixed windows leave patch columns empty (length 0) and packed rows leave byte positions empty (BOE
after the row's real bytes, `bltjax.data.packing`). The device computes every one of them, so
the FLOPs a step spends are the model's FLOPs for the padded shapes:

    spent per step = 3 x forward FLOPs per byte at n_p = N / P (P columns over N bytes) x N x B

with the analytic count (`bltjax.models.flops.analytic_flops_per_byte`, the paper's formula that
MFU and the sweeps use): at n_p = N / P its latent term is P columns with P-column attention, its
cross-attention terms k x P slots, so nothing depends on how many columns hold a patch. Byte LMs
(no columns) spend 3 x forward x N x B as well. The shapes do not change during a run, so the
cumulative FLOPs spent are step x the per-step count, exactly.

Padding fractions are counted on the host from this process's rows (an equal share of every
global batch): per logging window, and cumulative since step 0. The cumulative sums travel in
each checkpoint's metadata, so a resumed run continues them; a checkpoint written before they
existed gets them recounted from the data (batches are a function of the step).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from bltjax.models import flops

SUM_KEYS = ("pad_columns", "all_columns", "pad_positions", "all_positions")
META_KEY = "padding"


def batch_padding(batch: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Host sums of one batch: patch columns (and the empty ones), byte positions (and the padded ones)."""
    positions = float(batch["tokens"].size)
    stats = {"pad_positions": positions - real_bytes(batch), "all_positions": positions}
    if "patch_lengths" in batch:
        lengths = batch["patch_lengths"]
        stats["pad_columns"] = float(lengths.size - np.count_nonzero(lengths))
        stats["all_columns"] = float(lengths.size)
    return stats


def real_patch_lengths(batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """`patch_lengths` without the BOE padding that packed rows add to each row's last patch.

    Throughput and patch statistics count real bytes; windows (no `row_bytes`) come back as they are.
    """
    lengths = batch["patch_lengths"]
    if "row_bytes" not in batch:
        return lengths
    lengths = np.array(lengths)
    last = np.count_nonzero(lengths, axis=1) - 1  # columns are left-aligned
    lengths[np.arange(lengths.shape[0]), last] -= batch["tokens"].shape[1] - np.asarray(batch["row_bytes"])
    return lengths


def real_bytes(batch: Mapping[str, np.ndarray]) -> float:
    """Input positions that hold data (all of them for windows; `row_bytes` for packed rows)."""
    if "row_bytes" in batch:
        return float(np.sum(batch["row_bytes"], dtype=np.int64))
    return float(batch["tokens"].size)


def spent_flops_per_step(config: Any) -> float:
    """Training FLOPs of one global batch at its padded shapes (module docstring)."""
    seq_len, batch = int(config.data.seq_len), int(config.data.batch_size)
    if config.get("patching") is not None and config.model_type == "blt":
        per_byte = flops.analytic_flops_per_byte(config, mean_patch_size=seq_len / int(config.data.max_patches))
    else:
        per_byte = flops.analytic_flops_per_byte(config)
    row_bytes = seq_len * float(config.data.bytes_per_token) if config.model_type == "token_lm" else seq_len
    return flops.TRAIN_MULTIPLIER * per_byte.total_forward * row_bytes * batch


def _fraction(sums: Mapping[str, float], part: str, whole: str) -> float | None:
    return sums[part] / sums[whole] if sums.get(whole) else None


class PaddingMeter:
    """Cumulative padding sums of a run, and the metric values of each logging window."""

    def __init__(self, config: Any):
        self.flops_per_step = spent_flops_per_step(config)
        self.totals = dict.fromkeys(SUM_KEYS, 0.0)

    def add(self, stats: Mapping[str, float]) -> None:
        """One step's `batch_padding`."""
        for key in SUM_KEYS:
            self.totals[key] += float(stats.get(key, 0.0))

    def state(self) -> dict[str, float]:
        """What a checkpoint's metadata keeps (under META_KEY)."""
        return dict(self.totals)

    def restore(self, meta: Mapping[str, Any], step: int, batch_of_step: Callable[[int], Mapping[str, np.ndarray]]):
        """Continues the sums of a checkpoint at `step`; recounts them from the data if it has none."""
        saved = meta.get(META_KEY) if isinstance(meta, Mapping) else None
        if isinstance(saved, Mapping) and all(key in saved for key in SUM_KEYS):
            self.totals = {key: float(saved[key]) for key in SUM_KEYS}
            return
        self.totals = dict.fromkeys(SUM_KEYS, 0.0)
        for earlier in range(step):
            self.add(batch_padding(batch_of_step(earlier)))

    def values(self, window: Mapping[str, float], step: int) -> dict[str, float]:
        """Metric values of a logging window (its summed `batch_padding`) at `step`."""
        out = {"flops_spent_per_step": self.flops_per_step, "flops_spent_total": self.flops_per_step * step}
        for name, part, whole in (("padded_patch_fraction", "pad_columns", "all_columns"),
                                  ("padded_byte_fraction", "pad_positions", "all_positions")):  # fmt: skip
            current, total = _fraction(window, part, whole), _fraction(self.totals, part, whole)
            if current is not None:
                out[name] = current
            if total is not None:
                out[f"{name}_total"] = total
        return out
