"""Entropy sidecars: next-byte entropies and patch-start bits next to every byte shard.

    python -m bltjax.entropy --data DATA --checkpoint ENTROPY_MODEL_DIR [--threshold t | --target-patch-size s]

For each shard `{split}-{index:05d}.tokens` of a prepared folder (docs/data.md) this writes

    {shard}.entropy.f16         float16 H_t (spec §2.1), one per token, computed per document
    {shard}.starts.{tag}.bits   np.packbits of the patch-start mask for one threshold
    sidecars.json               model fingerprint, chunking, thresholds, per-shard sha256s

`ENTROPY_MODEL_DIR` is a bltjax model folder (`bltjax.training.checkpoint_io.save_model`, model_type
"byte_lm") or a Hugging Face BLT folder, whose entropy patcher and stored threshold are used.

Design
------
* Context (spec §2.3). Every document (BOS..EOS, from `.docs.npy`) is run alone: context never
  crosses a document or a row. A document longer than `context` tokens is cut into chunks of at
  most `context` tokens; each chunk after the first re-reads the `overlap` tokens before its
  first output position and keeps only the outputs after them. With a sliding window w and L
  layers a position depends on the previous L * (w - 1) tokens (each layer looks w - 1 back, and
  the layers compound), so the default overlap is L * (w - 1): results then do not depend on
  chunking at all (up to float rounding; RoPE is relative, so where a chunk starts does not
  matter). The spec's "overlap w - 1" bounds only the first layer and is *not* exact for L > 1;
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
* Start bits follow `patching.patch_start_mask(mode="entropy", threshold=t,
  include_next_token=False)` per document. They are computed in one vectorised pass over the
  whole shard: the global rule compares H_{p-1} with t, so running it on the concatenated
  stream and then forcing positions 0 and 1 of every document is exactly the per-document mask.
* Threshold tags. `tag = "t" + shortest repr of float32(t)` (e.g. t1.3354421 for the released
  1.335442066192627). The patcher compares float16 entropies with the threshold rounded to
  float32, so equal tags mean bit-identical masks, while 4 decimals would alias thresholds
  below ~0.1, where float16 entropies are finer than 1e-4.
* Resume. A shard is skipped when its `.tokens` sha256 matches the data manifest and its
  recorded sidecars exist with matching sha256s and come from the same model fingerprint and
  chunking; a missing or mismatched starts file is rewritten from the stored entropies, so a
  threshold sweep never runs the model. A `sidecars.json` from another model (or chunking)
  makes every entropy recompute (said on stderr) and drops the old starts files. Every shard
  gets the bits of every threshold listed in `sidecars.json`, so a listed tag covers the data.
* Shards are read and verified with `bltjax.data.prepare`'s `load_manifest`, `read_shard` and
  `verify_shard` (its DataFormatError, which names the file, is re-raised as SidecarError).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bltjax.calibrate import UNITS, calibrate_threshold
from bltjax.config import base_byte_lm_config
from bltjax.data import prepare
from bltjax.models.byte_lm import ByteLM, next_byte_entropy
from bltjax.models.configs import ByteLMConfig
from bltjax.patching.rules import patch_start_mask
from bltjax.runtime import distributed, xla_options
from bltjax.runtime.atomic import sha256_file, write_atomic
from bltjax.training import checkpoint_io

SIDECARS_FILE = "sidecars.json"
MANIFEST_FILE = prepare.MANIFEST_NAME
FORMAT = "bltjax.entropy-sidecars"
VERSION = 1
MIN_BUCKET = 128
HF_DEFAULT_CONTEXT = 8192  # rows of the official entropy pass (spec §2.3)
DEFAULT_BATCH_SIZE = 8


class SidecarError(ValueError):
    """Data or sidecars that cannot be used; the message names the file and what is wrong."""


# --- file names and small helpers ------------------------------------------------------------


def threshold_tag(threshold: float) -> str:
    """Deterministic file tag of a threshold: 't' + the shortest repr of its float32 value."""
    value = float(threshold)
    if not math.isfinite(value):
        raise SidecarError(f"threshold: expected a finite number, got {threshold!r}")
    return "t" + str(np.float32(value))


def entropy_path(data_dir: str | os.PathLike, shard: str) -> pathlib.Path:
    return pathlib.Path(data_dir) / f"{shard}.entropy.f16"


def starts_path(data_dir: str | os.PathLike, shard: str, tag: str) -> pathlib.Path:
    return pathlib.Path(data_dir) / f"{shard}.starts.{tag}.bits"


def _atomic_write(path: pathlib.Path, data: bytes) -> str:
    """Writes ``data`` atomically; returns its sha256 (recorded in sidecars.json)."""
    write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def _write_json(path: pathlib.Path, value: dict) -> None:
    _atomic_write(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode())


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# --- the data folder -------------------------------------------------------------------------


def read_data_manifest(data_dir: str | os.PathLike) -> list[prepare.ShardInfo]:
    """Every shard of `DATA/manifest.json`, in stream order (train, then validation).

    Read with `bltjax.data.prepare.load_manifest`, the checked reader of the format.
    """
    with _data_errors():
        manifest = prepare.load_manifest(data_dir)
    return [info for split in prepare.SPLITS for info in manifest.shards(split)]


@contextlib.contextmanager
def _data_errors() -> Iterator[None]:
    """prepare's DataFormatError (message names the file) becomes this module's SidecarError."""
    try:
        yield
    except prepare.DataFormatError as err:
        raise SidecarError(str(err)) from err


def read_shard(data_dir: str | os.PathLike, shard: prepare.ShardInfo) -> tuple[np.ndarray, np.ndarray]:
    """(uint16 token memmap [T], int64 document offsets [D + 1]) via prepare's structural checks."""
    with _data_errors():
        return prepare.read_shard(data_dir, shard.split, shard.index)


