"""Training batches from byte shards: fixed windows -> (tokens, targets, loss mask, patch lengths).

    shards (+ sidecars) --WindowSource--> shuffle(seed) --repeat--> rows --batch/slice--> builder

The whole pipeline is map-only over a random-access source, so the batch of step s is a pure
function of (seed, s): resuming needs only the step (levanter's idea), and the rows a process
reads do not depend on how many processes or devices there are. The format it reads is the
contract of docs/data.md; the decisions below are also written down there ("Pipeline").

Decisions
---------
* Windows. Window w of a shard with T tokens is tokens [w*N, w*N + N + 1): N inputs plus the
  target of the last one, so consecutive windows share one token and every token of the shard
  except the first is a target exactly once. Windows never cross shards; the tail of a shard
  that cannot fill N + 1 tokens (fewer than N tokens after the last full window) is dropped.
  Windows do cross documents (EOS -> BOS is a real target, docs/architecture.md §10 item 6); the model's
  document masks come from the EOS tokens inside the row.
* Order. The index of every window of the split is permuted by grain's global index shuffle
  (`MapDataset.shuffle(seed)`, O(1) memory), and `.repeat()` draws a new permutation each epoch
  (grain seeds epoch e with seed + e). Global row r is element r of that endless stream, and the
  global batch of step s is rows [s*B, (s+1)*B).
* Processes. Process p of P builds rows [s*B + p*B/P, s*B + (p+1)*B/P) of step s only (its
  contiguous slice: `rows.batch(B/P)[p::P]`), so the union over processes is the global batch
  and no host reads the rows of another. `global_batch` places them with
  `jax.make_array_from_process_local_data`, after checking that the mesh gives this process
  exactly that row range.
* Patch lengths use the training convention (row sum N + 1, first patch exactly 1: docs/architecture.md §3.2,
  §3.3, §10 item 3). static/space/byte are computed on the window's N input tokens with
  `patch_lengths(..., include_next_token=True)`. entropy (global, monotonic, combined or top-k)
  reads the N + 1 start bits of the window from `{shard}.starts.{tag}.bits`, the sidecar of that
  rule (computed per document, so patches never straddle documents; `data.sidecar_rules`),
  forces starts at positions 0 and 1 (this re-splits the first patch of a window that begins
  mid-document into [1, L - 1]), takes the bit of token N as the decision for the virtual next
  token (§3.3), then applies `max_patch_length` (§3.12) if configured.
* Overflow (a row with more than `max_patches` patches). Default `overflow="truncate"`: the
  patches from column max_patches - 1 on are merged into that last column, so the row still sums
  to N + 1, and every target from the first merged-away patch start s on (positions i >= s - 1)
  is masked out of the loss. That is exact, not an approximation: target t of patch j is
  predicted from global patch j - 1 (§8.2), and every patch before s is unchanged, so each target
  left in the loss sees the patching it would have had with unlimited max_patches.
  `overflow="error"` raises instead.
* Verification. At construction (always, cheap): manifest, every shard's existence and size
  (2 bytes per token), and in entropy mode `sidecars.json` (the rule and its tag, the newline reset, and that each
  sidecar was computed from this shard's sha256) plus each bits file's existence and size.
  Content hashes: `verify="eager"` (default) hashes every shard and sidecar once per process at
  construction; `"lazy"` hashes a shard when the source first opens it (in whichever worker);
  `"size"` skips content hashes, for corpora too big to hash at every start (run prepare's
  verification offline then). Hashes are cached per process by (path, size, mtime).
* Host side: numpy only; tokens stay uint16 in the memmap (ranged reads for a remote shard) and
  become int32 in the batch map.
  jax is imported only by `global_batch`, so data workers start without it.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from etils import epath

from bltjax.data import bpe, mixture, packing, sidecar_rules, token_pipeline
from bltjax.data import shards as shard_format
from bltjax.data.batches import batch_at_step, global_batch, make_iterator  # noqa: F401 (their old home)
from bltjax.data.errors import DataError
from bltjax.patching import PatchingRule, lengths_from_start_mask, patch_lengths, split_long_patches
from bltjax.runtime import paths
from bltjax.runtime.atomic import sha256_file
from bltjax.tokenizer import BOE_ID, VOCAB_SIZE

MANIFEST = shard_format.MANIFEST_NAME
SIDECAR_MANIFEST = "sidecars.json"
SIDECAR_FORMAT = ("bltjax.entropy-sidecars", 1)  # (format, version) written by bltjax.data.entropy
VERIFY_MODES = ("eager", "lazy", "size")
OVERFLOW_POLICIES = ("truncate", "error")


# ---------------------------------------------------------------------------------------------
# Reading the format: shards through bltjax.data.shards' readers, sidecars.json here


@dataclasses.dataclass(frozen=True)
class Shard:
    """One shard of a split as the pipeline needs it (plain strings and ints: picklable)."""

    data_dir: str
    info: shard_format.ShardInfo  # the manifest entry: name, token count, sha256s
    starts_path: str | None = None  # entropy mode: the start-bit sidecar of the chosen tag
    starts_sha256: str | None = None

    @property
    def tokens_path(self) -> str:
        return os.fspath(paths.resolve(self.data_dir) / self.info.tokens_file)

    @property
    def n_tokens(self) -> int:
        return self.info.tokens


@contextlib.contextmanager
def _as_data_error() -> Iterator[None]:
    """prepare's readers raise FileNotFoundError / DataFormatError; the pipeline raises one type."""
    try:
        yield
    except (FileNotFoundError, shard_format.DataFormatError) as error:
        raise DataError(str(error)) from error


