"""Raw text -> byte shards, the first step of ``raw text -> shards -> sidecars -> batches``.

  python -m bltjax.prepare --input corpus/ more.jsonl.gz --output DATA [--val-fraction 0.01] [--seed 0]

Writes the shard format of ``docs/data.md`` (the contract with ``entropy`` and ``pipeline``):
``{split}-{index:05d}.tokens`` (little-endian uint16 ids, every document ``BOS + (bytes + 4) +
EOS``), ``{split}-{index:05d}.docs.npy`` (int64 offsets of each BOS plus the stream length) and
``manifest.json``, written last, which lists every shard with its sha256.

Why it is built this way:

* **Bytes stay bytes.** BLT models bytes, so a document's bytes go into the stream exactly as
  they are on disk (a stray latin-1 byte included); only files that look binary are refused.
* **Deterministic.** Inputs are read in the order given, folders recursively in sorted order,
  and a document goes to ``validation`` when a keyed hash of its bytes falls below
  ``val_fraction``. The same inputs and seed give the same files, byte for byte, and a document
  that occurs twice can never sit on both sides of the split.
* **Crash safe and resumable.** Every file is written to a hidden temp file in the output folder
  and renamed into place; the manifest comes last, so a folder with a manifest is complete. A
  re-run regenerates the same stream, leaves every shard whose bytes already match untouched, and
  removes the temp files a killed run left behind.

Readers (``pipeline``, ``entropy``) use :func:`load_manifest`, :func:`read_shard` and
:func:`verify_shard`, which refuse truncated, modified or stale shards with the file named.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import gzip
import hashlib
import io
import json
import math
import os
import pathlib
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from bltjax import tokenizer
from bltjax.runtime.atomic import sha256_file, write_atomic

FORMAT_NAME = "bltjax-byte-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "validation")
TOKEN_DTYPE = np.dtype("<u2")
OFFSET_DTYPE = np.dtype("<i8")
DEFAULT_SHARD_BYTES = 64 * 2**20
DEFAULT_VAL_FRACTION = 0.01
DEFAULT_TEXT_FIELD = "text"
DEFAULT_INCLUDE = ("*.txt", "*.jsonl")
COMPRESSED_SUFFIXES = (".gz", ".zst")
JSONL_SUFFIXES = (".jsonl", ".ndjson")

# A file "looks binary" when it holds a NUL byte, or when more than this fraction of its first
# _BINARY_SAMPLE bytes are control characters or bytes that are not valid UTF-8. Latin-1 text
# (a few percent of such bytes) passes; executables, images and archives do not.
_BINARY_SAMPLE = 1 << 20
_MAX_SUSPICIOUS_FRACTION = 0.3
_CONTROL = np.zeros(256, dtype=bool)
_CONTROL[[b for b in range(32) if b not in (9, 10, 11, 12, 13, 27)]] = True  # tab, newlines, ESC are text
_CONTROL[127] = True
_CHUNK = 1 << 20  # bytes read at a time
_ERASE_LINE = "\r\x1b[K"  # carriage return + erase to the end of the line (terminals only)
_WARNINGS_PER_FILE = 20  # further warnings about the same file are counted, not printed
_SHARD_FILE = re.compile(r"^(train|validation)-(\d{5})\.(tokens|docs\.npy)$")
_TEMP_FILE = re.compile(r"^\.((train|validation)-\d{5}\.(tokens|docs\.npy)|manifest\.json)\.tmp$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class DataFormatError(ValueError):
    """A prepared data folder, or one of its files, does not match docs/data.md."""


class PrepareError(ValueError):
    """The inputs or settings of a prepare run are unusable; raised before anything is written."""


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

    path: pathlib.Path
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


# --------------------------------------------------------------------------------------------
# Inputs


def _strip_compression(name: str) -> str:
    for suffix in COMPRESSED_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_jsonl(path: pathlib.Path) -> bool:
    return _strip_compression(path.name).endswith(JSONL_SUFFIXES)


def _zstandard():
    """The optional zstandard module, or None: .zst inputs are rare enough not to force a dependency."""
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


def expand_inputs(inputs: Sequence[str | os.PathLike], include: Sequence[str] = DEFAULT_INCLUDE) -> list[pathlib.Path]:
    """The input files in stream order: as given, folders walked recursively in sorted order.

    Files named directly are always taken; inside folders only names that match one of
    ``include`` (after dropping a ``.gz`` / ``.zst`` suffix) are, and hidden entries are skipped,
    so a corpus folder's README or build script does not become training data. Raises before
    anything is written when a path does not exist or a ``.zst`` file cannot be read.
    """
    if not inputs:
        raise PrepareError("--input: expected at least one file or folder")
    missing = [str(p) for p in inputs if not pathlib.Path(p).exists()]
    if missing:
        raise PrepareError(f"--input: path does not exist: {', '.join(missing)}")
    files: list[pathlib.Path] = []
    for given in inputs:
        path = pathlib.Path(given)
        if not path.is_dir():
            files.append(path)
            continue
        found = []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                stem = _strip_compression(name)
                if not name.startswith(".") and any(fnmatch.fnmatchcase(stem, p) for p in include):
                    found.append(pathlib.Path(root) / name)
        if not found:
            _warn(str(path), f"folder holds no file matching {list(include)}")
        files.extend(found)
    if not files:
        raise PrepareError(f"--input: no input files found in {[str(p) for p in inputs]} (include: {list(include)})")
    if _zstandard() is None:
        zst = [str(f) for f in files if f.name.endswith(".zst")]
        if zst:
            raise PrepareError(
                f"{zst[0]}: reading .zst files needs the 'zstandard' package, which is not installed "
                f"({len(zst)} such file(s)); install it with `pip install zstandard` or decompress with `unzstd`"
            )
    return files


def _chunks(path: pathlib.Path) -> Iterator[bytes]:
    """The file's decompressed content in pieces; a truncated archive raises EOFError at its end."""
    if path.name.endswith(".zst"):
        yield from _zstd_chunks(path)
        return
    with gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            yield chunk