# --- the entropy model -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EntropyModel:
    """A loaded entropy model and what identifies it."""

    model: ByteLM
    params: Any
    config: ml_collections.ConfigDict
    fingerprint: str
    source: str  # "bltjax" or "huggingface"
    path: str
    default_threshold: float | None
    default_context: int
    default_batch_size: int

    @property
    def record(self) -> ByteLMConfig:
        return self.model.config


def config_from_byte_lm(record: ByteLMConfig, seq_len: int = HF_DEFAULT_CONTEXT) -> ml_collections.ConfigDict:
    """The experiment ConfigDict of a ByteLM record (so an imported model can be fingerprinted/saved)."""
    config = base_byte_lm_config()
    config.model.stack = ml_collections.ConfigDict(dataclasses.asdict(record.stack))
    for name in ("vocab_size", "document_mask", "dtype", "param_dtype", "init_std_factor"):
        config.model[name] = getattr(record, name)
    config.data.seq_len = seq_len
    return config


def load_entropy_model(directory: str | os.PathLike) -> EntropyModel:
    """A bltjax model folder (model_type byte_lm) or a Hugging Face BLT folder's entropy patcher."""
    path = pathlib.Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder (expected an entropy model checkpoint)")
    if (path / checkpoint_io.PARAMS_DIR).is_dir():
        config = checkpoint_io.load_config_json(path)
        if config.get("model_type") != "byte_lm":
            raise SidecarError(
                f"{path / checkpoint_io.CONFIG_FILE}: field 'model_type' is {config.get('model_type')!r}; "
                "an entropy model must be a 'byte_lm'"
            )
        config, model, params = checkpoint_io.load_model(path)
        return EntropyModel(
            model,
            params,
            config,
            checkpoint_io.fingerprint(config, params),
            "bltjax",
            str(path.absolute()),
            None,
            int(config.data.seq_len),
            int(config.data.batch_size),
        )
    from bltjax.convert import hf

    if (path / hf.WEIGHTS_FILE).is_file():
        model, params, threshold = hf.load_hf_entropy_model(path)
        config = config_from_byte_lm(model.config)
        return EntropyModel(
            model,
            params,
            config,
            checkpoint_io.fingerprint(config, params),
            "huggingface",
            str(path.absolute()),
            None if threshold is None else float(threshold),
            HF_DEFAULT_CONTEXT,
            DEFAULT_BATCH_SIZE,
        )
    raise SidecarError(
        f"{path}: neither a bltjax model folder ({checkpoint_io.CONFIG_FILE} + {checkpoint_io.PARAMS_DIR}/, "
        f"from bltjax.training.checkpoint_io.save_model) nor a Hugging Face BLT folder "
        f"({hf.CONFIG_FILE} + {hf.WEIGHTS_FILE})"
    )


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


