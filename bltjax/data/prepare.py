"""Raw text -> byte shards, the first step of ``raw text -> shards -> sidecars -> batches``.

  python -m bltjax.prepare --input corpus/ more.jsonl.gz --out DATA [--val-fraction 0.01] [--seed 0]

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

Use it as ``python -m bltjax.prepare`` (the flags are in `bltjax.prepare`) or call
:func:`prepare` (tests, sweeps, the quickstart). The format and its readers live in
`bltjax.data.shards`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import gzip
import hashlib
import io
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tqdm
from etils import epath

from bltjax import tokenizer
from bltjax.data.shards import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    OFFSET_DTYPE,
    SPLITS,
    TOKEN_DTYPE,
    Manifest,
    ShardInfo,
    load_manifest,
)
from bltjax.runtime import paths
from bltjax.runtime.atomic import sha256_file, write_atomic
from bltjax.runtime.progress import print_above, progress_bar

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
_WARNINGS_PER_FILE = 20  # further warnings about the same file are counted, not printed
_SHARD_FILE = re.compile(r"^(train|validation)-(\d{5})\.(tokens|docs\.npy)$")
_TEMP_FILE = re.compile(r"^\.((train|validation)-\d{5}\.(tokens|docs\.npy)|manifest\.json)\.tmp$")


class PrepareError(ValueError):
    """The inputs or settings of a prepare run are unusable; raised before anything is written."""


# --------------------------------------------------------------------------------------------
# Inputs


def _strip_compression(name: str) -> str:
    for suffix in COMPRESSED_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_jsonl(path: epath.Path) -> bool:
    return _strip_compression(path.name).endswith(JSONL_SUFFIXES)


def _zstandard():
    """The optional zstandard module, or None: .zst inputs are rare enough not to force a dependency."""
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


def expand_inputs(inputs: Sequence[str | os.PathLike], include: Sequence[str] = DEFAULT_INCLUDE) -> list[epath.Path]:
    """The input files in stream order: as given, folders walked recursively in sorted order.

    Files named directly are always taken; inside folders only names that match one of
    ``include`` (after dropping a ``.gz`` / ``.zst`` suffix) are, and hidden entries are skipped,
    so a corpus folder's README or build script does not become training data. Raises before
    anything is written when a path does not exist or a ``.zst`` file cannot be read.
    """
    if not inputs:
        raise PrepareError("--input: expected at least one file or folder")
    missing = [str(p) for p in inputs if not _exists(p)]
    if missing:
        raise PrepareError(f"--input: path does not exist: {', '.join(missing)}")
    files: list[epath.Path] = []
    for given in inputs:
        path = _input_path(given)
        if not path.is_dir():
            files.append(path)
            continue
        found = []
        for root, names in _walk(path):
            for name in sorted(names):
                stem = _strip_compression(name)
                if not name.startswith(".") and any(fnmatch.fnmatchcase(stem, p) for p in include):
                    found.append(root / name)
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


def _input_path(given: str | os.PathLike) -> epath.Path:
    """An input as given (relative paths stay relative: the manifest records them as typed), or a URI."""
    return paths.resolve(given) if paths.is_uri(given) else epath.Path(given)


def _exists(given: str | os.PathLike) -> bool:
    return _input_path(given).exists()


def _walk(folder: epath.Path) -> Iterator[tuple[epath.Path, list[str]]]:
    """(folder, file names) top-down, sub-folders in sorted order and hidden ones skipped, locally or in a bucket."""
    if not paths.is_uri(folder):
        for root, dirs, names in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            yield epath.Path(root), names
        return
    entries = sorted(folder.iterdir(), key=lambda p: p.name)
    yield folder, [p.name for p in entries if not p.is_dir()]
    for entry in entries:
        if entry.is_dir() and not entry.name.startswith("."):
            yield from _walk(entry)


def _chunks(path: epath.Path) -> Iterator[bytes]:
    """The file's decompressed content in pieces; a truncated archive raises EOFError at its end."""
    if path.name.endswith(".zst"):
        yield from _zstd_chunks(path)
        return
    with path.open("rb") as raw, gzip.open(raw, "rb") if path.name.endswith(".gz") else raw as stream:
        while chunk := stream.read(_CHUNK):
            yield chunk