def _zstd_chunks(path: pathlib.Path) -> Iterator[bytes]:
    """Decompresses every frame of a .zst file; unlike zstandard's stream reader, notices truncation."""
    zstandard = _zstandard()
    if zstandard is None:
        raise PrepareError(f"{path}: reading .zst files needs `pip install zstandard`")
    decompressor = zstandard.ZstdDecompressor()
    frame, inside = decompressor.decompressobj(), False
    with open(path, "rb") as stream:
        while data := stream.read(_CHUNK):
            while data:
                inside = True
                out = frame.decompress(data)
                if out:
                    yield out
                data = b""
                if frame.eof:  # this frame is complete; what follows starts the next one
                    data, frame, inside = frame.unused_data, decompressor.decompressobj(), False
    if inside:
        raise EOFError("zstd data ends inside a frame (truncated file?)")


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Splits a stream of chunks into lines (each with its newline, the last one perhaps without)."""
    pending: list[bytes] = []
    for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            pending.append(chunk[start : end + 1])
            yield b"".join(pending)
            pending, start = [], end + 1
        if start < len(chunk):
            pending.append(chunk[start:])
    if pending:
        yield b"".join(pending)


def binary_reason(data: bytes) -> str | None:
    """Why ``data`` looks like a binary file rather than text, or None when it looks like text."""
    if b"\0" in data:
        return "contains NUL bytes"
    sample = data[:_BINARY_SAMPLE]
    if not sample:
        return None
    controls = int(_CONTROL[np.frombuffer(sample, dtype=np.uint8)].sum())
    invalid = len(sample) - len(sample.decode("utf-8", errors="ignore").encode("utf-8"))
    fraction = (controls + invalid) / len(sample)
    if fraction > _MAX_SUSPICIOUS_FRACTION:
        return f"{fraction:.0%} of its bytes are control characters or invalid UTF-8"
    return None


def _text_bytes(text: str) -> bytes:
    """UTF-8 bytes of a JSON string; raw bytes that were not UTF-8 in the file come back as they were."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="ignore")  # lone surrogates from JSON escapes: the tokenizer's rule


