"""The entropy-sidecar format next to a prepared shard folder: names, readers, start bits, ``sidecars.json``.

    from bltjax.data import sidecars

    tag = sidecars.threshold_tag(1.335442066192627)               # "t1.3354421"
    entropies = sidecars.read_entropies(DATA, "train-00000")      # float16 [T], memory-mapped
    starts = sidecars.read_starts(DATA, "train-00000", tag, entropies.size)   # bool [T]

For each shard ``{split}-{index:05d}.tokens`` of a prepared folder (`bltjax.data.shards`,
docs/data.md) the entropy pass (`bltjax.data.entropy`, ``python -m bltjax.entropy``) writes

    {shard}.entropy.f16         float16 H_t (docs/architecture.md §2.1), one per token, computed per document
    {shard}.starts.{tag}.bits   np.packbits of the patch-start mask of one entropy patching rule
    sidecars.json               model identity, chunking, newline reset, rules, per-shard sha256s

* Start bits follow `patching.patch_start_mask(document, rule, include_next_token=False)` per
  document, for the global, monotonic, combined and top-k rules; `bltjax.data.sidecar_rules`
  computes them (vectorised over the shard) and defines the tags: ``t{θ}`` for the global
  threshold (e.g. t1.3354421 for the released 1.335442066192627: the shortest repr of float32(θ),
  because the patcher compares float16 entropies with the float32 threshold, so equal tags mean
  bit-identical masks, while 4 decimals would alias thresholds below ~0.1), ``m{θ}``,
  ``c{θ}_{θ_add}`` / ``cq...`` and ``k{s}``. ``max_patch_length`` is applied at batch time.
* ``sidecars.json`` lists the global rules under ``thresholds`` (tag -> threshold, calibration),
  as it always has, and every other rule under ``rules`` (tag -> kind and fields). It records,
  per shard, the sha256 of its ``.tokens`` and of every sidecar, and the entropy model's identity
  (fingerprint, chunking and, when set, ``reset_on_newline``): that is what lets the entropy pass
  resume, skip finished shards and rewrite only a missing rule's bits. Several processes
  never write one file: each keeps a journal that process 0 merges (`SidecarStore`).
* Shards are read and verified with `bltjax.data.shards` (its DataFormatError, which names the
  file, is re-raised as `SidecarError`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TextIO

import jax
import numpy as np
from etils import epath

from bltjax.data import shards
from bltjax.data.sidecar_rules import document_start_mask
from bltjax.patching import PatchingRule
from bltjax.runtime import paths
from bltjax.runtime.atomic import write_atomic

SIDECARS_FILE = "sidecars.json"
FORMAT = "bltjax.entropy-sidecars"
VERSION = 1


class SidecarError(ValueError):
    """Data or sidecars that cannot be used; the message names the file and what is wrong."""


# --- file names, writing, reading ------------------------------------------------------------


def threshold_tag(threshold: float) -> str:
    """Deterministic file tag of a threshold: 't' + the shortest repr of its float32 value."""
    value = float(threshold)
    if not math.isfinite(value):
        raise SidecarError(f"threshold: expected a finite number, got {threshold!r}")
    return "t" + str(np.float32(value))


def entropy_path(data_dir: str | os.PathLike, shard: str) -> epath.Path:
    return paths.resolve(data_dir) / f"{shard}.entropy.f16"


def starts_path(data_dir: str | os.PathLike, shard: str, tag: str) -> epath.Path:
    return paths.resolve(data_dir) / f"{shard}.starts.{tag}.bits"


def write_sidecar(path: epath.Path, data: bytes) -> str:
    """Writes ``data`` atomically; returns its sha256 (recorded in sidecars.json)."""
    write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def _write_json(path: epath.Path, value: dict) -> None:
    write_sidecar(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode())


def sync_processes(name: str) -> None:
    """A barrier across the processes of a multi-process run (no-op alone)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def read_data_manifest(data_dir: str | os.PathLike) -> list[shards.ShardInfo]:
    """Every shard of `DATA/manifest.json`, in stream order (train, then validation).

    Read with `bltjax.data.shards.load_manifest`, the checked reader of the format.
    """
    with data_errors():
        manifest = shards.load_manifest(data_dir)
    return [info for split in shards.SPLITS for info in manifest.shards(split)]


@contextlib.contextmanager
def data_errors() -> Iterator[None]:
    """The shard format's DataFormatError (its message names the file) becomes a SidecarError."""
    try:
        yield
    except shards.DataFormatError as err:
        raise SidecarError(str(err)) from err


