"""Training batches of a token LM: windows of token ids from a token folder (``python -m bltjax.bpe``).

    token shards --TokenWindowSource--> shuffle(seed) --repeat--> rows --batch/slice--> TokenBatchBuilder

The byte pipeline's decisions (`bltjax.data.pipeline`'s docstring) carry over, over token ids:
window w of a shard is ids [wN, wN + N + 1) with N = ``config.data.seq_len`` tokens; windows
cross documents but never shards; the batch of step s is a pure function of (data, config,
seed, s), and process p of P builds its contiguous slice of it. The batch adds ``target_bytes``
[b, N]: the bytes of the byte stream each target stands for (`bpe.BPETokenizer.stream_bytes`),
which bits per byte divide by (bltjax/training/token_metrics.py). `pipeline.make_dataset` hands
a ``token_lm`` config to `make_dataset` here.

Checked before training: the token folder's manifest, every shard's size (and, with
``verify="eager"``, its sha256, once per process), and that ``config.model.vocab_size`` is the
folder's vocabulary (BPE ids + 4), so a model is never trained on another tokenizer's ids.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from bltjax.data import bpe
from bltjax.data import shards as shard_format
from bltjax.data.errors import DataError
from bltjax.runtime import paths
from bltjax.tokenizer import BOE_ID

_VERIFIED: set[tuple[str, str]] = set()  # (file, sha256) checked in this process


@dataclasses.dataclass(frozen=True)
class TokenShard:
    """One token shard (the attributes `bltjax.inference.evaluate` reads of a byte `pipeline.Shard`)."""

    data_dir: str
    info: shard_format.ShardInfo
    starts_path: None = None  # token shards have no patching sidecars

    @property
    def tokens_path(self) -> str:
        return os.fspath(paths.resolve(self.data_dir) / self.info.tokens_file)

    @property
    def n_tokens(self) -> int:
        return self.info.tokens


def load_manifest(folder: paths.PathLike) -> bpe.TokenManifest:
    """The token folder's checked manifest; DataError (naming the file) for anything else."""
    try:
        return bpe.load_manifest(folder)
    except bpe.BPEError as error:
        raise DataError(str(error)) from error


def has_split(folder: paths.PathLike, split: str) -> bool:
    return bool(load_manifest(folder).splits.get(split))


def read_split(folder: paths.PathLike, split: str) -> list[TokenShard]:
    """The token shards of ``split`` in stream order (DataError if the split has none)."""
    manifest = load_manifest(folder)
    if not manifest.splits.get(split):
        raise DataError(f"{manifest.path}: split {split!r} lists no token shards")
    return [TokenShard(os.fspath(paths.resolve(folder)), info) for info in manifest.splits[split]]


def check_shard(shard: TokenShard, *, contents: bool) -> None:
    """Size always; with ``contents`` the sha256 of both files against the manifest (once per process)."""
    info = shard.info
    path = paths.resolve(shard.tokens_path)
    expected = info.tokens * shard_format.TOKEN_DTYPE.itemsize
    if not path.is_file() or path.stat().length != expected:
        found = path.stat().length if path.is_file() else "no file"
        raise DataError(f"{path}: expected {expected} bytes ({info.tokens} uint16 ids), found {found}")
    key = (os.fspath(path), info.tokens_sha256)
    if contents and key not in _VERIFIED:
        try:
            bpe.verify_shard(shard.data_dir, info)
        except bpe.BPEError as error:
            raise DataError(str(error)) from error
        _VERIFIED.add(key)


def check_vocabulary(config: Any, manifest: bpe.TokenManifest) -> None:
    """``config.model.vocab_size`` must be the folder's: ids of another tokenizer would train silently."""
    if int(config.model.vocab_size) != manifest.model_vocab_size:
        raise DataError(
            f"config.model.vocab_size: expected {manifest.model_vocab_size} ({manifest.vocab_size} BPE ids of "
            f"{manifest.path.parent} + 4 special ids), got {config.model.vocab_size}"
        )