class _Report:
    """Counts skipped inputs by reason and prints a bounded number of warnings per file."""

    def __init__(self) -> None:
        self.skipped: Counter[str] = Counter()
        self._printed: Counter[str] = Counter()

    def skip(self, path: pathlib.Path, reason: str, detail: str = "", line: int | None = None) -> None:
        self.skipped[reason] += 1
        key = str(path)
        self._printed[key] += 1
        where = f"{path}:{line}" if line is not None else str(path)
        if self._printed[key] <= _WARNINGS_PER_FILE:
            _warn(where, f"skipped ({reason}{': ' + detail if detail else ''})")
        elif self._printed[key] == _WARNINGS_PER_FILE + 1:
            _warn(str(path), "further warnings about this file are counted in the summary only")


def _warn(where: str, message: str) -> None:
    clear = _ERASE_LINE if sys.stderr.isatty() else ""  # a warning replaces the progress line, not follows it
    print(f"{clear}prepare: warning: {where}: {message}", file=sys.stderr, flush=True)


def _read_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "this input file cannot be read" (corrupt or truncated archive, permissions)."""
    zstandard = _zstandard()
    return (OSError, EOFError) + ((zstandard.ZstdError,) if zstandard is not None else ())


def _documents(files: Sequence[pathlib.Path], text_field: str, report: _Report, progress: _Progress) -> Iterator[bytes]:
    """Yields every usable document's bytes: one per text file, one per JSONL line."""
    for path in files:
        progress.file = path
        if _is_jsonl(path):
            yield from _jsonl_documents(path, text_field, report, progress)
            continue
        try:
            data = b"".join(_chunks(path))
        except _read_errors() as err:
            report.skip(path, "unreadable file", f"{type(err).__name__}: {err}")
            continue
        progress.advance(len(data))
        if not data.strip():
            report.skip(path, "empty file")
            continue
        reason = binary_reason(data)
        if reason:
            report.skip(path, "binary file", reason)
            continue
        yield data


def _jsonl_documents(path: pathlib.Path, text_field: str, report: _Report, progress: _Progress) -> Iterator[bytes]:
    """One document per non-blank line; bad lines are reported with their number and skipped."""
    lineno = 0
    try:
        for lineno, line in enumerate(_lines(_chunks(path)), start=1):
            progress.advance(len(line))
            if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]  # a UTF-8 byte order mark is not part of the JSON value
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8", errors="surrogateescape"))
            except ValueError as err:
                report.skip(path, "bad JSON line", str(err), line=lineno)
                continue
            if not isinstance(record, dict) or text_field not in record:
                report.skip(path, "missing text field", f"no field {text_field!r}", line=lineno)
                continue
            text = record[text_field]
            if not isinstance(text, str):
                kind = type(text).__name__
                report.skip(path, "missing text field", f"field {text_field!r} is {kind}, not a string", line=lineno)
                continue
            if not text:
                report.skip(path, "empty document", f"field {text_field!r} is empty", line=lineno)
                continue
            yield _text_bytes(text)
    except _read_errors() as err:
        report.skip(path, "unreadable file", f"{type(err).__name__} after line {lineno}: {err}")


def split_of(document: bytes, seed: int, val_fraction: float) -> str:
    """``validation`` when the document's keyed hash falls below ``val_fraction``, else ``train``.

    A function of the bytes alone: independent of input order and shard size, and duplicates
    always land in the same split.
    """
    digest = hashlib.blake2b(document, digest_size=8, key=str(seed).encode()).digest()
    return "validation" if int.from_bytes(digest, "little") / 2.0**64 < val_fraction else "train"


# --------------------------------------------------------------------------------------------
# Writing


