"""The entropy pass: next-byte entropies of every shard by an entropy model, then start bits.

    python -m bltjax.entropy --data DATA --entropy-model ENTROPY_MODEL_DIR [--threshold t | --target-patch-size s]
    python -m bltjax.entropy --data DATA --entropy-model ENTROPY_MODEL_DIR --rule monotonic --threshold t

    from bltjax.data import entropy
    summary = entropy.run(DATA, ENTROPY_MODEL_DIR, target_patch_size=4.5)   # what the program calls

It writes the sidecars of `bltjax.data.sidecars` (``{shard}.entropy.f16``, ``{shard}.starts.{tag}.bits``,
``sidecars.json``) next to every shard of a prepared folder (`bltjax.data.shards`).
`ENTROPY_MODEL_DIR` is a bltjax model folder (`bltjax.checkpoints.save_model`,
model_type "byte_lm"), the training workdir of one (its newest complete step), a Hugging Face
BLT folder, whose entropy patcher and stored threshold are used, or a Hub id of one. The flags
live in the program, `bltjax.entropy`.

Design
------
* Context (docs/architecture.md §2.3). Every document (BOS..EOS, from `.docs.npy`) is run alone: context never
  crosses a document or a row. A document longer than `context` tokens is cut into chunks of at
  most `context` tokens; each chunk after the first re-reads the `overlap` tokens before its
  first output position and keeps only the outputs after them. With a sliding window w and L
  layers a position depends on the previous L * (w - 1) tokens (each layer looks w - 1 back, and
  the layers compound), so the default overlap is L * (w - 1): results then do not depend on
  chunking at all (up to float rounding; RoPE is relative, so where a chunk starts does not
  matter). The "overlap w - 1" of docs/architecture.md §2.3 bounds only the first layer and is *not* exact for L > 1;
  it is available as `--overlap` when the long-document cost matters (it costs
  context / (context - overlap) times more on long documents only). Without a window the model
  sees the whole prefix, and no finite chunking is exact: the default overlap is then
  context // 2, an approximation (every position still sees at least context // 2 tokens back);
  documents up to `context` tokens are always exact. `context` defaults to the model's
  `data.seq_len` (8192 for a Hugging Face folder, as the official pass), raised for a small
  windowed model to the power of two >= 2 x overlap (at most 8192; a window makes longer rows
  safe), so that long documents do not pay mostly for overlap.
* Static shapes. Chunks are grouped into a few length buckets (powers of two from 128 up to
  `context`), so a handful of programs are compiled; short buckets take proportionally more
  rows (`batch_size` rows of `context` tokens per step, in tokens). Rows are padded with BOE
  (0) after the document: the model is causal, so padding never changes real positions.
* Parallelism. A 1-D mesh ('data') over `jax.local_devices()` with Auto axis types; the rows
  of every batch are sharded over it and the params replicated. Over processes, shard i (in
  manifest order, all splits) belongs to process i % process_count. Each process records what
  it did in its own journal file; process 0 merges them into `sidecars.json` at the end. With
  several hosts the data folder must be on a shared file system.
* Resume. A shard is skipped when its `.tokens` sha256 matches the data manifest and its
  recorded sidecars exist with matching sha256s and come from the same model fingerprint and
  chunking; a missing or mismatched starts file is rewritten from the stored entropies, so a
  threshold sweep never runs the model. A `sidecars.json` from another model (or chunking)
  makes every entropy recompute (said on stderr) and drops the old starts files. Every shard
  gets the bits of every rule listed in `sidecars.json`, so a listed tag covers the data.
* Rules. ``rule`` (a `PatchingRule`: global, monotonic, combined or top-k) adds that rule's start
  bits (`bltjax.data.sidecar_rules`); ``threshold`` / ``target_patch_size`` add a global one
  (``target_kind="monotonic"``: a calibrated monotonic one).
* Newline reset (``reset_on_newline``, docs/architecture.md §2.5). Every context also ends after
  each newline byte: the lines of a document (the last one up to EOS) are run as documents of
  their own, so the entropies after a newline are those of the text after it run alone. It is
  part of the identity in `sidecars.json` (toggling it recomputes every entropy) and the pipeline
  refuses sidecars whose reset differs from ``config.patching.entropy_reset_on_newline``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bltjax.data import shards
from bltjax.data.entropy_model import (  # noqa: F401  (re-exported: the entropy pass's public loader)
    DEFAULT_BATCH_SIZE,
    HF_DEFAULT_CONTEXT,
    EntropyModel,
    config_from_byte_lm,
    load_entropy_model,
)
from bltjax.data.sidecar_rules import NEWLINE_ID, listed_rules, rule_of_record, rule_record, rule_tag, stored_rule
from bltjax.data.sidecars import (
    SidecarError,
    SidecarStore,
    data_errors,
    entropy_path,
    read_entropies,
    read_shard,
    sidecar_documents,
    start_mask,
    starts_path,
    sync_processes,
    threshold_tag,
    write_sidecar,
)
from bltjax.models.byte_lm import ByteLM, next_byte_entropy
from bltjax.models.configs import ByteLMConfig
from bltjax.patching import PatchingRule
from bltjax.patching.calibrate import KINDS as CALIBRATED_KINDS
from bltjax.patching.calibrate import UNITS, calibrate_threshold
from bltjax.runtime import paths, xla_options
from bltjax.runtime.atomic import sha256_file
from bltjax.runtime.progress import progress_bar

MIN_BUCKET = 128


def default_overlap(record: ByteLMConfig, context: int) -> int:
    """Exact overlap n_layers * (window - 1) with a window; context // 2 (approximate) without."""
    window = record.stack.window
    return context // 2 if window is None else record.stack.n_layers * (window - 1)