def _zstd_chunks(path: epath.Path) -> Iterator[bytes]:
    """Decompresses every frame of a .zst file; unlike zstandard's stream reader, notices truncation."""
    zstandard = _zstandard()
    if zstandard is None:
        raise PrepareError(f"{path}: reading .zst files needs `pip install zstandard`")
    decompressor = zstandard.ZstdDecompressor()
    frame, inside = decompressor.decompressobj(), False
    with path.open("rb") as stream:
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

    def skip(self, path: epath.Path, reason: str, detail: str = "", line: int | None = None) -> None:
        self.skipped[reason] += 1
        key = str(path)
        self._printed[key] += 1
        where = f"{path}:{line}" if line is not None else str(path)
        if self._printed[key] <= _WARNINGS_PER_FILE:
            _warn(where, f"skipped ({reason}{': ' + detail if detail else ''})")
        elif self._printed[key] == _WARNINGS_PER_FILE + 1:
            _warn(str(path), "further warnings about this file are counted in the summary only")


def _warn(where: str, message: str) -> None:
    print_above(f"prepare: warning: {where}: {message}", file=sys.stderr)


def _read_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "this input file cannot be read" (corrupt or truncated archive, permissions)."""
    zstandard = _zstandard()
    return (OSError, EOFError) + ((zstandard.ZstdError,) if zstandard is not None else ())


def _documents(files: Sequence[epath.Path], text_field: str, report: _Report, state: _RunState) -> Iterator[bytes]:
    """Yields every usable document's bytes: one per text file, one per JSONL line."""
    for path in files:
        if _is_jsonl(path):
            yield from _jsonl_documents(path, text_field, report, state)
            continue
        try:
            data = b"".join(_chunks(path))
        except _read_errors() as err:
            report.skip(path, "unreadable file", f"{type(err).__name__}: {err}")
            continue
        state.advance(len(data))
        if not data.strip():
            report.skip(path, "empty file")
            continue
        reason = binary_reason(data)
        if reason:
            report.skip(path, "binary file", reason)
            continue
        yield data


def _jsonl_documents(path: epath.Path, text_field: str, report: _Report, state: _RunState) -> Iterator[bytes]:
    """One document per non-blank line; bad lines are reported with their number and skipped."""
    lineno = 0
    try:
        for lineno, line in enumerate(_lines(_chunks(path)), start=1):
            state.advance(len(line))
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


def _same_content(path: epath.Path, size: int, sha256: str) -> bool:
    return path.is_file() and path.stat().length == size and sha256_file(path) == sha256


class _ShardWriter:
    """Buffers one split's documents and writes a shard once it reaches ``shard_bytes``."""

    def __init__(self, output: epath.Path, split: str, shard_bytes: int, state: _RunState) -> None:
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
        self.state.shards += 1
        if self.state.on_shard is not None:
            self.state.on_shard(info)


@dataclasses.dataclass
class _RunState:
    """The counts of one run, shown on its progress bar (a disabled bar counts nothing itself)."""

    bar: tqdm.tqdm
    on_shard: Callable[[ShardInfo], None] | None
    bytes_read: int = 0
    documents: int = 0
    shards: int = 0
    shards_written: int = 0
    shards_kept: int = 0
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def advance(self, nbytes: int) -> None:
        self.bytes_read += nbytes
        self.bar.set_postfix_str(f"{self.documents:,} documents, {self.shards} shards", refresh=False)
        self.bar.update(nbytes)


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
    out = paths.resolve(output)
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out: {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)  # in a bucket: a no-op, a folder exists once it holds an object
    for leftover in out.iterdir() if out.is_dir() else ():
        if _TEMP_FILE.match(leftover.name):
            leftover.unlink()  # a killed run's half-written file: never visible under a shard's name
    manifest_path = out / MANIFEST_NAME
    if manifest_path.exists():
        manifest_path.unlink()  # the folder is complete again only when the new manifest lands

    report = _Report()
    with progress_bar("prepare", binary=True, enabled=progress) as bar:  # bytes read, documents, shards
        state = _RunState(bar=bar, on_shard=on_shard)
        writers = {split: _ShardWriter(out, split, shard_bytes, state) for split in SPLITS}
        for document in _documents(files, text_field, report, state):
            writers[split_of(document, seed, val_fraction)].add(tokenizer.encode(document))
            state.documents += 1
        for writer in writers.values():
            writer.close_shard()
        bar.set_postfix_str(f"{state.documents:,} documents, {state.shards} shards", refresh=False)
    if not writers["train"].shards and not writers["validation"].shards:
        raise PrepareError(f"--input: no usable documents in {len(files)} file(s); see the warnings above")
    for split, asked in (("validation", val_fraction > 0), ("train", val_fraction < 1)):
        if asked and not writers[split].shards:
            _warn(str(out), f"the {split} split is empty ({state.documents} documents, --val-fraction {val_fraction})")

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
        input_bytes=state.bytes_read,
        seconds=time.perf_counter() - state.start,
    )