# --- chunks, buckets and the batched model run -----------------------------------------------


def document_chunks(offsets: np.ndarray, context: int, overlap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first token, length, first kept position) of every chunk, per document (spec §2.3).

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

    def __init__(self, model: ByteLM, params: Any, *, context: int, overlap: int, batch_size: int):
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
        self.buckets = bucket_lengths(context)

        def entropies(params, tokens):
            logits = model.apply({"params": params}, tokens)
            return next_byte_entropy(logits).astype(jnp.float16)

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
        """float16 H_t for every token of a stream of documents (`offsets` [D + 1], docs/data.md)."""
        out = np.zeros(tokens.size, np.float16)
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
) -> np.ndarray:
    """float16 entropies of a token stream, per document (a one-off `EntropyRunner`)."""
    overlap = default_overlap(model.config, context) if overlap is None else overlap
    runner = EntropyRunner(model, params, context=context, overlap=overlap, batch_size=batch_size)
    return runner.shard_entropies(np.asarray(tokens), np.asarray(offsets, np.int64))


def start_mask(tokens: np.ndarray, offsets: np.ndarray, entropies: np.ndarray, threshold: float) -> np.ndarray:
    """bool [T]: `patch_start_mask(mode='entropy', threshold, include_next_token=False)` per document.

    One pass over the stream, then positions 0 and 1 of every document are forced: the global
    rule only looks at H_{p-1}, so this equals patching every document alone.
    """
    total = int(tokens.size)
    if total == 0:
        return np.zeros(0, bool)
    mask = patch_start_mask(
        np.asarray(tokens).reshape(1, total),
        mode="entropy",
        entropies=np.asarray(entropies).reshape(1, total),
        threshold=float(threshold),
        include_next_token=False,
    )[0]
    starts, lengths = offsets[:-1], np.diff(offsets)
    mask[starts[lengths >= 1]] = True
    mask[starts[lengths >= 2] + 1] = True
    return mask


def read_entropies(data_dir: str | os.PathLike, shard: str) -> np.ndarray:
    """The float16 entropy sidecar of a shard (memory-mapped)."""
    path = entropy_path(data_dir, shard)
    return np.memmap(path, dtype="<f2", mode="r") if path.stat().st_size else np.zeros(0, "<f2")


def read_starts(data_dir: str | os.PathLike, shard: str, tag: str, tokens: int) -> np.ndarray:
    """The bool start mask [tokens] of a shard for threshold `tag`."""
    return np.unpackbits(np.fromfile(starts_path(data_dir, shard, tag), np.uint8), count=tokens).astype(bool)


# --- sidecars.json ---------------------------------------------------------------------------


