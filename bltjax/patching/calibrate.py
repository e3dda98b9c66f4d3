"""Choose the entropy threshold θ for a target average patch size (docs/architecture.md §3.15).

    result = calibrate_threshold(documents, 4.5)   # one 1-D float array of entropies per document
    rule = PatchingRule(mode="entropy", threshold=result.threshold)

Arrays in, threshold out: no file I/O here (the program `python -m bltjax.calibrate` reads
.npy files or the entropy sidecars of a prepared folder).

The official code ships no tool for this; the maintainers describe the procedure
(facebookresearch/blt#106): on a sample of the training mix, search θ until the mean patch size
hits the target. Here the search is exact rather than a float bisection: with the global rule
(§3.4) a position starts a patch iff the entropy before it is > θ, so the number of patches is a
step function of θ that only changes at the distinct candidate entropy values. We sort those
values once, bisect over the steps (the mean patch size grows with θ), and return a θ in the
middle of the winning step, so that float noise in recomputed entropies rarely flips a decision.
The monotonic rule (§3.5, ``kind="monotonic"``) is searched the same way: a position p >= 3
starts a patch iff H_{p-1} - H_{p-2} > θ, so the steps are the distinct differences (taken in
the patcher's compare dtype). The combined rule has two thresholds and is not calibrated here.

Documents are patched one by one with `include_next_token=False` (§10: rows sum to the document
length), exactly as `patching.patch_lengths(..., mode='entropy', threshold=θ,
include_next_token=False)` would do on each of them (the tests check this). "Tokens per patch"
counts BOS/EOS, "bytes per patch" does not (§3.15); by default every document is assumed to be
BOS + bytes + EOS, as the data pipeline writes them.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import numpy as np

from bltjax.patching.lengths import lengths_from_start_mask, split_long_patches
from bltjax.patching.rule import PatchingError, PatchingRule

UNITS = ("tokens", "bytes")
KINDS = ("global", "monotonic")  # rules with one threshold: a one-dimensional search


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The chosen threshold and the patch sizes it realises on the sample."""

    threshold: float
    target_patch_size: float
    unit: str  # what target_patch_size counts: "tokens" (incl. BOS/EOS) or "bytes"
    max_patch_length: int | None
    documents: int
    tokens: int
    bytes: int
    patches: int
    mean_tokens_per_patch: float
    median_tokens_per_patch: float
    max_tokens_per_patch: int
    mean_bytes_per_patch: float
    median_bytes_per_patch: float
    max_bytes_per_patch: int
    kind: str = "global"  # the rule calibrated: global (§3.4) or monotonic (§3.5)


@dataclasses.dataclass(frozen=True)
class _Corpus:
    """All documents back to back: `entropies` flat, `starts` the first position of each."""

    entropies: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    bos: bool
    eos: bool

    @property
    def special_positions(self) -> np.ndarray:
        """Flat positions of the BOS/EOS tokens, which count as tokens but not as bytes."""
        parts = [self.starts] if self.bos else []
        if self.eos:
            parts.append(self.starts + self.lengths - 1)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def scores(self, kind: str) -> np.ndarray:
        """Flat [T]: at index q, what decides whether position q + 1 starts a patch: H_q (global)
        or H_q - H_{q-1} (monotonic; index 0 is unused)."""
        if kind == "global":
            return self.entropies
        rise = np.zeros_like(self.entropies)
        np.subtract(self.entropies[1:], self.entropies[:-1], out=rise[1:])
        return rise

    def forced(self, kind: str) -> int:
        """Positions 0..forced-1 of every document always start a patch (§3.2, §3.5)."""
        return 3 if kind == "monotonic" else 2

    def patch_lengths(self, threshold: float, max_patch_length: int | None, kind: str = "global") -> np.ndarray:
        """Flat lengths of every document's patches, documents in order (the rule `kind`)."""
        values = self.scores(kind)
        mask = np.empty(values.size, dtype=bool)
        mask[0] = True
        np.greater(values[:-1], values.dtype.type(threshold), out=mask[1:])
        for position in range(self.forced(kind)):  # hides scores that reach into the previous document
            mask[self.starts[self.lengths > position] + position] = True
        lengths = lengths_from_start_mask(mask[None, :])
        if max_patch_length is not None:
            lengths = split_long_patches(lengths, max_patch_length)
        return lengths[0].astype(np.int64)

    def bytes_per_patch(self, lengths: np.ndarray) -> np.ndarray:
        patch_starts = np.cumsum(lengths) - lengths
        owner = np.searchsorted(patch_starts, self.special_positions, side="right") - 1
        return lengths - np.bincount(owner, minlength=lengths.size)