def has_split(data_dir: str | os.PathLike, split: str) -> bool:
    """Whether `manifest.json` lists any shard for `split` (a corpus of a few large files may have no validation)."""
    if bpe.is_token_folder(data_dir):  # a token LM's folder (python -m bltjax.bpe)
        return token_pipeline.has_split(data_dir, split)
    with _as_data_error():
        manifest = shard_format.load_manifest(data_dir)
    return bool(manifest.splits.get(split))


def read_split(data_dir: str | os.PathLike, split: str) -> list[Shard]:
    """The shards of `split` listed by `manifest.json` (prepare's checked reader), in stream order."""
    with _as_data_error():
        manifest = shard_format.load_manifest(data_dir)
    if split not in manifest.splits:
        raise DataError(f"{manifest.path}: no split {split!r}; found splits {sorted(manifest.splits)}")
    if not manifest.splits[split]:
        raise DataError(f"{manifest.path}: split {split!r} lists no shards")
    return [Shard(os.fspath(paths.resolve(data_dir)), info) for info in manifest.splits[split]]


def _read_sidecars(path: epath.Path, rule: PatchingRule) -> dict[str, Any]:
    if not path.is_file():
        command = sidecar_rules.entropy_command(path.parent, rule, rule.entropy_reset_on_newline, None)
        raise DataError(f"{path}: missing sidecar manifest; compute the sidecars with: {command}")
    try:
        sidecars = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: unreadable sidecar manifest ({error})") from error
    found = (sidecars.get("format"), sidecars.get("version")) if isinstance(sidecars, dict) else None
    if found != SIDECAR_FORMAT:
        raise DataError(f"{path}: field 'format', 'version': expected {SIDECAR_FORMAT}, got {found}")
    return sidecars


def _choose_tag(path: epath.Path, sidecars: Mapping[str, Any], rule: PatchingRule, tag: str | None) -> str:
    """The tag of the sidecar that holds the configured rule (global, monotonic, combined or top-k);
    an explicit tag must hold it. `bltjax.data.sidecar_rules.choose_tag` compares rules as the
    patcher does (float32 thresholds) and names the command that computes a missing rule."""
    try:
        return sidecar_rules.choose_tag(path, sidecars, rule, tag, path.parent)
    except sidecar_rules.SidecarRuleError as error:
        raise DataError(str(error)) from error


def attach_sidecars(
    data_dir: str | os.PathLike,
    shards: Sequence[Shard],
    patching: PatchingRule | Mapping[str, Any],
    *,
    tag: str | None = None,
) -> list[Shard]:
    """Shards with their start-bit sidecar; checks `sidecars.json` against the rule (a PatchingRule
    or the ``config.patching`` fields) and the shards."""
    rule = patching if isinstance(patching, PatchingRule) else PatchingRule.from_config(patching)
    root = paths.resolve(data_dir)
    path = root / SIDECAR_MANIFEST
    sidecars = _read_sidecars(path, rule)
    tag = _choose_tag(path, sidecars, rule, tag)
    out = []
    for shard in shards:
        bits = root / f"{shard.info.name}.starts.{tag}.bits"
        record = sidecars.get("shards", {}).get(shard.info.name)
        if not isinstance(record, Mapping):
            raise DataError(f"{path}: no record for shard {shard.info.name}; the sidecars do not cover this split")
        if record.get("tokens_sha256") != shard.info.tokens_sha256:
            raise DataError(
                f"{bits}: computed from a .tokens file with sha256 {record.get('tokens_sha256')}, but "
                f"{root / MANIFEST} lists {shard.info.tokens_file} with sha256 {shard.info.tokens_sha256}; "
                "recompute the sidecars (python -m bltjax.entropy)"
            )
        starts_sha = record.get("starts_sha256", {})
        if not isinstance(starts_sha, Mapping) or not isinstance(starts_sha.get(tag), str):
            raise DataError(f"{path}: field 'shards.{shard.info.name}.starts_sha256.{tag}' is missing ({bits})")
        out.append(dataclasses.replace(shard, starts_path=str(bits), starts_sha256=starts_sha[tag]))
    return out