def read_shard(data_dir: str | os.PathLike, shard: shards.ShardInfo) -> tuple[np.ndarray, np.ndarray]:
    """(uint16 tokens [T], int64 document offsets [D + 1]) via the shard format's structural checks.

    Locally the tokens are a memory map; for a remote shard, ranged reads (`shards.open_array`).
    """
    with data_errors():
        return shards.read_shard(data_dir, shard.split, shard.index)


def start_mask(
    tokens: np.ndarray, offsets: np.ndarray, entropies: np.ndarray, rule: PatchingRule | float
) -> np.ndarray:
    """bool [T]: `patch_start_mask(document, rule, include_next_token=False)` of every document.

    `rule` is an entropy `PatchingRule` or a global threshold (`sidecar_rules.document_start_mask`).
    """
    if not isinstance(rule, PatchingRule):
        rule = PatchingRule(mode="entropy", threshold=float(rule))
    return document_start_mask(tokens, offsets, entropies, rule)


def read_entropies(data_dir: str | os.PathLike, shard: str) -> np.ndarray:
    """The float16 entropy sidecar of a shard (memory-mapped, or read by range from a remote store)."""
    path = entropy_path(data_dir, shard)
    return shards.open_array(path, np.dtype("<f2"), path.stat().length // 2)


def read_starts(data_dir: str | os.PathLike, shard: str, tag: str, tokens: int) -> np.ndarray:
    """The bool start mask [tokens] of a shard for threshold `tag`."""
    packed = np.frombuffer(starts_path(data_dir, shard, tag).read_bytes(), np.uint8)
    return np.unpackbits(packed, count=tokens).astype(bool)


def sidecar_documents(
    data_dir: str | os.PathLike, infos: Sequence[shards.ShardInfo], limit: int | None = None
) -> list[np.ndarray]:
    """Per-document entropies of the shards `infos` in stream order, whole documents up to `limit` tokens.

    This is what threshold calibration reads (here and in `python -m bltjax.calibrate --data`).
    """
    documents: list[np.ndarray] = []
    budget = math.inf if limit is None else int(limit)
    for shard in infos:
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


# --- sidecars.json ---------------------------------------------------------------------------


def _journals(data_dir: epath.Path) -> list[epath.Path]:
    """Per-process journals, oldest first (so a newer record of a shard wins the merge)."""
    return sorted(data_dir.glob(".sidecars.process-*.json"), key=lambda p: (p.stat().mtime, p.name))


class SidecarStore:
    """sidecars.json plus per-process journals, so several processes never write one file.

    Single process: sidecars.json is rewritten (atomically) at most every few seconds and at
    the end. Several processes: each writes `.sidecars.process-{i}.json` with the records of its
    own shards; process 0 merges them into sidecars.json at the end. Journals left by an
    interrupted run are merged when the next run starts.
    """

    FLUSH_SECONDS = 5.0

    def __init__(self, data_dir: epath.Path, identity: dict, log: TextIO, model_path: str | None = None):
        self.dir = data_dir
        self.identity = identity
        self.model_path = model_path  # said in the pipeline's "compute them with" hints; not identity
        self.main = data_dir / SIDECARS_FILE
        self.journal = data_dir / f".sidecars.process-{jax.process_index()}.json"
        self.state = {"shards": {}, "thresholds": {}, "rules": {}, "threshold": None, "tag": None}
        self.mine: set[str] = set()
        self.last_flush = time.monotonic()
        stale = None
        for path in [self.main, *_journals(data_dir)]:
            try:
                saved = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # an unreadable record only costs a recomputation
            if saved.get("format") != FORMAT or saved.get("entropy_model") != identity:
                stale = saved.get("entropy_model")
                continue
            self.state["shards"].update(saved.get("shards", {}))
            self.state["thresholds"].update(saved.get("thresholds", {}))
            self.state["rules"].update(saved.get("rules", {}))
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

    def document(self, names: Iterable[str] | None = None) -> dict:
        records = self.state["shards"]
        keep = records if names is None else {n: records[n] for n in names if n in records}
        return {
            "format": FORMAT,
            "version": VERSION,
            "entropy_model": self.identity,
            "threshold": self.state["threshold"],
            "tag": self.state["tag"],
            "thresholds": self.state["thresholds"],
            "rules": self.state["rules"],
            "entropy_model_path": self.model_path,
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
        sync_processes("bltjax.entropy.journals")
        if jax.process_index() == 0:
            journals = _journals(self.dir)
            for path in journals:
                saved = json.loads(path.read_text())
                if saved.get("entropy_model") == self.identity:
                    self.state["shards"].update(saved.get("shards", {}))
            _write_json(self.main, self.document(listed))
            for path in journals:
                path.unlink()
        sync_processes("bltjax.entropy.merged")