def _fail(argument: str, expected: str, got: object) -> PatchingError:
    return PatchingError(f"calibrate.{argument}", expected, got)


def _corpus(entropies: Sequence[np.ndarray], bos: bool, eos: bool) -> _Corpus:
    if isinstance(entropies, np.ndarray) or len(entropies) == 0:
        raise _fail("entropies", "a non-empty sequence of 1-D arrays (one per document)", type(entropies))
    documents = [np.asarray(doc) for doc in entropies]
    specials = int(bos) + int(eos)
    for index, doc in enumerate(documents):
        if doc.ndim != 1 or not np.issubdtype(doc.dtype, np.floating):
            raise _fail(
                f"entropies[{index}]",
                "a 1-D float array",
                f"{doc.dtype} array of shape {doc.shape}",
            )
        if doc.size < max(1, specials):
            raise _fail(
                f"entropies[{index}]",
                f"at least {max(1, specials)} entropies (BOS/EOS included)",
                doc.size,
            )
    dtype = np.result_type(np.float32, *(doc.dtype for doc in documents))  # patching's compare dtype
    flat = np.concatenate(documents).astype(dtype, copy=False)
    if np.isnan(np.max(flat)):
        raise _fail("entropies", "free of NaN", f"{int(np.isnan(flat).sum())} NaN values")
    lengths = np.array([doc.size for doc in documents], dtype=np.int64)
    return _Corpus(flat, np.cumsum(lengths) - lengths, lengths, bos, eos)


def calibrate_threshold(
    entropies: Sequence[np.ndarray],
    target_patch_size: float,
    *,
    unit: str = "tokens",
    max_patch_length: int | None = None,
    bos: bool = True,
    eos: bool = True,
    kind: str = "global",
) -> Calibration:
    """Threshold of the rule `kind` (global or monotonic) whose mean patch size on `entropies` (one
    1-D array per document) is closest to `target_patch_size`, counted in `unit` ('tokens' as in
    §3.15, or 'bytes').

    `bos` / `eos` say whether each document starts with BOS / ends with EOS (for bytes per
    patch). Raises ValueError if the target lies outside the reachable range of mean sizes.
    """
    if unit not in UNITS:
        raise _fail("unit", f"one of {UNITS}", unit)
    if kind not in KINDS:
        raise _fail("kind", f"one of {KINDS} (rules with a single threshold)", kind)
    if not isinstance(target_patch_size, numbers.Real) or not target_patch_size > 0:
        raise _fail("target_patch_size", "a number > 0", target_patch_size)
    PatchingRule(mode="entropy", threshold=0.0, max_patch_length=max_patch_length)  # the record checks it
    corpus = _corpus(entropies, bos, eos)
    units = int(corpus.lengths.sum()) - (0 if unit == "tokens" else len(corpus.lengths) * (int(bos) + int(eos)))

    # Candidate scores: those of p = forced..N-1 of each document (include_next_token=False).
    inside = np.ones(corpus.entropies.size, dtype=bool)
    for position in range(corpus.forced(kind) - 1):
        inside[corpus.starts[corpus.lengths > position] + position] = False
    inside[corpus.starts + corpus.lengths - 1] = False
    values, counts = np.unique(corpus.scores(kind)[inside], return_counts=True)
    above = counts.sum() - np.cumsum(counts)  # candidates > values[i]
    forced = int(np.minimum(corpus.lengths, corpus.forced(kind)).sum())

    def threshold_of(step: int) -> float:
        """A θ inside step `step` (-1: below every value, so every candidate starts a patch)."""
        if values.size == 0:
            return 0.0
        if step < 0:
            return float(values[0]) - 1.0
        if step == values.size - 1:
            return float(values[-1]) + 1.0
        middle = values.dtype.type((float(values[step]) + float(values[step + 1])) / 2)
        return float(middle if values[step] <= middle < values[step + 1] else values[step])

    def mean_size(step: int) -> float:
        if max_patch_length is None:
            patches = forced + (int(above[step]) if step >= 0 else int(counts.sum()))
        else:
            patches = corpus.patch_lengths(threshold_of(step), max_patch_length, kind).size
        return units / patches

    low, high = -1, values.size - 1  # mean_size grows with the step
    if not mean_size(low) <= target_patch_size <= mean_size(high):
        reachable = f"[{mean_size(low):.4g}, {mean_size(high):.4g}] {unit} per patch"
        raise _fail("target_patch_size", f"within the reachable range {reachable}", target_patch_size)
    while high - low > 1:  # invariant: mean_size(low) <= target <= mean_size(high)
        middle = (low + high) // 2
        if mean_size(middle) <= target_patch_size:
            low = middle
        else:
            high = middle
    step = min((low, high), key=lambda s: (abs(mean_size(s) - target_patch_size), s))
    threshold = threshold_of(step)
    return _realised(corpus, threshold, target_patch_size, unit, max_patch_length, kind)