_VERIFIED: set[tuple[tuple[str, int, int], ...]] = set()  # files whose content was checked, per process


def _stamp(*files: str) -> tuple[tuple[str, int, int], ...]:
    """(path, size, mtime) of each file: mtime in ns locally, the object's seconds on a remote store."""
    out = []
    for file in files:
        if paths.is_uri(file):
            stat = paths.resolve(file).stat()
            out.append((file, stat.length, int(stat.mtime)))
        else:
            stat = os.stat(file)
            out.append((file, stat.st_size, stat.st_mtime_ns))
    return tuple(out)


def _check_size(path: str, expected: int, what: str) -> None:
    if not paths.resolve(path).is_file():
        raise DataError(f"{path}: missing {what}")
    size = paths.resolve(path).stat().length
    if size != expected:
        raise DataError(f"{path}: {size} bytes, expected {expected} ({what}); the file is truncated or stale")


def check_shard(shard: Shard, *, contents: bool) -> None:
    """Raises DataError naming the file for a missing, truncated or (contents=True) altered file.

    Sizes are always checked. Contents: prepare's `verify_shard` (sha256 of `.tokens` and
    `.docs.npy` against the manifest) and the sidecar's sha256 against `sidecars.json`, once per
    process and file version (path, size, mtime).
    """
    info = shard.info
    _check_size(shard.tokens_path, info.tokens * shard_format.TOKEN_DTYPE.itemsize, f"{info.tokens} uint16 tokens")
    if shard.starts_path is not None:
        _check_size(shard.starts_path, (info.tokens + 7) // 8, f"start-bit sidecar of {info.tokens} tokens")
    if not contents:
        return
    docs_path = os.fspath(paths.resolve(shard.data_dir) / info.docs_file)
    with _as_data_error():
        stamp = _stamp(shard.tokens_path, docs_path)
        if stamp not in _VERIFIED:
            shard_format.verify_shard(shard.data_dir, info.split, info.index)
            _VERIFIED.add(stamp)
    if shard.starts_path is not None:
        stamp = _stamp(shard.starts_path)
        if stamp not in _VERIFIED:
            actual = sha256_file(shard.starts_path)
            if actual != shard.starts_sha256:
                raise DataError(
                    f"{shard.starts_path}: sha256 {actual} differs from {shard.starts_sha256} recorded in "
                    f"{paths.resolve(shard.data_dir) / SIDECAR_MANIFEST}"
                )
            _VERIFIED.add(stamp)


# ---------------------------------------------------------------------------------------------
# The source: windows of N + 1 tokens


class WindowSource(grain.sources.RandomAccessDataSource):
    """Random access to every window of N + 1 tokens of a split (see the module docstring).

    Element: {"window": uint16 [N + 1]} plus, with sidecars, {"starts": bool [N + 1]}. Files are
    memory-mapped on first use and dropped when pickled, so the source travels to workers.
    """

    def __init__(self, shards: Sequence[Shard], seq_len: int, *, verify_on_open: bool = False):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"WindowSource: seq_len must be an int >= 1, got {seq_len!r}")
        self.shards = tuple(shards)
        self.seq_len = seq_len
        self.verify_on_open = verify_on_open
        counts = [max(shard.n_tokens - 1, 0) // seq_len for shard in self.shards]
        self._first = [0]  # window index of each shard's first window
        for count in counts:
            self._first.append(self._first[-1] + count)
        self._open: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def __len__(self) -> int:
        return self._first[-1]

    def __repr__(self) -> str:
        return f"WindowSource({len(self.shards)} shards, {len(self)} windows of {self.seq_len} + 1 tokens)"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = {}
        return state

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, first token of the window) of window `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range [0, {len(self)})")
        shard = bisect.bisect_right(self._first, index) - 1
        return shard, (index - self._first[shard]) * self.seq_len

    def open_files(self, number: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(tokens, packed start bits or None) of shard `number`, opened (and verified if lazy) once."""
        if number not in self._open:
            shard = self.shards[number]
            if self.verify_on_open:
                check_shard(shard, contents=True)
            with _as_data_error():
                tokens, _ = shard_format.read_shard(shard.data_dir, shard.info.split, shard.info.index)
            starts = None
            if shard.starts_path is not None:
                starts = shard_format.open_array(shard.starts_path, np.uint8, (shard.n_tokens + 7) // 8)
            self._open[number] = (tokens, starts)
        return self._open[number]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        number, offset = self.locate(int(index))
        tokens, starts = self.open_files(number)
        stop = offset + self.seq_len + 1
        window = np.array(tokens[offset:stop])
        if window.max() >= VOCAB_SIZE:
            shard = self.shards[number]
            found = int(window.max())
            raise DataError(f"{shard.tokens_path}: token id {found} >= {VOCAB_SIZE} in tokens [{offset}, {stop})")
        element = {"window": window}
        if starts is not None:
            first_byte = offset // 8
            bits = np.unpackbits(starts[first_byte : (stop + 7) // 8])  # np.packbits order: big-endian bits
            element["starts"] = bits[offset - 8 * first_byte : stop - 8 * first_byte].astype(bool)
        return element


# ---------------------------------------------------------------------------------------------
# The batch map: windows -> model inputs


@dataclasses.dataclass(frozen=True)
class BatchBuilder:
    """Turns stacked source elements into the model's batch (a picklable grain map).

    Output, for b rows: tokens int32 [b, N], targets int32 [b, N], loss_mask bool [b, N] and, when
    a patching rule is set, patch_lengths int32 [b, max_patches] (row sum N + 1, first patch 1).
    In entropy mode the start bits come from the sidecars (`attach_sidecars` checked that they
    were computed with this rule's threshold); the rule adds `max_patch_length`.
    """

    seq_len: int
    max_patches: int | None
    rule: PatchingRule | None  # None: no patch lengths (byte-level LMs)
    overflow: str = "truncate"

    def __post_init__(self) -> None:
        if self.overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow: expected one of {OVERFLOW_POLICIES}, got {self.overflow!r}")
        if self.rule is not None and not isinstance(self.rule, PatchingRule):
            raise ValueError(f"rule: expected a bltjax.patching.PatchingRule or None, got {type(self.rule).__name__}")
        if self.rule is not None:
            if self.max_patches is None or self.max_patches < 2:
                raise ValueError(f"config.data.max_patches: expected an int >= 2, got {self.max_patches!r}")

    def lengths(self, tokens: np.ndarray, starts: np.ndarray | None) -> np.ndarray:
        """Unpadded int32 [b, P'] lengths of the training convention for each row."""
        if self.rule.mode == "entropy":
            if starts is None:
                raise ValueError("entropy patching needs the window's start bits (a source built with sidecars)")
            starts = starts.copy()
            starts[:, :2] = True  # first-patch rule; re-splits a window that starts mid-document
            lengths = lengths_from_start_mask(starts)
            limit = self.rule.max_patch_length
            return lengths if limit is None else split_long_patches(lengths, limit)
        return patch_lengths(tokens, self.rule, include_next_token=True)

    def fit(self, lengths: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
        """Pads to `max_patches` columns, or applies the overflow policy (module docstring)."""
        rows, width = lengths.shape
        if width <= self.max_patches:
            out = np.zeros((rows, self.max_patches), np.int32)
            out[:, :width] = lengths
            return out
        counts = np.count_nonzero(lengths, axis=1)
        if self.overflow == "error":
            row = int(np.argmax(counts))
            raise DataError(
                f"row {row} has {counts[row]} patches, more than config.data.max_patches={self.max_patches} "
                f"(seq_len={self.seq_len}); raise max_patches or use overflow='truncate'"
            )
        out = np.ascontiguousarray(lengths[:, : self.max_patches], dtype=np.int32)
        out[:, -1] += lengths[:, self.max_patches :].sum(axis=1, dtype=np.int32)
        # First dropped start s: target i (token i + 1) changes its decoder patch iff i + 1 >= s.
        first_dropped = lengths[:, : self.max_patches].sum(axis=1, dtype=np.int64)
        loss_mask &= np.arange(self.seq_len)[None, :] < (first_dropped - 1)[:, None]
        return out

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        windows = np.asarray(batch["window"]).astype(np.int32)
        if windows.ndim != 2 or windows.shape[1] != self.seq_len + 1:
            raise ValueError(f"BatchBuilder: windows must be [b, {self.seq_len + 1}], got shape {windows.shape}")
        tokens, targets = windows[:, :-1], windows[:, 1:]
        loss_mask = targets != BOE_ID
        out = {"tokens": np.ascontiguousarray(tokens), "targets": np.ascontiguousarray(targets)}
        if self.rule is not None:
            out["patch_lengths"] = self.fit(self.lengths(tokens, batch.get("starts")), loss_mask)
        out["loss_mask"] = loss_mask
        return out


# ---------------------------------------------------------------------------------------------
# Datasets, iterators, global arrays


def _patching_rule(config: Any) -> PatchingRule | None:
    """The config's patching rule; None for configs without one (byte-level LMs)."""
    patching = config.get("patching") if hasattr(config, "get") else getattr(config, "patching", None)
    return None if patching is None else PatchingRule.from_config(patching)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must lie in [0, process_count={process_count}), got {process_index}")
    return int(process_index), int(process_count)


def make_source(
    config: Any,
    data_dir: str | os.PathLike,
    split: str,
    *,
    verify: str = "eager",
    sidecar_tag: str | None = None,
) -> WindowSource:
    """The verified window source of `split` (with start bits in entropy mode)."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify: expected one of {VERIFY_MODES}, got {verify!r}")
    seq_len = int(config.data.seq_len)
    shards = read_split(data_dir, split)
    rule = _patching_rule(config)
    if rule is not None and rule.mode == "entropy":
        shards = attach_sidecars(data_dir, shards, rule, tag=sidecar_tag)
    for shard in shards:
        check_shard(shard, contents=verify == "eager")
    source = WindowSource(shards, seq_len, verify_on_open=verify == "lazy")
    if len(source) == 0:
        longest = max(shard.n_tokens for shard in shards)
        raise DataError(
            f"{paths.resolve(data_dir) / MANIFEST}: split {split!r} has no window of seq_len + 1 = {seq_len + 1} "
            f"tokens (longest shard: {longest} tokens)"
        )
    return source


def has_data_split(config: Any, split: str) -> bool:
    """Whether the config's data (its one folder, or every folder of its mixture) has `split`."""
    return all(has_split(folder, split) for folder, _ in mixture.folders(config, config.data.path))


def make_dataset(
    config: Any,
    data_dir: str | os.PathLike,
    split: str,
    *,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    verify: str = "eager",
    sidecar_tag: str | None = None,
    overflow: str = "truncate",
) -> grain.MapDataset:
    """Endless MapDataset whose element `s` is this process's rows of the global batch of step s.

    The global batch of step s depends only on (data, config, seed, s); process p of P gets rows
    [p*B/P, (p+1)*B/P) of it. `process_index` / `process_count` default to jax's; pass them to
    simulate other process counts. `verify` and `overflow`: see the module docstring. Rows are
    fixed windows or, with ``config.data.rows = "packed"``, packed rows (bltjax.data.packing);
    with ``config.data.mixture`` (and ``data_dir`` '') they come from several weighted folders
    (bltjax.data.mixture).
    """
    process_index, process_count = _process(process_index, process_count)
    if config.get("model_type") == "token_lm":  # token ids of python -m bltjax.bpe: bltjax/data/token_pipeline.py
        return token_pipeline.make_dataset(
            config, data_dir, split, seed=seed, process_index=process_index, process_count=process_count, verify=verify
        )
    batch_size = int(config.data.batch_size)
    if batch_size % process_count:
        raise ValueError(
            f"config.data.batch_size={batch_size} must be a multiple of the number of processes ({process_count})"
        )
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    rule = _patching_rule(config)
    packed = packing.row_kind(config) == "packed"
    if packed and rule is None:
        raise DataError("config.data.rows='packed' packs patches: it needs a BLT config (one with config.patching)")
    seq_len, max_patches = int(config.data.seq_len), None if rule is None else int(config.data.max_patches)
    if packed:
        builder = packing.PackedBuilder(seq_len=seq_len, max_patches=max_patches)
    else:
        builder = BatchBuilder(seq_len=seq_len, max_patches=max_patches, rule=rule, overflow=overflow)
    streams, weights = [], []
    for index, (folder, weight) in enumerate(mixture.folders(config, data_dir)):
        source = make_source(config, folder, split, verify=verify, sidecar_tag=sidecar_tag)
        if packed:
            source = packing.PackedSource(source, max_patches, rule)
        streams.append(grain.MapDataset.source(source).shuffle(seed=mixture.component_seed(seed, index)).repeat())
        weights.append(weight)
    rows = mixture.mix(streams, weights)
    return rows.batch(batch_size // process_count, drop_remainder=True)[process_index::process_count].map(builder)