class _Store:
    """sidecars.json plus per-process journals, so several processes never write one file.

    Single process: sidecars.json is rewritten (atomically) at most every few seconds and at
    the end. Several processes: each writes `.sidecars.process-{i}.json` with the records of its
    own shards; process 0 merges them into sidecars.json at the end. Journals left by an
    interrupted run are merged when the next run starts.
    """

    FLUSH_SECONDS = 5.0

    def __init__(self, data_dir: pathlib.Path, identity: dict, log: TextIO):
        self.dir = data_dir
        self.identity = identity
        self.main = data_dir / SIDECARS_FILE
        self.journal = data_dir / f".sidecars.process-{jax.process_index()}.json"
        self.state = {"shards": {}, "thresholds": {}, "threshold": None, "tag": None}
        self.mine: set[str] = set()
        self.last_flush = time.monotonic()
        stale = None
        for path in [self.main, *sorted(data_dir.glob(".sidecars.process-*.json"), key=lambda p: p.stat().st_mtime)]:
            try:
                saved = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # an unreadable record only costs a recomputation
            if saved.get("format") != FORMAT or saved.get("entropy_model") != identity:
                stale = saved.get("entropy_model")
                continue
            self.state["shards"].update(saved.get("shards", {}))
            self.state["thresholds"].update(saved.get("thresholds", {}))
            if path == self.main:
                self.state["threshold"], self.state["tag"] = saved.get("threshold"), saved.get("tag")
        if stale is not None and not self.state["shards"]:
            old = (stale or {}).get("fingerprint", "?")
            print(
                f"entropy: {self.main} was computed by another entropy model or chunking "
                f"(fingerprint {str(old)[:12]}, now {identity['fingerprint'][:12]}); recomputing all entropies",
                file=log,
            )

    def shard(self, name: str) -> dict | None:
        return self.state["shards"].get(name)

    def put(self, name: str, record: dict) -> None:
        self.state["shards"][name] = record
        self.mine.add(name)
        self.flush(force=False)

    def document(self, shards: Iterable[str] | None = None) -> dict:
        records = self.state["shards"]
        keep = records if shards is None else {n: records[n] for n in shards if n in records}
        return {
            "format": FORMAT,
            "version": VERSION,
            "entropy_model": self.identity,
            "threshold": self.state["threshold"],
            "tag": self.state["tag"],
            "thresholds": self.state["thresholds"],
            "shards": keep,
        }

    def flush(self, force: bool) -> None:
        if not force and time.monotonic() - self.last_flush < self.FLUSH_SECONDS:
            return
        if jax.process_count() == 1:
            _write_json(self.main, self.document())
        else:
            _write_json(self.journal, self.document(sorted(self.mine)))
        self.last_flush = time.monotonic()

    def finish(self, listed: Sequence[str]) -> None:
        """Writes the merged sidecars.json (records of shards still in the manifest only)."""
        self.flush(force=True)
        _sync("bltjax.entropy.journals")
        if jax.process_index() == 0:
            journals = sorted(self.dir.glob(".sidecars.process-*.json"), key=lambda p: p.stat().st_mtime)
            for path in journals:
                saved = json.loads(path.read_text())
                if saved.get("entropy_model") == self.identity:
                    self.state["shards"].update(saved.get("shards", {}))
            _write_json(self.main, self.document(listed))
            for path in journals:
                path.unlink()
        _sync("bltjax.entropy.merged")


# --- progress --------------------------------------------------------------------------------


class _Progress:
    """A throttled progress line on stderr: tokens done (1 token = 1 byte, plus BOS/EOS) and bytes/s."""

    def __init__(self, total: int, log: TextIO, every: float = 2.0):
        self.total, self.log, self.every = total, log, every
        self.done = 0
        self.start = self.last = time.monotonic()
        self.computed = 0

    def rate(self) -> float:
        return self.computed / max(time.monotonic() - self.start, 1e-9)

    def __call__(self, tokens: int) -> None:
        self.done += tokens
        self.computed += tokens
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.line()

    def skip(self, tokens: int) -> None:
        self.done += tokens

    def line(self, label: str = "") -> None:
        pct = 100.0 * self.done / max(self.total, 1)
        print(
            f"entropy: {self.done:,}/{self.total:,} tokens ({pct:.1f}%), {self.rate():,.0f} bytes/s {label}".rstrip(),
            file=self.log,
            flush=True,
        )


