"""The byte-shard format of a prepared data folder (docs/data.md), and its checked readers.

    from bltjax.data import shards

    manifest = shards.load_manifest(DATA)               # manifest.json, every field checked
    for info in manifest.shards("train"):
        shards.verify_shard(DATA, "train", info.index, manifest)   # size and sha256
        tokens, offsets = shards.read_shard(DATA, "train", info.index)

A folder holds ``{split}-{index:05d}.tokens`` (little-endian uint16 ids, every document
``BOS + (bytes + 4) + EOS``), ``{split}-{index:05d}.docs.npy`` (int64 offsets of each BOS plus
the stream length) and ``manifest.json``, written last, which lists every shard with its
sha256; a folder with a manifest is complete. ``python -m bltjax.prepare``
(`bltjax.data.prepare`) writes it; the entropy pass and the training pipeline read it through
this module, which refuses truncated, modified or stale shards with the file and field named.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from typing import Any

import numpy as np
from etils import epath

from bltjax import tokenizer
from bltjax.runtime import paths
from bltjax.runtime.atomic import sha256_file

FORMAT_NAME = "bltjax-byte-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "validation")
TOKEN_DTYPE = np.dtype("<u2")
OFFSET_DTYPE = np.dtype("<i8")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class DataFormatError(ValueError):
    """A prepared data folder, or one of its files, does not match docs/data.md."""


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """One manifest entry: what a shard must contain, so that a reader can check it."""

    split: str
    index: int
    documents: int
    tokens: int
    bytes: int  # UTF-8 (text) bytes: tokens minus BOS and EOS of every document
    tokens_sha256: str
    docs_sha256: str

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)

    @property
    def tokens_file(self) -> str:
        return f"{self.name}.tokens"

    @property
    def docs_file(self) -> str:
        return f"{self.name}.docs.npy"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "documents": self.documents,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "tokens_sha256": self.tokens_sha256,
            "docs_sha256": self.docs_sha256,
        }


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A parsed, checked ``manifest.json``: the only list of shards a reader should trust."""

    path: epath.Path
    format_version: int
    settings: dict[str, Any]
    splits: dict[str, tuple[ShardInfo, ...]]
    summary: dict[str, Any]

    def shards(self, split: str) -> tuple[ShardInfo, ...]:
        _check_split(split)
        return self.splits[split]

    def total(self, split: str, field: str = "tokens") -> int:
        """Sum of ``documents``, ``tokens`` or ``bytes`` over the shards of ``split``."""
        return sum(getattr(shard, field) for shard in self.shards(split))


def shard_name(split: str, index: int) -> str:
    """``train-00003``: names sort in stream order (docs/data.md)."""
    _check_split(split)
    return f"{split}-{index:05d}"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")


def _field(path: epath.Path, where: str, message: str) -> DataFormatError:
    return DataFormatError(f"{path}: field '{where}': {message}")


def _int_field(path: epath.Path, entry: dict, where: str, key: str, minimum: int) -> int:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _field(path, f"{where}.{key}", f"expected an integer >= {minimum}, got {value!r}")
    return value