class _Progress:
    """A one-line progress report on stderr: bytes read, bytes/s, documents, shards."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.interval = 0.5 if self.tty else 10.0
        self.start = time.perf_counter()
        self.last = self.start
        self.bytes = 0
        self.documents = 0
        self.shards = 0
        self.file: pathlib.Path | None = None

    def advance(self, nbytes: int) -> None:
        self.bytes += nbytes
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.interval:
            self.last = now
            self._print(end="\r" if self.tty else "\n")

    def line(self) -> str:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        return (
            f"{_human(self.bytes)} read in {seconds:.1f} s ({_human(self.bytes / seconds)}/s), "
            f"{self.documents:,} documents, {self.shards} shards"
        )

    def _print(self, end: str) -> None:
        current = f" [{self.file}]" if self.file is not None and self.tty else ""
        clear = _ERASE_LINE if self.tty else ""
        print(f"{clear}prepare: {self.line()}{current}", end=end, file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self.enabled:
            if self.tty:
                print(_ERASE_LINE, end="", file=sys.stderr)
            self._print(end="\n")


def _human(nbytes: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    if nbytes < 1024:
        return f"{nbytes:,.0f} B"
    power = min(int(math.log(nbytes, 1024)), 3)
    return f"{nbytes / 1024**power:,.1f} {('B', 'KiB', 'MiB', 'GiB')[power]}"


def _same_content(path: pathlib.Path, size: int, sha256: str) -> bool:
    return path.is_file() and path.stat().st_size == size and sha256_file(path) == sha256


class _ShardWriter:
    """Buffers one split's documents and writes a shard once it reaches ``shard_bytes``."""

    def __init__(self, output: pathlib.Path, split: str, shard_bytes: int, state: _RunState) -> None:
        self.output, self.split, self.shard_bytes, self.state = output, split, shard_bytes, state
        self.shards: list[ShardInfo] = []
        self._parts: list[np.ndarray] = []
        self._tokens = 0

    def add(self, ids: np.ndarray) -> None:
        self._parts.append(ids.astype(TOKEN_DTYPE))
        self._tokens += ids.size
        if 2 * self._tokens >= self.shard_bytes:
            self.close_shard()

    def close_shard(self) -> None:
        if not self._parts:
            return
        lengths = np.fromiter((p.size for p in self._parts), dtype=OFFSET_DTYPE, count=len(self._parts))
        offsets = np.zeros(lengths.size + 1, dtype=OFFSET_DTYPE)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.concatenate(self._parts).tobytes()
        docs_buffer = io.BytesIO()
        np.save(docs_buffer, offsets, allow_pickle=False)
        docs = docs_buffer.getvalue()
        info = ShardInfo(
            split=self.split,
            index=len(self.shards),
            documents=int(lengths.size),
            tokens=int(self._tokens),
            bytes=int(self._tokens - 2 * lengths.size),
            tokens_sha256=hashlib.sha256(tokens).hexdigest(),
            docs_sha256=hashlib.sha256(docs).hexdigest(),
        )
        kept = True
        for name, data, sha in (
            (info.tokens_file, tokens, info.tokens_sha256),
            (info.docs_file, docs, info.docs_sha256),
        ):
            path = self.output / name
            if not _same_content(path, len(data), sha):
                write_atomic(path, data)
                kept = False
        self.state.shards_kept += kept
        self.state.shards_written += not kept
        self.shards.append(info)
        self._parts, self._tokens = [], 0
        self.state.progress.shards += 1
        if self.state.on_shard is not None:
            self.state.on_shard(info)


@dataclasses.dataclass
class _RunState:
    progress: _Progress
    on_shard: Callable[[ShardInfo], None] | None
    shards_written: int = 0
    shards_kept: int = 0


@dataclasses.dataclass(frozen=True)
class PrepareResult:
    """What a run produced: the manifest it wrote and the counts behind the summary."""

    manifest: Manifest
    files: int
    skipped: dict[str, int]
    shards_written: int
    shards_kept: int
    input_bytes: int
    seconds: float

    def summary(self) -> str:
        """The human-readable report printed at the end of the command."""
        m = self.manifest
        lines = [f"prepare: wrote {m.path}"]
        for split in SPLITS:
            lines.append(
                f"  {split:<10} {m.total(split, 'documents'):>10,} documents {m.total(split, 'bytes'):>14,} bytes "
                f"{len(m.shards(split)):>5} shards"
            )
        lines.append(f"  inputs     {self.files:,} files, {self.input_bytes:,} bytes in {self.seconds:.1f} s")
        lines.append(f"  shards     {self.shards_written} written, {self.shards_kept} already present and unchanged")
        if self.skipped:
            detail = ", ".join(f"{count:,} {reason}" for reason, count in sorted(self.skipped.items()))
            lines.append(f"  skipped    {sum(self.skipped.values()):,}: {detail}")
        else:
            lines.append("  skipped    nothing")
        return "\n".join(lines)