def default_context(record: ByteLMConfig, seq_len: int) -> int:
    """The model's row length, raised for small windowed models so that chunks are >= 2 x overlap.

    A sliding-window model never sees a relative distance beyond its window, so rows longer than
    its training length are safe; without a window they would be extrapolation, so seq_len stays.
    The raise is capped at max(seq_len, 8192) because attention here materialises T x T scores
    (which is also why 2x and not more: on CPU a 512-token row costs ~5x a 256-token one).
    """
    if record.stack.window is None:
        return seq_len
    wanted = 1 << max(0, 2 * default_overlap(record, seq_len) - 1).bit_length()
    return seq_len if seq_len >= wanted else min(wanted, max(seq_len, HF_DEFAULT_CONTEXT))


def document_chunks(offsets: np.ndarray, context: int, overlap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first token, length, first kept position) of every chunk, per document (docs/architecture.md §2.3).

    A document of n <= context tokens is one chunk. A longer one is cut into chunks of at most
    `context` tokens; each chunk after the first starts `overlap` tokens before the outputs it
    keeps, so its kept outputs saw that much context.
    """
    if not 0 <= overlap < context:
        raise SidecarError(f"overlap: expected an integer in [0, context = {context}), got {overlap}")
    starts, lengths = offsets[:-1], np.diff(offsets)
    short = (lengths > 0) & (lengths <= context)
    first = [starts[short]]
    length = [lengths[short]]
    keep = [np.zeros(int(short.sum()), np.int64)]
    stride = context - overlap
    for start, n in zip(starts[lengths > context], lengths[lengths > context], strict=True):
        first.append(np.array([start]))
        length.append(np.array([context]))
        keep.append(np.array([0]))
        out_lo = np.arange(context, n, stride)  # first output position of each further chunk
        out_hi = np.minimum(out_lo + stride, n)
        first.append(start + out_lo - overlap)
        length.append(out_hi - out_lo + overlap)
        keep.append(np.full(out_lo.size, overlap))
    return tuple(np.concatenate(parts).astype(np.int64) for parts in (first, length, keep))


def context_offsets(tokens: np.ndarray, offsets: np.ndarray, reset_on_newline: bool) -> np.ndarray:
    """Where the entropy model's contexts start and end: the documents, cut after every newline
    byte when `reset_on_newline` (docs/architecture.md §2.5)."""
    offsets = np.asarray(offsets, np.int64)
    if not reset_on_newline:
        return offsets
    after_newline = np.flatnonzero(np.asarray(tokens) == NEWLINE_ID) + 1
    return np.union1d(offsets, after_newline).astype(np.int64)


def bucket_lengths(context: int) -> list[int]:
    """Row lengths compiled for: powers of two from MIN_BUCKET below `context`, then `context`."""
    lengths, n = [], min(MIN_BUCKET, context)
    while n < context:
        lengths.append(n)
        n *= 2
    return lengths + [context]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class EntropyRunner:
    """The jitted, data-parallel entropy pass of one model over token streams."""

    def __init__(
        self,
        model: ByteLM,
        params: Any,
        *,
        context: int,
        overlap: int,
        batch_size: int,
        reset_on_newline: bool = False,
        dtype: Any = np.float16,
    ):
        if context < 2:
            raise SidecarError(f"context: expected an integer >= 2, got {context}")
        if batch_size < 1:
            raise SidecarError(f"batch_size: expected a positive integer, got {batch_size}")
        devices = jax.local_devices()
        self.mesh = Mesh(np.array(devices), ("data",), axis_types=(AxisType.Auto,))
        self.rows = NamedSharding(self.mesh, P("data", None))
        replicated = NamedSharding(self.mesh, P())
        self.params = jax.device_put(params, replicated)
        self.devices = len(devices)
        self.context, self.overlap, self.batch_size = context, overlap, batch_size
        self.reset_on_newline, self.dtype = bool(reset_on_newline), np.dtype(dtype)
        self.buckets = bucket_lengths(context)

        def entropies(params, tokens):
            logits = model.apply({"params": params}, tokens)
            return next_byte_entropy(logits).astype(self.dtype)

        self._fn = xla_options.jit(entropies, devices, in_shardings=(replicated, self.rows), out_shardings=self.rows)

    def _rows_for(self, bucket: int, remaining: int) -> int:
        """Rows of one step: a token budget of batch_size x context, a multiple of the devices;
        a bucket's last batch shrinks to a power-of-two multiple of the device count."""
        full = _round_up(max(1, self.batch_size * self.context // bucket), self.devices)
        rows = self.devices
        while rows < remaining and rows < full:
            rows *= 2
        return min(rows, full)

    def shard_entropies(
        self, tokens: np.ndarray, offsets: np.ndarray, progress: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """H_t (float16 unless `dtype`) for every token of a stream of documents (`offsets` [D + 1], docs/data.md)."""
        out = np.zeros(tokens.size, self.dtype)
        offsets = context_offsets(tokens, offsets, self.reset_on_newline)
        first, length, keep = document_chunks(offsets, self.context, self.overlap)
        which = np.searchsorted(self.buckets, length)
        pending: list[tuple[jax.Array, np.ndarray, int]] = []

        def collect() -> None:
            result, chunks, bucket = pending.pop(0)
            values = np.asarray(result)[: chunks.size]
            position = np.arange(bucket)
            keep_mask = (position >= keep[chunks, None]) & (position < length[chunks, None])
            out[(first[chunks, None] + position)[keep_mask]] = values[keep_mask]
            if progress is not None:
                progress(int((length[chunks] - keep[chunks]).sum()))

        for b, bucket in enumerate(self.buckets):
            members = np.flatnonzero(which == b)
            start = 0
            while start < members.size:
                rows = self._rows_for(bucket, members.size - start)
                chunks = members[start : start + rows]
                start += rows
                position = np.arange(bucket)
                valid = position < length[chunks, None]
                index = np.where(valid, first[chunks, None] + position, 0)
                batch = np.zeros((rows, bucket), np.int32)
                batch[: chunks.size] = np.where(valid, tokens[index], 0)  # BOE padding after each document
                pending.append((self._fn(self.params, jax.device_put(batch, self.rows)), chunks, bucket))
                if len(pending) > 1:  # keep one step in flight while the host prepares the next
                    collect()
        while pending:
            collect()
        return out


def compute_entropies(
    model: ByteLM,
    params: Any,
    tokens: np.ndarray,
    offsets: np.ndarray,
    *,
    context: int,
    overlap: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    reset_on_newline: bool = False,
    dtype: Any = np.float16,
) -> np.ndarray:
    """Entropies (float16 unless `dtype`) of a token stream, per document (a one-off `EntropyRunner`)."""
    overlap = default_overlap(model.config, context) if overlap is None else overlap
    runner = EntropyRunner(
        model,
        params,
        context=context,
        overlap=overlap,
        batch_size=batch_size,
        reset_on_newline=reset_on_newline,
        dtype=dtype,
    )
    return runner.shard_entropies(np.asarray(tokens), np.asarray(offsets, np.int64))


# --- the pass over a data folder -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """What one `run` did (per process)."""

    threshold: float | None
    tag: str | None
    computed: tuple[str, ...]  # shards whose entropies were (re)computed
    restarted: tuple[str, ...]  # shards whose starts bits were (re)written
    skipped: tuple[str, ...]  # shards left as they were
    bytes_per_second: float
    calibration: dict | None
    rule: dict | None = None  # the rule this run added (`sidecar_rules.rule_record`), if any


def run(
    data_dir: str | os.PathLike,
    checkpoint: str | os.PathLike,
    *,
    threshold: float | None = None,
    target_patch_size: float | None = None,
    unit: str = "tokens",
    batch_size: int | None = None,
    context: int | None = None,
    overlap: int | None = None,
    calibration_tokens: int | None = None,
    rule: PatchingRule | None = None,
    target_kind: str = "global",
    reset_on_newline: bool = False,
    log: TextIO = sys.stderr,
) -> RunSummary:
    """Writes (or completes) the entropy sidecars of every shard of `data_dir`. See the module doc."""
    data_dir = paths.resolve(data_dir)
    if threshold is not None and target_patch_size is not None:
        raise SidecarError("pass either threshold or target_patch_size, not both")
    if rule is not None:
        if threshold is not None or target_patch_size is not None:
            raise SidecarError("pass either a rule or threshold / target_patch_size, not both")
        rule = stored_rule(rule)
        if rule.kind == "global":  # the historical way to store a global rule
            threshold, rule = rule.threshold, None
    if unit not in UNITS:
        raise SidecarError(f"unit: expected one of {UNITS}, got {unit!r}")
    if target_kind not in CALIBRATED_KINDS:
        raise SidecarError(f"target_kind: expected one of {CALIBRATED_KINDS}, got {target_kind!r}")
    with data_errors():
        manifest = shards.load_manifest(data_dir)
    infos = [info for split in shards.SPLITS for info in manifest.shards(split)]
    entropy_model = load_entropy_model(checkpoint)
    context = int(context or default_context(entropy_model.record, entropy_model.default_context))
    overlap = default_overlap(entropy_model.record, context) if overlap is None else int(overlap)
    if not 0 <= overlap < context:
        hint = " (lower it with --overlap, e.g. window - 1, an approximation)" if overlap >= context else ""
        raise SidecarError(f"overlap: expected an integer in [0, context = {context}), got {overlap}{hint}")
    if 2 * overlap > context:
        print(
            f"entropy: note: documents longer than context={context} cost {context / (context - overlap):.1f}x "
            f"per token beyond the first chunk (overlap={overlap}, exact); a larger --context or a smaller "
            "--overlap (approximate) is cheaper",
            file=log,
        )
    batch_size = int(batch_size or entropy_model.default_batch_size)
    if threshold is None and target_patch_size is None and rule is None:  # a rule given is the one to add
        threshold = entropy_model.default_threshold
    identity = {
        "fingerprint": entropy_model.fingerprint,
        "source": entropy_model.source,
        "context": context,
        "overlap": overlap,
        "window": entropy_model.record.stack.window,
        "n_layers": entropy_model.record.stack.n_layers,
    }
    if reset_on_newline:  # absent when off, so that folders computed before the option keep resuming
        identity["reset_on_newline"] = True
    store = SidecarStore(data_dir, identity, log, model_path=entropy_model.path)
    mine = [s for i, s in enumerate(infos) if i % jax.process_count() == jax.process_index()]
    runner: EntropyRunner | None = None
    # The bar counts tokens still to compute: a shard found done leaves its total.
    total = sum(s.tokens for s in mine)  # the manifest's count; verify_shard checks the file against it
    bar = progress_bar("entropy", total=total, unit=" tokens", file=log)
    started, computed_tokens = time.monotonic(), 0
    computed, restarted, skipped = [], [], []

    def advance(tokens: int) -> None:
        nonlocal computed_tokens
        computed_tokens += tokens
        bar.update(tokens)

    def ensure(shard: shards.ShardInfo, first_pass: bool = True) -> None:
        """Entropies of one shard, then the start bits of every threshold listed in the store."""
        nonlocal runner
        with data_errors():  # sha256 of .tokens and .docs.npy against the manifest, file named
            shards.verify_shard(data_dir, shard.split, shard.index, manifest)
        tokens, offsets = read_shard(data_dir, shard)
        tokens = np.asarray(tokens)  # a view of the memory map; a remote shard is read whole, once
        record = store.shard(shard.name)
        ent_file = entropy_path(data_dir, shard.name)
        entropies = None
        fresh = not (
            record is not None
            and record.get("tokens_sha256") == shard.tokens_sha256
            and ent_file.is_file()
            and sha256_file(ent_file) == record.get("entropy_sha256")
        )
        if fresh:
            if runner is None:
                runner = EntropyRunner(
                    entropy_model.model,
                    entropy_model.params,
                    context=context,
                    overlap=overlap,
                    batch_size=batch_size,
                    reset_on_newline=reset_on_newline,
                )
            entropies = runner.shard_entropies(tokens, offsets, advance)
            for old in data_dir.glob(f"{shard.name}.starts.*.bits"):  # computed from other entropies
                old.unlink()
            record = {
                "split": shard.split,
                "tokens": int(tokens.size),
                "tokens_sha256": shard.tokens_sha256,
                "entropy_sha256": write_sidecar(ent_file, entropies.astype("<f2").tobytes()),
                "starts_sha256": {},
            }
            computed.append(shard.name)
        elif first_pass:
            bar.total -= int(tokens.size)
            bar.refresh()
        changed = fresh
        # Every listed rule, not only this run's: each shard then has every tag of the file.
        for tag, entry in sorted(listed_rules(store.state).items()):
            bits = starts_path(data_dir, shard.name, tag)
            if bits.is_file() and sha256_file(bits) == record["starts_sha256"].get(tag):
                continue
            if entropies is None:
                entropies = read_entropies(data_dir, shard.name)
            mask = start_mask(tokens, offsets, entropies, rule_of_record(entry, f"{store.main}: rule {tag!r}"))
            record = dict(record, starts_sha256=dict(record["starts_sha256"]))
            record["starts_sha256"][tag] = write_sidecar(bits, np.packbits(mask).tobytes())
            changed = True
            if shard.name not in restarted:
                restarted.append(shard.name)
        if changed:
            store.put(shard.name, record)
        elif not fresh:
            skipped.append(shard.name)

    def set_threshold(value: float, calibration: dict | None) -> str:
        tag = threshold_tag(value)
        known = store.state["thresholds"].get(tag)
        if known is None or known.get("threshold") != value or calibration is not None:
            store.state["thresholds"][tag] = {"threshold": value, "calibration": calibration}
        store.state["threshold"], store.state["tag"] = value, tag
        return tag

    def set_rule(value: PatchingRule) -> str:
        tag = rule_tag(value)
        store.state["rules"][tag] = {**rule_record(value), "calibration": None}
        store.state["threshold"], store.state["tag"] = value.threshold, tag
        return tag

    calibration = None
    if target_patch_size is None:
        if rule is not None:
            set_rule(rule)
        elif threshold is not None:
            set_threshold(float(threshold), None)
        for shard in mine:
            ensure(shard)
    else:
        for shard in mine:
            ensure(shard)
        store.flush(force=True)
        sync_processes("bltjax.entropy.computed")
        train = [s for s in infos if s.split == "train"]
        if not train:
            raise SidecarError(f"{data_dir / shards.MANIFEST_NAME}: no 'train' split to calibrate the threshold on")
        result = calibrate_threshold(
            sidecar_documents(data_dir, train, calibration_tokens),
            float(target_patch_size),
            unit=unit,
            kind=target_kind,
        )
        calibration = dataclasses.asdict(result)
        threshold = float(result.threshold)
        if target_kind == "global":
            set_threshold(threshold, calibration)
        else:  # monotonic: the one other rule with a single threshold
            rule = PatchingRule(mode="entropy", threshold=threshold, monotonicity=True)
            store.state["rules"][set_rule(rule)]["calibration"] = calibration
        for shard in mine:
            ensure(shard, first_pass=False)
    bar.close()
    store.finish([s.name for s in infos])
    if rule is not None:
        threshold = rule.threshold
    return RunSummary(
        threshold=None if threshold is None else float(threshold),
        tag=store.state["tag"] if threshold is not None or rule is not None else None,
        computed=tuple(computed),
        restarted=tuple(restarted),
        skipped=tuple(s for s in skipped if s not in restarted),
        bytes_per_second=computed_tokens / max(time.monotonic() - started, 1e-9),
        calibration=calibration,
        rule=None if rule is None else rule_record(rule),
    )
