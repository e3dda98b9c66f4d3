"""Weighted data mixtures: several prepared folders, each with a weight (`config.data.mixture`).

    config.data.mixture = "DATA/web:0.7,DATA/code:0.3"      # FOLDER:WEIGHT, comma-separated

Each folder becomes its own endless shuffled row stream (windows or packed rows, as configured)
and grain's `MapDataset.mix` interleaves them: element i of the mixture is a fixed function of i
and the weights (no random draw), so a batch stays a function of (seed, step) and resuming needs
only the step. The interleaving is deterministic, so every stretch of rows holds each folder in
its proportion: the count of a folder's rows among n differs from n x weight by the rounding of
grain's integer proportions (weights scaled so that the smallest is 100), far less than a random
draw's binomial spread. Each folder's shuffle gets its own seed derived from (seed, position in
the list), so two folders of equal size are not read in the same order.

Validation is mixed the same way: the held-out rows of a mixture run are the folders' validation
splits in the training weights, so the validation bpb estimates the loss on the training
distribution. Every folder must then have the split (the error names the one that has not).

`config.data.path` keeps meaning one folder; a config sets one of the two.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import grain

from bltjax.data import shards as shard_format
from bltjax.data.errors import DataError
from bltjax.runtime import paths

FIELD = "config.data.mixture"


def parse_mixture(text: str) -> list[tuple[str, float]]:
    """``"A:0.7,B:0.3"`` -> [("A", 0.7), ("B", 0.3)]; the weight is after the last colon (gs:// paths work)."""
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{FIELD}: expected 'FOLDER:WEIGHT,FOLDER:WEIGHT,...', got {text!r}")
    out = []
    for entry in text.split(","):
        folder, colon, weight = entry.strip().rpartition(":")
        if not colon or not folder or "/" in weight:
            raise DataError(f"{FIELD}: entry {entry.strip()!r}: expected FOLDER:WEIGHT (a weight after the last ':')")
        try:
            value = float(weight)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise DataError(f"{FIELD}: folder {folder!r}: weight {weight!r} must be a positive finite number")
        out.append((folder, value))
    names = [folder for folder, _ in out]
    if len(set(names)) != len(names):
        raise DataError(f"{FIELD}: a folder appears twice in {names}; give each folder one weight")
    return out


def mixture_of(config: Any) -> str:
    """``config.data.mixture``, '' for configs without the field."""
    data = config.data
    return (data.get("mixture", "") if hasattr(data, "get") else "") or ""


def folders(config: Any, data_dir: str | Any | None) -> list[tuple[str, float]]:
    """The (folder, normalised weight) pairs a dataset reads: the mixture's, or ``data_dir`` alone.

    Raises DataError naming the field and folder for a bad weight, a folder without
    ``manifest.json``, or a config that sets both a mixture and a different ``data_dir``.
    """
    text = mixture_of(config)
    if not text:
        return [(data_dir, 1.0)]
    if data_dir and str(data_dir) != str(config.data.path or ""):
        raise DataError(f"{FIELD} is set, so the data folder {data_dir!s} would be ignored; pass the config alone")
    if config.data.path:
        raise DataError(f"config.data.path={config.data.path!r} and {FIELD}={text!r}: set one of the two, not both")
    pairs = parse_mixture(text)
    for folder, _ in pairs:
        manifest = paths.resolve(folder) / shard_format.MANIFEST_NAME
        if not manifest.is_file():
            raise DataError(
                f"{FIELD}: folder {folder!r} has no {shard_format.MANIFEST_NAME} ({manifest}); prepare it with "
                "python -m bltjax.prepare or fix the path"
            )
    total = sum(weight for _, weight in pairs)
    return [(folder, weight / total) for folder, weight in pairs]


def component_seed(seed: int, index: int) -> int:
    """The shuffle seed of folder ``index``: distinct per folder, in [0, 2**32) like grain's seeds."""
    return (seed + 0x9E3779B9 * index) % 2**32


def mix(datasets: Sequence[grain.MapDataset], weights: Sequence[float]) -> grain.MapDataset:
    """Endless row streams -> one endless stream, folder i in proportion weights[i]."""
    if len(datasets) == 1:
        return datasets[0]
    return grain.MapDataset.mix(list(datasets), list(weights))