# --- the command -----------------------------------------------------------------------------


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


def sidecar_documents(
    data_dir: pathlib.Path, shards: Sequence[prepare.ShardInfo], limit: int | None = None
) -> list[np.ndarray]:
    """Per-document entropies of `shards` in stream order, whole documents up to `limit` tokens.

    This is what threshold calibration reads (here and in `python -m bltjax.calibrate --data`).
    """
    documents: list[np.ndarray] = []
    budget = math.inf if limit is None else int(limit)
    for shard in shards:
        _, offsets = read_shard(data_dir, shard)
        values = np.asarray(read_entropies(data_dir, shard.name))
        taken = int(np.searchsorted(np.cumsum(np.diff(offsets)), budget, side="right"))
        if not documents and taken == 0 and offsets.size > 1:
            taken = 1  # at least one document, however long
        parts = np.split(values[: offsets[taken]], offsets[1:taken])
        documents.extend(part for part in parts if part.size)
        budget -= int(offsets[taken])
        if taken < offsets.size - 1:
            break
    return documents


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
    log: TextIO = sys.stderr,
) -> RunSummary:
    """Writes (or completes) the entropy sidecars of every shard of `data_dir`. See the module doc."""
    data_dir = pathlib.Path(data_dir)
    if threshold is not None and target_patch_size is not None:
        raise SidecarError("pass either threshold or target_patch_size, not both")
    if unit not in UNITS:
        raise SidecarError(f"unit: expected one of {UNITS}, got {unit!r}")
    with _data_errors():
        manifest = prepare.load_manifest(data_dir)
    shards = [info for split in prepare.SPLITS for info in manifest.shards(split)]
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
    if threshold is None and target_patch_size is None:
        threshold = entropy_model.default_threshold
    identity = {
        "fingerprint": entropy_model.fingerprint,
        "source": entropy_model.source,
        "context": context,
        "overlap": overlap,
        "window": entropy_model.record.stack.window,
        "n_layers": entropy_model.record.stack.n_layers,
    }
    store = _Store(data_dir, identity, log)
    mine = [s for i, s in enumerate(shards) if i % jax.process_count() == jax.process_index()]
    runner: EntropyRunner | None = None
    progress = _Progress(sum((data_dir / f"{s.name}.tokens").stat().st_size // 2 for s in mine), log)
    computed, restarted, skipped = [], [], []

    def ensure(shard: prepare.ShardInfo, first_pass: bool = True) -> None:
        """Entropies of one shard, then the start bits of every threshold listed in the store."""
        nonlocal runner
        with _data_errors():  # sha256 of .tokens and .docs.npy against the manifest, file named
            prepare.verify_shard(data_dir, shard.split, shard.index, manifest)
        tokens, offsets = read_shard(data_dir, shard)
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
                    entropy_model.model, entropy_model.params, context=context, overlap=overlap, batch_size=batch_size
                )
            entropies = runner.shard_entropies(tokens, offsets, progress)
            for old in data_dir.glob(f"{shard.name}.starts.*.bits"):  # computed from other entropies
                old.unlink()
            record = {
                "split": shard.split,
                "tokens": int(tokens.size),
                "tokens_sha256": shard.tokens_sha256,
                "entropy_sha256": _atomic_write(ent_file, entropies.astype("<f2").tobytes()),
                "starts_sha256": {},
            }
            computed.append(shard.name)
        elif first_pass:
            progress.skip(int(tokens.size))
        changed = fresh
        # Every listed threshold, not only this run's: each shard then has every tag of the file.
        for tag, entry in sorted(store.state["thresholds"].items()):
            bits = starts_path(data_dir, shard.name, tag)
            if bits.is_file() and sha256_file(bits) == record["starts_sha256"].get(tag):
                continue
            if entropies is None:
                entropies = read_entropies(data_dir, shard.name)
            mask = start_mask(tokens, offsets, entropies, entry["threshold"])
            record = dict(record, starts_sha256=dict(record["starts_sha256"]))
            record["starts_sha256"][tag] = _atomic_write(bits, np.packbits(mask).tobytes())
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

    calibration = None
    if target_patch_size is None:
        if threshold is not None:
            set_threshold(float(threshold), None)
        for shard in mine:
            ensure(shard)
    else:
        for shard in mine:
            ensure(shard)
        store.flush(force=True)
        _sync("bltjax.entropy.computed")
        train = [s for s in shards if s.split == "train"]
        if not train:
            raise SidecarError(f"{data_dir / MANIFEST_FILE}: no 'train' split to calibrate the threshold on")
        result = calibrate_threshold(
            sidecar_documents(data_dir, train, calibration_tokens), float(target_patch_size), unit=unit
        )
        calibration = dataclasses.asdict(result)
        threshold = float(result.threshold)
        set_threshold(threshold, calibration)
        for shard in mine:
            ensure(shard, first_pass=False)
    if computed:
        progress.line("(done)")
    store.finish([s.name for s in shards])
    return RunSummary(
        threshold=None if threshold is None else float(threshold),
        tag=store.state["tag"] if threshold is not None else None,
        computed=tuple(computed),
        restarted=tuple(restarted),
        skipped=tuple(s for s in skipped if s not in restarted),
        bytes_per_second=progress.rate(),
        calibration=calibration,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bltjax.entropy",
        description="Entropy sidecars (next-byte entropies and patch-start bits) next to every byte shard.",
    )
    parser.add_argument("--data", required=True, help="a folder written by python -m bltjax.data.prepare")
    parser.add_argument(
        "--checkpoint", required=True, help="a bltjax byte_lm model folder or a Hugging Face BLT folder"
    )
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--threshold", type=float, help="global entropy threshold (default: the checkpoint's)")
    choice.add_argument(
        "--target-patch-size", type=float, help="calibrate the threshold on the train split for this mean patch size"
    )
    parser.add_argument("--unit", choices=UNITS, default="tokens", help="what --target-patch-size counts")
    parser.add_argument("--calibration-tokens", type=int, help="calibrate on at most this many train tokens")
    parser.add_argument("--batch-size", type=int, help="rows of --context tokens per step (default: the model's)")
    parser.add_argument("--context", type=int, help="longest chunk in tokens (default: see the module doc)")
    parser.add_argument("--overlap", type=int, help="tokens re-read by each further chunk (default: exact)")
    parser.add_argument("--coordinator", help="host:port of process 0, for multi-process runs")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    args = parser.parse_args(argv)
    try:  # flags, else the environment a launcher sets (bltjax/runtime/distributed.py), else one process
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    except distributed.DistributedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        summary = run(
            args.data,
            args.checkpoint,
            threshold=args.threshold,
            target_patch_size=args.target_patch_size,
            unit=args.unit,
            batch_size=args.batch_size,
            context=args.context,
            overlap=args.overlap,
            calibration_tokens=args.calibration_tokens,
        )
    except (SidecarError, checkpoint_io.CheckpointError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if summary.calibration is not None:
        c = summary.calibration
        print(
            f"calibrated threshold {summary.threshold!r} for {c['target_patch_size']:g} {c['unit']} per patch: "
            f"mean {c['mean_tokens_per_patch']:.4f} tokens / {c['mean_bytes_per_patch']:.4f} bytes per patch "
            f"on {c['documents']} train documents"
        )
    if summary.tag is None:
        print("no threshold given and none stored in the checkpoint: wrote entropies only")
    else:
        print(f"threshold={summary.threshold!r} tag={summary.tag}")
    print(
        f"shards: {len(summary.computed)} entropies computed, {len(summary.restarted)} starts written, "
        f"{len(summary.skipped)} skipped; {summary.bytes_per_second:,.0f} bytes/s"
    )
    return 0