def _realised(
    corpus: _Corpus, threshold: float, target: float, unit: str, max_patch_length: int | None, kind: str = "global"
) -> Calibration:
    tokens = corpus.patch_lengths(threshold, max_patch_length, kind)
    byte_counts = corpus.bytes_per_patch(tokens)
    return Calibration(
        threshold=threshold,
        target_patch_size=float(target),
        unit=unit,
        max_patch_length=max_patch_length,
        documents=int(corpus.lengths.size),
        tokens=int(tokens.sum()),
        bytes=int(byte_counts.sum()),
        patches=int(tokens.size),
        mean_tokens_per_patch=float(tokens.mean()),
        median_tokens_per_patch=float(np.median(tokens)),
        max_tokens_per_patch=int(tokens.max()),
        mean_bytes_per_patch=float(byte_counts.mean()),
        median_bytes_per_patch=float(np.median(byte_counts)),
        max_bytes_per_patch=int(byte_counts.max()),
        kind=kind,
    )


def realised_patch_sizes(
    entropies: Sequence[np.ndarray],
    threshold: float,
    *,
    max_patch_length: int | None = None,
    bos: bool = True,
    eos: bool = True,
) -> Calibration:
    """The statistics of `calibrate_threshold` for a given θ (target reported as NaN)."""
    if not isinstance(threshold, numbers.Real) or math.isnan(threshold):
        raise _fail("threshold", "a real number", threshold)
    return _realised(_corpus(entropies, bos, eos), float(threshold), math.nan, "tokens", max_patch_length)


def format_table(result: Calibration) -> str:
    """A small markdown table of a calibration result."""
    rows = [("quantity", "tokens per patch", "bytes per patch"), ("---", "---:", "---:")]
    rows += [
        ("mean", f"{result.mean_tokens_per_patch:.4f}", f"{result.mean_bytes_per_patch:.4f}"),
        ("median", f"{result.median_tokens_per_patch:g}", f"{result.median_bytes_per_patch:g}"),
        ("max", str(result.max_tokens_per_patch), str(result.max_bytes_per_patch)),
    ]
    header = (
        f"{'' if result.kind == 'global' else result.kind + ' '}threshold = {result.threshold!r} "
        f"(target {result.target_patch_size:g} {result.unit} "
        f"per patch, max_patch_length = {result.max_patch_length})\n"
        f"{result.documents} documents, {result.tokens} tokens, {result.bytes} bytes, "
        f"{result.patches} patches\n\n"
    )
    return header + "\n".join("| " + " | ".join(row) + " |" for row in rows)