class TokenWindowSource(grain.sources.RandomAccessDataSource):
    """Every window of N + 1 ids of a split's token shards: element {"window": uint16 [N + 1]}."""

    def __init__(self, shards: Sequence[TokenShard], seq_len: int, vocab_size: int):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"TokenWindowSource: seq_len must be an int >= 1, got {seq_len!r}")
        self.shards, self.seq_len, self.vocab_size = tuple(shards), seq_len, int(vocab_size)
        self._first = [0]
        for shard in self.shards:
            self._first.append(self._first[-1] + max(shard.n_tokens - 1, 0) // seq_len)
        self._open: dict[int, Any] = {}

    def __len__(self) -> int:
        return self._first[-1]

    def __repr__(self) -> str:
        return f"TokenWindowSource({len(self.shards)} shards, {len(self)} windows of {self.seq_len} + 1 tokens)"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": {}}  # memory maps are reopened in the worker

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range [0, {len(self)})")
        number = int(np.searchsorted(self._first, index, side="right")) - 1
        offset = (index - self._first[number]) * self.seq_len
        if number not in self._open:
            shard = self.shards[number]
            try:
                self._open[number] = shard_format.read_shard(shard.data_dir, shard.info.split, shard.info.index)[0]
            except (FileNotFoundError, shard_format.DataFormatError) as error:
                raise DataError(str(error)) from error
        window = np.array(self._open[number][offset : offset + self.seq_len + 1])
        if window.max() >= self.vocab_size:
            raise DataError(
                f"{self.shards[number].tokens_path}: token id {int(window.max())} >= config.model.vocab_size "
                f"{self.vocab_size} in ids [{offset}, {offset + self.seq_len + 1})"
            )
        return {"window": window}


@dataclasses.dataclass(frozen=True)
class TokenBatchBuilder:
    """Stacked windows -> tokens, targets, loss_mask (padding targets out) and target_bytes, all [b, N]."""

    seq_len: int
    stream_bytes: np.ndarray = dataclasses.field(compare=False)  # bytes per id (`BPETokenizer.stream_bytes`)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        windows = np.asarray(batch["window"]).astype(np.int32)
        if windows.ndim != 2 or windows.shape[1] != self.seq_len + 1:
            raise ValueError(f"TokenBatchBuilder: windows must be [b, {self.seq_len + 1}], got {windows.shape}")
        tokens, targets = np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])
        return {
            "tokens": tokens,
            "targets": targets,
            "loss_mask": targets != BOE_ID,
            "target_bytes": np.asarray(self.stream_bytes, np.int32)[targets],
        }


def builder_of(config: Any, folder: paths.PathLike) -> TokenBatchBuilder:
    """The batch map of a token folder: its tokenizer's bytes per id."""
    try:
        table = bpe.BPETokenizer.from_folder(folder).stream_bytes
    except bpe.BPEError as error:
        raise DataError(str(error)) from error
    return TokenBatchBuilder(seq_len=int(config.data.seq_len), stream_bytes=table)


def make_source(config: Any, folder: paths.PathLike, split: str, *, verify: str = "eager") -> TokenWindowSource:
    """The verified window source of ``split`` of a token folder."""
    if verify not in ("eager", "lazy", "size"):
        raise ValueError(f"verify: expected one of eager, lazy, size, got {verify!r}")
    manifest = load_manifest(folder)
    check_vocabulary(config, manifest)
    shards = read_split(folder, split)
    for shard in shards:
        check_shard(shard, contents=verify == "eager")  # "lazy": token shards are small; sizes only
    source = TokenWindowSource(shards, int(config.data.seq_len), manifest.model_vocab_size)
    if len(source) == 0:
        raise DataError(
            f"{manifest.path}: split {split!r} has no window of seq_len + 1 = {int(config.data.seq_len) + 1} tokens "
            f"(longest shard: {max(s.n_tokens for s in shards)} tokens)"
        )
    return source


def make_dataset(
    config: Any,
    folder: paths.PathLike,
    split: str,
    *,
    seed: int,
    process_index: int,
    process_count: int,
    verify: str = "eager",
) -> grain.MapDataset:
    """Endless MapDataset: element s is this process's rows of the global batch of step s (as the byte pipeline's)."""
    batch_size = int(config.data.batch_size)
    if batch_size % process_count:
        raise ValueError(f"config.data.batch_size={batch_size} must be a multiple of the processes ({process_count})")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if config.data.get("mixture"):
        raise DataError("config.data.mixture: a token LM reads one token folder (config.data.path); set mixture ''")
    source = make_source(config, folder, split, verify=verify)
    rows = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    local = rows.batch(batch_size // process_count, drop_remainder=True)[process_index::process_count]
    return local.map(builder_of(config, folder))


def with_bytes_per_token(config: Any) -> Any:
    """A token LM's config with ``data.bytes_per_token`` read from its token folder when unset (FLOP counts need it).

    Other configs, and a token LM whose config sets it, come back unchanged.
    """
    if config.get("model_type") != "token_lm" or config.data.get("bytes_per_token") is not None:
        return config
    if not config.data.path:
        return config  # the trainer refuses an empty data.path itself
    import ml_collections  # noqa: PLC0415 - configs are ConfigDicts; data workers never call this

    filled = ml_collections.ConfigDict(config.to_dict())
    filled.data.bytes_per_token = load_manifest(config.data.path).bytes_per_token
    return filled