def load_manifest(data_dir: str | os.PathLike) -> Manifest:
    """Reads and checks ``DATA/manifest.json``: format, version and every shard entry.

    Raises FileNotFoundError when the folder was never completed (no manifest), and
    DataFormatError naming the file and the field for anything malformed.
    """
    path = paths.resolve(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no manifest; the folder is not a finished prepare output (run `python -m bltjax.prepare`)"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise DataFormatError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise DataFormatError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("format") != FORMAT_NAME:
        raise _field(path, "format", f"expected {FORMAT_NAME!r}, got {raw.get('format')!r}")
    version = raw.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise _field(path, "format_version", f"expected {FORMAT_VERSION}, got {version!r}")
    settings = raw.get("settings")
    if not isinstance(settings, dict):
        raise _field(path, "settings", f"expected an object, got {type(settings).__name__}")
    splits_raw = raw.get("splits")
    if not isinstance(splits_raw, dict) or sorted(splits_raw) != sorted(SPLITS):
        got = sorted(splits_raw) if isinstance(splits_raw, dict) else type(splits_raw).__name__
        raise _field(path, "splits", f"expected an object with keys {list(SPLITS)}, got {got}")
    splits: dict[str, tuple[ShardInfo, ...]] = {}
    for split in SPLITS:
        entries = splits_raw[split]
        if not isinstance(entries, list):
            raise _field(path, f"splits.{split}", f"expected a list of shards, got {type(entries).__name__}")
        shards = []
        for index, entry in enumerate(entries):
            where = f"splits.{split}[{index}]"
            if not isinstance(entry, dict):
                raise _field(path, where, f"expected an object, got {type(entry).__name__}")
            if entry.get("name") != shard_name(split, index):
                raise _field(path, f"{where}.name", f"expected {shard_name(split, index)!r}, got {entry.get('name')!r}")
            documents = _int_field(path, entry, where, "documents", 1)
            tokens = _int_field(path, entry, where, "tokens", 2 * documents)
            nbytes = _int_field(path, entry, where, "bytes", 0)
            if nbytes != tokens - 2 * documents:
                raise _field(
                    path, f"{where}.bytes", f"expected tokens - 2 * documents = {tokens - 2 * documents}, got {nbytes}"
                )
            hashes = []
            for key in ("tokens_sha256", "docs_sha256"):
                value = entry.get(key)
                if not isinstance(value, str) or not _SHA256.match(value):
                    raise _field(path, f"{where}.{key}", f"expected 64 lowercase hex digits, got {value!r}")
                hashes.append(value)
            shards.append(ShardInfo(split, index, documents, tokens, nbytes, *hashes))
        splits[split] = tuple(shards)
    summary = raw.get("summary", {})
    return Manifest(path=path, format_version=version, settings=settings, splits=splits, summary=summary)


def read_shard(data_dir: str | os.PathLike, split: str, index: int) -> tuple[np.memmap, np.ndarray]:
    """Returns shard ``index`` of ``split``: (uint16 tokens [T], int64 document offsets [D + 1]).

    The tokens are never loaded whole, because training reads windows at arbitrary offsets: a
    local shard is memory-mapped, a remote one (gs://...) read by byte range (`open_array`).
    Checks the structure (lengths, offsets, BOS/EOS at the ends) but not the content hash: use
    :func:`verify_shard` for that.
    """
    name = shard_name(split, index)
    folder = paths.resolve(data_dir)
    tokens_path, docs_path = folder / f"{name}.tokens", folder / f"{name}.docs.npy"
    for p in (tokens_path, docs_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: shard file missing")
    try:
        offsets = np.load(io.BytesIO(docs_path.read_bytes()), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataFormatError(f"{docs_path}: not a readable .npy file ({err})") from err
    if offsets.dtype != OFFSET_DTYPE or offsets.ndim != 1 or offsets.size < 2:
        raise DataFormatError(f"{docs_path}: expected int64 [D + 1] offsets, got {offsets.dtype} {offsets.shape}")
    size = tokens_path.stat().length
    if size % TOKEN_DTYPE.itemsize or size == 0:
        raise DataFormatError(f"{tokens_path}: size {size} bytes is not a positive multiple of 2 (truncated?)")
    length = size // TOKEN_DTYPE.itemsize
    if offsets[0] != 0 or offsets[-1] != length or np.any(np.diff(offsets) < 2):
        raise DataFormatError(
            f"{docs_path}: offsets must rise from 0 to the stream length {length} by >= 2 per document, "
            f"got {offsets[0]} .. {offsets[-1]} (truncated or stale shard?)"
        )
    tokens = open_array(tokens_path, TOKEN_DTYPE, length)
    if tokens[0] != tokenizer.BOS_ID or tokens[-1] != tokenizer.EOS_ID:
        raise DataFormatError(f"{tokens_path}: expected BOS first and EOS last, got {tokens[0]} and {tokens[-1]}")
    return tokens, offsets


def verify_shard(data_dir: str | os.PathLike, split: str, index: int, manifest: Manifest | None = None) -> ShardInfo:
    """Checks a shard's files against the manifest (size, then sha256); returns its entry.

    The pipeline calls this before training so that a truncated, modified or stale shard is
    refused instead of silently training on the wrong bytes.
    """
    manifest = load_manifest(data_dir) if manifest is None else manifest
    shards = manifest.shards(split)
    if not 0 <= index < len(shards):
        raise DataFormatError(f"{manifest.path}: field 'splits.{split}': lists {len(shards)} shards, no index {index}")
    info = shards[index]
    folder = paths.resolve(data_dir)
    tokens_path, docs_path = folder / info.tokens_file, folder / info.docs_file
    for p in (tokens_path, docs_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: shard file listed in {manifest.path} is missing")
    size = tokens_path.stat().length
    if size != info.tokens * TOKEN_DTYPE.itemsize:
        raise DataFormatError(
            f"{tokens_path}: size {size} bytes, but {manifest.path} lists {info.tokens} tokens "
            f"({info.tokens * TOKEN_DTYPE.itemsize} bytes): truncated or replaced"
        )
    for p, key, expected in (
        (tokens_path, "tokens_sha256", info.tokens_sha256),
        (docs_path, "docs_sha256", info.docs_sha256),
    ):
        actual = sha256_file(p)
        if actual != expected:
            raise DataFormatError(
                f"{p}: sha256 {actual} does not match field 'splits.{split}[{index}].{key}' = {expected} "
                f"of {manifest.path}: the file was modified or is stale; re-run prepare"
            )
    return info


class RangedArray:
    """A read-only 1-D array in a remote file, read by byte range: what a memory map is for a local one.

    Supports what the readers use (``len``, ``a[i]``, ``a[start:stop]``, ``np.asarray(a)``); each
    slice is one ranged read (`fsspec`'s ``cat_file``), so a window costs one request, not a block
    of read-ahead. Picklable (the filesystem handle is reopened), so grain workers can carry it.
    """

    def __init__(self, path: paths.PathLike, dtype: np.dtype, length: int):
        self.path, self.dtype, self.length = os.fspath(path), np.dtype(dtype), int(length)
        self._fs = None

    @property
    def shape(self) -> tuple[int]:
        return (self.length,)

    def __len__(self) -> int:
        return self.length

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None}

    def _read(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.zeros(0, self.dtype)
        if self._fs is None:
            import fsspec  # noqa: PLC0415 - only remote data needs it (etils[epath] brings it)

            self._fs = fsspec.core.url_to_fs(self.path)[0]
        size = self.dtype.itemsize
        return np.frombuffer(self._fs.cat_file(self.path, start * size, stop * size), self.dtype)

    def __getitem__(self, key: int | slice) -> np.ndarray | np.generic:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.length)
            return self._read(start, max(start, stop))[::step]
        index = int(key) + self.length if int(key) < 0 else int(key)
        if not 0 <= index < self.length:
            raise IndexError(f"{self.path}: index {key} out of range [0, {self.length})")
        return self._read(index, index + 1)[0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self._read(0, self.length)
        return whole if dtype is None else whole.astype(dtype)


def open_array(path: paths.PathLike, dtype: np.dtype, length: int) -> np.ndarray | RangedArray:
    """A read-only view of ``length`` values in a file: a memory map locally, ranged reads for a URI."""
    if paths.is_uri(path):
        return RangedArray(path, dtype, length)
    if length == 0:
        return np.zeros(0, dtype)
    return np.memmap(os.fspath(path), dtype=dtype, mode="r", shape=(length,))