def prepare(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    text_field: str = DEFAULT_TEXT_FIELD,
    seed: int = 0,
    include: Sequence[str] = DEFAULT_INCLUDE,
    progress: bool = True,
    on_shard: Callable[[ShardInfo], None] | None = None,
) -> PrepareResult:
    """Turns ``inputs`` into the shard folder ``output`` (docs/data.md); resumes a killed run.

    ``on_shard`` is called after each shard's files are in place (tests use it to stop a run
    part-way, as a kill would). Settings are checked and inputs listed before anything is written.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction <= 1:
        raise PrepareError(f"--val-fraction: expected a number in [0, 1], got {val_fraction!r}")
    if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes < 2:
        raise PrepareError(f"--shard-bytes: expected an integer >= 2, got {shard_bytes!r}")
    if not isinstance(text_field, str) or not text_field:
        raise PrepareError(f"--text-field: expected a non-empty field name, got {text_field!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise PrepareError(f"--seed: expected an integer, got {seed!r}")
    include = list(include)
    files = expand_inputs(inputs, include)
    out = pathlib.Path(output)
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--output: {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.iterdir():
        if _TEMP_FILE.match(leftover.name):
            leftover.unlink()  # a killed run's half-written file: never visible under a shard's name
    manifest_path = out / MANIFEST_NAME
    if manifest_path.exists():
        manifest_path.unlink()  # the folder is complete again only when the new manifest lands

    report = _Report()
    bar = _Progress(progress)
    state = _RunState(progress=bar, on_shard=on_shard)
    writers = {split: _ShardWriter(out, split, shard_bytes, state) for split in SPLITS}
    for document in _documents(files, text_field, report, bar):
        writers[split_of(document, seed, val_fraction)].add(tokenizer.encode(document))
        bar.documents += 1
    for writer in writers.values():
        writer.close_shard()
    bar.finish()
    if not writers["train"].shards and not writers["validation"].shards:
        raise PrepareError(f"--input: no usable documents in {len(files)} file(s); see the warnings above")
    for split, asked in (("validation", val_fraction > 0), ("train", val_fraction < 1)):
        if asked and not writers[split].shards:
            _warn(str(out), f"the {split} split is empty ({bar.documents} documents, --val-fraction {val_fraction})")

    settings = {
        "inputs": [str(p) for p in inputs],
        "include": include,
        "val_fraction": val_fraction,
        "shard_bytes": shard_bytes,
        "text_field": text_field,
        "seed": seed,
        "token_dtype": TOKEN_DTYPE.str,
        "token_offset": tokenizer.OFFSET,
        "bos_id": tokenizer.BOS_ID,
        "eos_id": tokenizer.EOS_ID,
    }
    summary = {"files": len(files), "skipped": dict(sorted(report.skipped.items()))}
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "settings": settings,
        "splits": {split: [s.to_json() for s in writers[split].shards] for split in SPLITS},
        "summary": summary,
    }
    write_atomic(manifest_path, (json.dumps(document, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    for stale in out.iterdir():  # shards of an earlier, longer run that the manifest no longer lists
        match = _SHARD_FILE.match(stale.name)
        if match and int(match.group(2)) >= len(writers[match.group(1)].shards):
            stale.unlink()
    return PrepareResult(
        manifest=load_manifest(out),
        files=len(files),
        skipped=dict(report.skipped),
        shards_written=state.shards_written,
        shards_kept=state.shards_kept,
        input_bytes=bar.bytes,
        seconds=time.perf_counter() - bar.start,
    )


# --------------------------------------------------------------------------------------------
# Reading


def _field(path: pathlib.Path, where: str, message: str) -> DataFormatError:
    return DataFormatError(f"{path}: field '{where}': {message}")


def _int_field(path: pathlib.Path, entry: dict, where: str, key: str, minimum: int) -> int:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _field(path, f"{where}.{key}", f"expected an integer >= {minimum}, got {value!r}")
    return value


def load_manifest(data_dir: str | os.PathLike) -> Manifest:
    """Reads and checks ``DATA/manifest.json``: format, version and every shard entry.

    Raises FileNotFoundError when the folder was never completed (no manifest), and
    DataFormatError naming the file and the field for anything malformed.
    """
    path = pathlib.Path(data_dir) / MANIFEST_NAME
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
    """Returns shard ``index`` of ``split``: (uint16 token memmap, int64 document offsets [D + 1]).

    The tokens are memory-mapped, never loaded, because training reads windows at arbitrary
    offsets. Checks the structure (lengths, offsets, BOS/EOS at the ends) but not the content
    hash: use :func:`verify_shard` for that.
    """
    name = shard_name(split, index)
    folder = pathlib.Path(data_dir)
    tokens_path, docs_path = folder / f"{name}.tokens", folder / f"{name}.docs.npy"
    for p in (tokens_path, docs_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: shard file missing")
    try:
        offsets = np.load(docs_path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataFormatError(f"{docs_path}: not a readable .npy file ({err})") from err
    if offsets.dtype != OFFSET_DTYPE or offsets.ndim != 1 or offsets.size < 2:
        raise DataFormatError(f"{docs_path}: expected int64 [D + 1] offsets, got {offsets.dtype} {offsets.shape}")
    size = tokens_path.stat().st_size
    if size % TOKEN_DTYPE.itemsize or size == 0:
        raise DataFormatError(f"{tokens_path}: size {size} bytes is not a positive multiple of 2 (truncated?)")
    length = size // TOKEN_DTYPE.itemsize
    if offsets[0] != 0 or offsets[-1] != length or np.any(np.diff(offsets) < 2):
        raise DataFormatError(
            f"{docs_path}: offsets must rise from 0 to the stream length {length} by >= 2 per document, "
            f"got {offsets[0]} .. {offsets[-1]} (truncated or stale shard?)"
        )
    tokens = np.memmap(tokens_path, dtype=TOKEN_DTYPE, mode="r", shape=(length,))
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
    folder = pathlib.Path(data_dir)
    tokens_path, docs_path = folder / info.tokens_file, folder / info.docs_file
    for p in (tokens_path, docs_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: shard file listed in {manifest.path} is missing")
    size = tokens_path.stat().st_size
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


# --------------------------------------------------------------------------------------------
# Command line


def parse_size(text: str) -> int:
    """``64MiB``, ``64M``, ``512k``, ``1000`` -> bytes (binary multiples)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size like 64MiB, 512k or 1000, got {text!r}")
    return int(match.group(1)) * 1024 ** "_kmgt".index(match.group(2).lower() or "_")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bltjax.prepare",
        description="Raw text (files, folders, JSONL, .gz/.zst) -> byte shards + manifest.json (docs/data.md).",
    )
    parser.add_argument(
        "--input",
        nargs="+",
        action="extend",
        required=True,
        metavar="PATH",
        help="text files, JSONL files (one document per line) or folders of them (recursive)",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="the shard folder to write or resume")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        help="fraction of documents, chosen by a keyed hash of their bytes, for validation",
    )
    parser.add_argument(
        "--shard-bytes",
        type=parse_size,
        default=DEFAULT_SHARD_BYTES,
        help="close a shard once its .tokens file reaches this size (default 64MiB)",
    )
    parser.add_argument("--text-field", default=DEFAULT_TEXT_FIELD, help="JSONL field that holds the text")
    parser.add_argument("--seed", type=int, default=0, help="key of the train/validation hash")
    parser.add_argument(
        "--include",
        default=",".join(DEFAULT_INCLUDE),
        help="comma-separated name patterns taken from folders (files named directly always are)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bltjax.prepare``: returns the exit status (0 ok, 2 unusable inputs or settings)."""
    args = _parser().parse_args(argv)
    include = [p.strip() for p in args.include.split(",") if p.strip()]
    try:
        result = prepare(
            args.input,
            args.output,
            val_fraction=args.val_fraction,
            shard_bytes=args.shard_bytes,
            text_field=args.text_field,
            seed=args.seed,
            include=include,
            progress=not args.no_progress,
        )
    except PrepareError as err:
        print(f"prepare: error: {err}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
