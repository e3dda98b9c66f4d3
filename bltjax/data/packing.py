"""Packed rows: a fixed number of patches per row under a byte cap (`config.data.rows = "packed"`).

    shards (+ sidecars) --WindowSource--> PackedSource(max_patches K, byte cap N) --> PackedBuilder

A fixed byte window of N bytes holds a variable number of patches, so its patch axis is padded
to `max_patches` columns and the latent transformer spends the padded columns' FLOPs. The
reference pipeline (Pagnoni et al. 2024, appendix on batch construction) instead cuts the patch
stream every K patches and caps the bytes; the model's shapes stay [N] bytes and [K] columns, and
what padding remains is in bytes (a row of K short patches) or, when the cap binds, in columns.

Decisions
---------
* Patches of the whole shard first. Every document is patched on its own (patches never
  straddle documents): static/byte from each document's BOS (lengths [1, s, s, ..., r], as
  `patch_lengths(doc, include_next_token=False)` gives them), space over the stream (its rule is
  local and the BOS/EOS tokens force the document's starts, so it equals per-document patching),
  entropy from the start-bit sidecars (computed per document). `max_patch_length` is applied
  last. The start positions are kept as a packed bit mask per shard (T / 8 bytes).
* Rows. Row r of a shard starts at byte p_r (p_0 = 0) and holds n_r inputs, tokens
  [p_r, p_r + n_r] (the last one is the final target). Its patch boundaries are p_r, p_r + 1
  (the first patch is exactly one byte, docs/architecture.md §3.2: a row that starts inside a
  patch re-splits it) and every shard start after p_r + 1. n_r is the largest n with at most K
  boundaries in [p_r, p_r + n], n <= N (the byte cap) and p_r + n < T; then p_{r+1} = p_r + n_r,
  so consecutive rows share one token and every token of the shard except the first is a target
  exactly once (EOS -> BOS included, docs/architecture.md §10 item 6). The row cut is a
  sequential pass at construction (one binary search per row); the rows are then random access,
  so a batch stays a function of (seed, step) and resuming needs only the step.
* A row whose K patches fit in fewer than N bytes is right-padded with BOE: the last patch is
  lengthened by the padding (rows sum to N + 1, the model's convention) and the padded targets
  leave the loss. When the cap binds, the patch that crosses it is cut at the cap (it still holds
  the row's last target) and the unused columns are zero: the next row starts at the cap, so no
  byte is lost. Every target in a row sees its own document's patching except in the row's first
  patch, which the first-patch rule re-splits (as fixed windows do).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from bltjax.data.errors import DataError
from bltjax.patching import (
    PatchingRule,
    lengths_from_start_mask,
    patch_start_mask,
    split_long_patches,
    start_mask_from_lengths,
)
from bltjax.tokenizer import BOE_ID, BOS_ID, VOCAB_SIZE

ROW_KINDS = ("windows", "packed")


def row_kind(config: Any) -> str:
    """``config.data.rows``; configs written before the field existed build fixed windows."""
    kind = config.data.get("rows", "windows") if hasattr(config.data, "get") else "windows"
    if kind not in ROW_KINDS:
        raise DataError(f"config.data.rows: expected one of {ROW_KINDS}, got {kind!r}")
    return kind


def _static_starts(tokens: np.ndarray, rule: PatchingRule) -> np.ndarray:
    """Per-document static (or byte) starts: BOS, BOS + 1, then every `patch_size` bytes."""
    mask = np.zeros(tokens.size, dtype=bool)
    if rule.kind == "byte":
        mask[:] = True
        return mask
    size = int(rule.patch_size)
    head = int(getattr(rule, "static_first_patch_rule", True))
    doc_starts = np.flatnonzero(tokens == BOS_ID).tolist()
    if not doc_starts or doc_starts[0] != 0:
        doc_starts.insert(0, 0)
    for first, stop in zip(doc_starts, doc_starts[1:] + [tokens.size], strict=True):  # one slice per document
        mask[first] = True
        mask[first + head : stop : size] = True
    return mask


def shard_start_mask(tokens: np.ndarray, rule: PatchingRule, starts: np.ndarray | None = None) -> np.ndarray:
    """bool [T]: does position t of a shard start a patch (each document patched on its own)?

    `starts` (bool [T]) are the entropy sidecar's bits; static, byte and space are computed here.
    """
    tokens = np.asarray(tokens)
    if rule.mode == "entropy":
        if starts is None:
            raise DataError("packed rows with entropy patching need the start-bit sidecars (bltjax.entropy)")
        mask = np.array(starts, dtype=bool)
    elif rule.kind in ("static", "byte"):
        mask = _static_starts(tokens, rule)
    else:  # space: a local rule whose special tokens start the document's patches (module docstring)
        mask = patch_start_mask(tokens[None, :].astype(np.int32), rule, include_next_token=False)[0]
    mask[tokens == BOS_ID] = True
    mask[0] = True
    if rule.max_patch_length is not None:
        lengths = split_long_patches(lengths_from_start_mask(mask[None]), int(rule.max_patch_length))
        mask = start_mask_from_lengths(lengths, tokens.size)[0]
    return mask


def cut_rows(starts: np.ndarray, n_tokens: int, max_patches: int, seq_len: int) -> np.ndarray:
    """int64 [R + 1]: the first token of each row of a shard, then the last row's final target.

    `starts` are the sorted patch start positions of the shard; see the module docstring for the rule.
    """
    starts = np.asarray(starts, dtype=np.int64)
    out = [0]
    position = 0
    while position < n_tokens - 1:
        after = int(np.searchsorted(starts, position + 1, side="right"))  # first start > position + 1
        boundary = after + max_patches - 2  # the (K + 1)-th boundary, counting position and position + 1
        limit = int(starts[boundary]) - 1 - position if boundary < starts.size else n_tokens
        position += min(seq_len, n_tokens - 1 - position, limit)
        out.append(position)
    return np.asarray(out, dtype=np.int64)


class PackedSource(grain.sources.RandomAccessDataSource):
    """Random access to the packed rows of a split (module docstring).

    Wraps the split's `WindowSource` (which verified the files and opens them, with their sidecar
    bits in entropy mode). Element: {"window": uint16 [N + 1] (BOE after the row), "lengths":
    int32 [K], "row_bytes": int32 (n, the row's real inputs)}.
    """

    def __init__(self, windows: Any, max_patches: int, rule: PatchingRule):
        if not isinstance(rule, PatchingRule):
            raise ValueError(f"PackedSource: rule must be a bltjax.patching.PatchingRule, got {type(rule).__name__}")
        if not isinstance(max_patches, int) or max_patches < 2:
            raise ValueError(f"config.data.max_patches: expected an int >= 2 for packed rows, got {max_patches!r}")
        self.windows = windows
        self.seq_len = int(windows.seq_len)
        self.max_patches = max_patches
        self.rule = rule
        self._masks: list[np.ndarray] = []  # packed start bits per shard
        self._bounds: list[np.ndarray] = []  # cut_rows of each shard
        self._first = [0]
        for number, shard in enumerate(windows.shards):
            tokens, bits = windows.open_files(number)
            starts = None
            if bits is not None:
                starts = np.unpackbits(np.asarray(bits[: (shard.n_tokens + 7) // 8]), count=shard.n_tokens).astype(bool)
            mask = shard_start_mask(np.asarray(tokens), rule, starts)
            bounds = cut_rows(np.flatnonzero(mask), shard.n_tokens, max_patches, self.seq_len)
            self._masks.append(np.packbits(mask))
            self._bounds.append(bounds)
            self._first.append(self._first[-1] + bounds.size - 1)

    def __len__(self) -> int:
        return self._first[-1]

    def __repr__(self) -> str:
        return (
            f"PackedSource({len(self.windows.shards)} shards, {len(self)} rows of {self.max_patches} patches, "
            f"at most {self.seq_len} bytes)"
        )

    def locate(self, index: int) -> tuple[int, int, int]:
        """(shard number, first token, inputs n) of row `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"packed row {index} out of range [0, {len(self)})")
        shard = bisect.bisect_right(self._first, index) - 1
        row = index - self._first[shard]
        first, last = self._bounds[shard][row : row + 2]
        return shard, int(first), int(last - first)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        number, first, inputs = self.locate(int(index))
        tokens, _ = self.windows.open_files(number)
        stop = first + inputs + 1
        window = np.full(self.seq_len + 1, BOE_ID, dtype=np.uint16)
        window[: inputs + 1] = tokens[first:stop]
        if int(window.max()) >= VOCAB_SIZE:
            path = self.windows.shards[number].tokens_path
            raise DataError(f"{path}: token id {int(window.max())} >= {VOCAB_SIZE} in tokens [{first}, {stop})")
        byte = first // 8
        mask = np.unpackbits(self._masks[number][byte : (stop + 7) // 8])[first - 8 * byte : stop - 8 * byte]
        mask = mask.astype(bool)
        mask[:2] = True  # the first patch is exactly one byte
        lengths = np.zeros(self.max_patches, dtype=np.int32)
        row = lengths_from_start_mask(mask[None])[0]
        row = row[row > 0]
        if row.size > self.max_patches:  # cut_rows guarantees this; a changed mask would break it
            raise DataError(f"packed row {index}: {row.size} patches > max_patches {self.max_patches}")
        lengths[: row.size] = row
        lengths[row.size - 1] += self.seq_len - inputs  # BOE padding joins the last patch
        return {"window": window, "lengths": lengths, "row_bytes": np.int32(inputs)}


@dataclasses.dataclass(frozen=True)
class PackedBuilder:
    """Stacked packed rows -> the model's batch (the fields of `BatchBuilder`, plus `row_bytes`).

    loss_mask is False on the padding after each row's n real targets (and on BOE targets, as
    for windows); `row_bytes` int32 [b] feeds the padding metrics (bltjax.training.padding).
    """

    seq_len: int
    max_patches: int

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        windows = np.asarray(batch["window"]).astype(np.int32)
        if windows.ndim != 2 or windows.shape[1] != self.seq_len + 1:
            raise ValueError(f"PackedBuilder: windows must be [b, {self.seq_len + 1}], got shape {windows.shape}")
        row_bytes = np.asarray(batch["row_bytes"], dtype=np.int32).reshape(-1)
        tokens, targets = windows[:, :-1], windows[:, 1:]
        loss_mask = (targets != BOE_ID) & (np.arange(self.seq_len)[None, :] < row_bytes[:, None])
        return {
            "tokens": np.ascontiguousarray(tokens),
            "targets": np.ascontiguousarray(targets),
            "patch_lengths": np.asarray(batch["lengths"], dtype=np.int32),
            "loss_mask": loss_mask,
            "row_bytes": row_bytes,
        }
