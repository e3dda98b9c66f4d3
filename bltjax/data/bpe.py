"""The token-level baseline's data: a byte-level BPE tokenizer and token shards beside the byte shards.

    python -m bltjax.bpe --data DATA --vocab-size 4096          # -> DATA/bpe-4096/

    from bltjax.data import bpe
    result = bpe.tokenize_data(DATA, vocab_size=4096)         # trains (or reuses) the tokenizer, writes shards
    tokenizer = bpe.BPETokenizer.from_folder(result.folder)
    tokenizer.decode(tokenizer.encode(document)) == document  # every byte string, invalid UTF-8 included

The paper's central comparison is BLT against a BPE-token Llama at equal FLOPs; this module makes
that Llama's input. Decisions (docs/data.md "Token shards"):

* **Byte-level BPE over every byte.** A document's bytes are split into pieces by a GPT-2-style
  rule (words with their leading space, numbers, punctuation runs, whitespace; `PRE_SPLIT`, run on
  the text decoded with ``surrogateescape`` so that an invalid byte is a piece of its own kind,
  never dropped). Each byte of a piece becomes one of 256 printable characters (GPT-2's byte
  alphabet, `BYTE_TO_CHAR`), the pieces are joined by spaces (no alphabet character is
  whitespace) and the `tokenizers` library learns BPE merges over them, its alphabet seeded with
  all 256 characters. So every byte string has a tokenization and decoding is exact: a token is
  a fixed byte string. The library pre-splits on those spaces only.
* **Deterministic.** The train split is read in stream order; the library's trainer breaks ties
  by pair order, so the same data and vocabulary size give the same ``tokenizer.json`` bytes.
* **Ids.** Model id = ``OFFSET + BPE id``, with the byte tokenizer's special ids below it
  (BOE/pad 0, BOS 1, EOS 2): a token shard is ``BOS + (BPE ids + 4) + EOS`` per document,
  uint16, with the byte shards' file layout (`bltjax.data.shards`), so their readers and the
  model's document masks (EOS) work unchanged. The model's vocabulary is ``vocab_size + 4``.
* **Bytes per token** (`BPETokenizer.stream_bytes`): the bytes of the byte stream each id stands
  for: a token its byte length, BOS and EOS one each (a byte LM predicts them as one position
  each), padding none. Bits per byte of a token LM divide its nats by these (the paper's
  conversion), and the manifest's ``bytes_per_token`` is the byte stream's length over the token
  stream's on the train split: what `bltjax.models.flops` divides per-token FLOPs by.
* **Files.** ``OUT/tokenizer.json`` (+ ``tokenizer_settings.json``: what it was trained from),
  one token shard per byte shard, named like it, and ``OUT/manifest.json`` (format
  ``bltjax-token-shards``) written last. Every file is written atomically; a re-run reuses the
  tokenizer trained from the same shards and keeps every token shard whose record matches its
  byte shard and tokenizer, so a killed run resumes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from etils import epath

from bltjax import tokenizer as byte_ids
from bltjax.data import shards as shard_format
from bltjax.runtime import paths
from bltjax.runtime.atomic import sha256_file, write_atomic
from bltjax.runtime.progress import progress_bar

FORMAT_NAME = "bltjax-token-shards"
FORMAT_VERSION = 1
TOKENIZER_FILE = "tokenizer.json"
SETTINGS_FILE = "tokenizer_settings.json"
PROGRESS_FILE = "progress.json"  # per-shard records of an unfinished run (removed with the manifest)
MANIFEST_NAME = shard_format.MANIFEST_NAME
OFFSET = byte_ids.OFFSET
MIN_VOCAB = 256  # the byte alphabet: fewer could not encode every byte
MAX_VOCAB = 65536 - OFFSET  # ids are uint16, like the byte shards'
PRE_SPLIT_NAME = "gpt2-like-v1"  # recorded in the settings: a change of `PRE_SPLIT` is a new tokenizer
# Contractions; a letter run, a digit run or a punctuation run with an optional leading space;
# whitespace (the last space of a run goes with the next word). Every character matches one branch.
PRE_SPLIT = re.compile(r"'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+")


class BPEError(ValueError):
    """A tokenizer or token folder that cannot be made or read; the message names the file or flag."""


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's 256 printable stand-ins for bytes: printable latin-1 stays itself, the rest moves to 256+."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in kept}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = _byte_alphabet()
CHAR_TO_BYTE = {char: byte for byte, char in BYTE_TO_CHAR.items()}
_TRANSLATE = str.maketrans({chr(b): c for b, c in BYTE_TO_CHAR.items()})


def pre_tokenize(document: bytes) -> str:
    """The pieces of ``document`` in the byte alphabet, joined by spaces: what the BPE model sees."""
    text = bytes(document).decode("utf-8", errors="surrogateescape")
    pieces = PRE_SPLIT.findall(text)
    return " ".join(p.encode("utf-8", errors="surrogateescape").decode("latin-1").translate(_TRANSLATE) for p in pieces)


def _tokenizers():
    try:
        import tokenizers
    except ImportError as err:  # a base install pins it; this names the package if it was removed
        raise BPEError("the token baseline needs the 'tokenizers' package (pip install tokenizers)") from err
    return tokenizers


class BPETokenizer:
    """Bytes <-> model ids of one trained byte-level BPE (``OFFSET + BPE id``; see the module docstring)."""

    def __init__(self, model: Any, json_text: str | None = None):
        self.model = model
        self.vocab_size = int(model.get_vocab_size())  # BPE ids, the 256 bytes included
        self.model_vocab_size = OFFSET + self.vocab_size
        self.json_text = json_text if json_text is not None else model.to_str()
        pieces = [model.id_to_token(i) for i in range(self.vocab_size)]
        self._bytes = [b""] * OFFSET + [bytes(CHAR_TO_BYTE[c] for c in piece) for piece in pieces]
        table = np.array([len(b) for b in self._bytes], np.int32)
        table[byte_ids.BOS_ID] = table[byte_ids.EOS_ID] = 1  # one position each in the byte stream
        self.stream_bytes = table

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        model = _tokenizers().Tokenizer.from_str(text)
        return cls(model, text)

    @classmethod
    def from_folder(cls, folder: paths.PathLike) -> BPETokenizer:
        path = paths.resolve(folder) / TOKENIZER_FILE
        if not path.is_file():
            raise BPEError(f"{path}: no tokenizer (train one with python -m bltjax.bpe --data DATA)")
        return cls.from_json(path.read_text(encoding="utf-8"))

    def encode(self, document: bytes) -> np.ndarray:
        """int32 model ids of ``document`` (no BOS / EOS)."""
        return np.asarray(self.model.encode(pre_tokenize(document)).ids, np.int32) + OFFSET

    def encode_documents(self, documents: Sequence[bytes]) -> list[np.ndarray]:
        """`encode` of many documents at once (the library encodes them in parallel)."""
        encodings = self.model.encode_batch([pre_tokenize(d) for d in documents])
        return [np.asarray(e.ids, np.int32) + OFFSET for e in encodings]

    def decode(self, ids: Any) -> bytes:
        """The exact bytes of model ids; special ids (BOS, EOS, padding) stand for no bytes."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.model_vocab_size):
            raise BPEError(f"decode: ids must lie in [0, {self.model_vocab_size}), got [{ids.min()}, {ids.max()}]")
        return b"".join(self._bytes[i] for i in ids.tolist())


def train_tokenizer(documents: Iterator[bytes], vocab_size: int) -> BPETokenizer:
    """Learns ``vocab_size`` BPE ids (256 bytes + merges) from ``documents``; raises BPEError when the
    documents hold fewer distinct merges than that."""
    check_vocab_size(vocab_size)
    tk = _tokenizers()
    model = tk.Tokenizer(tk.models.BPE())
    model.pre_tokenizer = tk.pre_tokenizers.WhitespaceSplit()  # the pieces' separators (module docstring)
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        show_progress=False,
        initial_alphabet=sorted(BYTE_TO_CHAR.values()),
        special_tokens=[],
    )
    model.train_from_iterator((pre_tokenize(d) for d in documents), trainer)
    learned = model.get_vocab_size()
    if learned != vocab_size:
        raise BPEError(
            f"--vocab-size: the train split supports only {learned} BPE ids (256 bytes + "
            f"{learned - 256} merges), fewer than the {vocab_size} asked for; lower --vocab-size or add data"
        )
    return BPETokenizer(model)


def check_vocab_size(vocab_size: Any) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise BPEError(f"--vocab-size: expected an integer in [{MIN_VOCAB}, {MAX_VOCAB}], got {vocab_size!r}")
    return vocab_size


def shard_documents(data_dir: paths.PathLike, split: str, index: int) -> Iterator[bytes]:
    """The documents of one byte shard, as bytes, in stream order."""
    tokens, offsets = shard_format.read_shard(data_dir, split, index)
    for start, stop in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
        yield (np.asarray(tokens[start + 1 : stop - 1]) - OFFSET).astype(np.uint8).tobytes()


# --- the token folder --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenManifest:
    """A checked token folder's ``manifest.json``: its shards in the byte shards' record type."""

    path: epath.Path
    vocab_size: int  # BPE ids; the model's vocabulary is vocab_size + OFFSET
    tokenizer_sha256: str
    bytes_per_token: float  # byte stream length / token stream length, train split
    text_bytes_per_token: float  # text bytes / text tokens (BOS, EOS left out), train split
    source: dict[str, Any]
    splits: dict[str, tuple[shard_format.ShardInfo, ...]]

    @property
    def model_vocab_size(self) -> int:
        return self.vocab_size + OFFSET

    def shards(self, split: str) -> tuple[shard_format.ShardInfo, ...]:
        if split not in self.splits:
            raise BPEError(f"{self.path}: no split {split!r}; expected one of {sorted(self.splits)}")
        return self.splits[split]


def default_folder(data_dir: paths.PathLike, vocab_size: int) -> epath.Path:
    """``DATA/bpe-<vocab_size>``: token shards live beside the byte shards they were made from."""
    return paths.resolve(data_dir) / f"bpe-{vocab_size}"


def is_token_folder(folder: paths.PathLike) -> bool:
    """Whether ``folder`` holds a token-shard manifest (rather than byte shards or nothing)."""
    path = paths.resolve(folder) / MANIFEST_NAME
    try:
        return path.is_file() and json.loads(path.read_text(encoding="utf-8")).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def _field(path: epath.Path, where: str, message: str) -> BPEError:
    return BPEError(f"{path}: field '{where}': {message}")


def _entry_info(path: epath.Path, split: str, index: int, entry: Any) -> shard_format.ShardInfo:
    where = f"splits.{split}[{index}]"
    if not isinstance(entry, dict) or entry.get("name") != shard_format.shard_name(split, index):
        raise _field(path, f"{where}.name", f"expected {shard_format.shard_name(split, index)!r}")
    values = []
    for key in ("documents", "tokens", "bytes"):
        value = entry.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _field(path, f"{where}.{key}", f"expected an integer >= 0, got {value!r}")
        values.append(value)
    if values[1] < 2 * values[0]:
        raise _field(path, f"{where}.tokens", f"expected >= 2 x documents = {2 * values[0]}, got {values[1]}")
    for key in ("tokens_sha256", "docs_sha256"):
        if not isinstance(entry.get(key), str) or len(entry[key]) != 64:
            raise _field(path, f"{where}.{key}", f"expected 64 hex digits, got {entry.get(key)!r}")
    return shard_format.ShardInfo(split, index, *values, entry["tokens_sha256"], entry["docs_sha256"])


def load_manifest(folder: paths.PathLike) -> TokenManifest:
    """Reads and checks ``FOLDER/manifest.json`` of a token folder; BPEError names the file and field."""
    path = paths.resolve(folder) / MANIFEST_NAME
    if not path.is_file():
        raise BPEError(f"{path}: no manifest; the token folder is not finished (run python -m bltjax.bpe)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BPEError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise _field(
            path, "format", f"expected {FORMAT_NAME!r} (a folder written by python -m bltjax.bpe), got {got!r}"
        )
    if raw.get("format_version") != FORMAT_VERSION:
        raise _field(path, "format_version", f"expected {FORMAT_VERSION}, got {raw.get('format_version')!r}")
    tokenizer = raw.get("tokenizer", {})
    vocab = tokenizer.get("vocab_size") if isinstance(tokenizer, dict) else None
    if isinstance(vocab, bool) or not isinstance(vocab, int) or not MIN_VOCAB <= vocab <= MAX_VOCAB:
        raise _field(path, "tokenizer.vocab_size", f"expected an integer in [{MIN_VOCAB}, {MAX_VOCAB}], got {vocab!r}")
    splits = {}
    for split in shard_format.SPLITS:
        entries = raw.get("splits", {}).get(split)
        if not isinstance(entries, list):
            raise _field(path, f"splits.{split}", f"expected a list of shards, got {type(entries).__name__}")
        splits[split] = tuple(_entry_info(path, split, i, e) for i, e in enumerate(entries))
    rates = []
    for key in ("bytes_per_token", "text_bytes_per_token"):
        value = raw.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise _field(path, key, f"expected a positive number, got {value!r}")
        rates.append(float(value))
    return TokenManifest(path, vocab, str(tokenizer.get("sha256")), *rates, dict(raw.get("source", {})), splits)


def verify_shard(folder: paths.PathLike, info: shard_format.ShardInfo) -> None:
    """Size and sha256 of one token shard against its manifest entry (BPEError naming the file)."""
    root = paths.resolve(folder)
    for name, key, expected in (
        (info.tokens_file, "tokens", info.tokens_sha256),
        (info.docs_file, "docs", info.docs_sha256),
    ):
        file = root / name
        if not file.is_file():
            raise BPEError(f"{file}: token shard file listed in {root / MANIFEST_NAME} is missing")
        if key == "tokens" and file.stat().length != info.tokens * shard_format.TOKEN_DTYPE.itemsize:
            raise BPEError(f"{file}: {file.stat().length} bytes, but the manifest lists {info.tokens} uint16 ids")
        actual = sha256_file(file)
        if actual != expected:
            raise BPEError(
                f"{file}: sha256 {actual} differs from the manifest's {expected}; re-run python -m bltjax.bpe"
            )


# --- writing ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenizeResult:
    folder: epath.Path
    manifest: TokenManifest
    trained: bool  # False: an existing tokenizer of the same settings was reused
    shards_written: int
    shards_kept: int


def _write_json(path: epath.Path, value: Any) -> None:
    write_atomic(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def _read_json(path: epath.Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None  # a torn or foreign file is redone, never trusted


def _tokenizer_of(data: epath.Path, out: epath.Path, manifest: shard_format.Manifest, vocab_size: int):
    """(tokenizer, trained?): the one in ``out`` if it was trained from the same shards, else a new one."""
    settings = {
        "vocab_size": vocab_size,
        "pre_split": PRE_SPLIT_NAME,
        "offset": OFFSET,
        "train_shards": [info.tokens_sha256 for info in manifest.shards("train")],
    }
    stored = _read_json(out / SETTINGS_FILE)
    tokenizer_path = out / TOKENIZER_FILE
    if stored and stored.get("settings") == settings and tokenizer_path.is_file():
        if sha256_file(tokenizer_path) == stored.get("tokenizer_sha256"):
            return BPETokenizer.from_folder(out), False
    if not manifest.shards("train"):
        raise BPEError(f"{manifest.path}: the train split has no shard to learn a tokenizer from")

    def documents() -> Iterator[bytes]:
        for info in manifest.shards("train"):
            yield from shard_documents(data, "train", info.index)

    tokenizer = train_tokenizer(documents(), vocab_size)
    write_atomic(tokenizer_path, tokenizer.json_text.encode("utf-8"))
    _write_json(out / SETTINGS_FILE, {"settings": settings, "tokenizer_sha256": sha256_file(tokenizer_path)})
    return tokenizer, True


def _tokenize_shard(data: epath.Path, out: epath.Path, info: shard_format.ShardInfo, tokenizer: BPETokenizer) -> dict:
    """Writes the token shard of byte shard ``info``; returns its manifest entry."""
    documents = list(shard_documents(data, info.split, info.index))
    streams, offsets = [], [0]
    for document, ids in zip(documents, tokenizer.encode_documents(documents), strict=True):
        covered = int(tokenizer.stream_bytes[ids].sum())
        if covered != len(document):  # cannot happen for byte-level BPE; a broken tokenizer must not pass
            raise BPEError(f"{out / TOKENIZER_FILE}: a document of {len(document)} bytes encodes to {covered} bytes")
        streams += [[byte_ids.BOS_ID], ids, [byte_ids.EOS_ID]]
        offsets.append(offsets[-1] + len(ids) + 2)
    stream = np.concatenate([np.asarray(s, np.int64) for s in streams]).astype(shard_format.TOKEN_DTYPE)
    tokens_path, docs_path = out / info.tokens_file, out / info.docs_file
    write_atomic(tokens_path, stream.tobytes())

    def save_offsets(local: str) -> None:
        with open(local, "wb") as file:
            np.save(file, np.asarray(offsets, shard_format.OFFSET_DTYPE), allow_pickle=False)

    write_atomic(docs_path, save_offsets)
    return {
        "name": info.name,
        "documents": len(documents),
        "tokens": int(stream.size),
        "bytes": info.bytes,
        "tokens_sha256": sha256_file(tokens_path),
        "docs_sha256": sha256_file(docs_path),
        "source_tokens_sha256": info.tokens_sha256,
        "source_tokens": info.tokens,
    }


def _kept(out: epath.Path, record: Any, info: shard_format.ShardInfo, tokenizer_sha: str) -> bool:
    """Whether a recorded token shard is still the one this run would write."""
    if not isinstance(record, dict) or record.get("source_tokens_sha256") != info.tokens_sha256:
        return False
    if record.get("tokenizer_sha256") != tokenizer_sha:
        return False
    files = ((out / info.tokens_file, record.get("tokens_sha256")), (out / info.docs_file, record.get("docs_sha256")))
    return all(path.is_file() and sha256_file(path) == sha for path, sha in files)


def _finished_records(folder: epath.Path) -> dict[str, dict]:
    """The shard records of a finished earlier run (its manifest), so that a re-run keeps what still matches."""
    raw = _read_json(folder / MANIFEST_NAME)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        return {}
    sha = (raw.get("tokenizer") or {}).get("sha256")
    entries = [e for split in (raw.get("splits") or {}).values() for e in split if isinstance(e, dict)]
    return {e.get("name"): dict(e, tokenizer_sha256=sha) for e in entries}


def tokenize_data(
    data_dir: paths.PathLike,
    vocab_size: int,
    *,
    out: paths.PathLike | None = None,
    progress: bool = True,
) -> TokenizeResult:
    """Trains (or reuses) the tokenizer on DATA's train split and writes every split's token shards.

    ``out`` defaults to `default_folder` (``DATA/bpe-<vocab_size>``). Resumable: see the module docstring.
    """
    check_vocab_size(vocab_size)
    data = paths.resolve(data_dir)
    manifest = shard_format.load_manifest(data)
    folder = default_folder(data, vocab_size) if out is None else paths.resolve(out)
    folder.mkdir(parents=True, exist_ok=True)
    records = _finished_records(folder)
    if (folder / MANIFEST_NAME).exists():
        (folder / MANIFEST_NAME).unlink()  # complete again only when the new manifest lands
    tokenizer, trained = _tokenizer_of(data, folder, manifest, vocab_size)
    tokenizer_sha = sha256_file(folder / TOKENIZER_FILE)
    records.update(_read_json(folder / PROGRESS_FILE) or {})
    written = kept = 0
    entries: dict[str, list[dict]] = {split: [] for split in shard_format.SPLITS}
    infos = [info for split in shard_format.SPLITS for info in manifest.shards(split)]
    with progress_bar("bpe shards", total=len(infos), unit=" shards", enabled=progress) as bar:
        for info in infos:
            record = records.get(info.name)
            if _kept(folder, record, info, tokenizer_sha):
                kept += 1
            else:
                record = dict(_tokenize_shard(data, folder, info, tokenizer), tokenizer_sha256=tokenizer_sha)
                records[info.name] = record
                _write_json(folder / PROGRESS_FILE, records)
                written += 1
            entries[info.split].append({k: v for k, v in record.items() if k != "tokenizer_sha256"})
            bar.update(1)
    train = entries["train"]
    token_stream = sum(e["tokens"] for e in train)
    text_tokens = token_stream - 2 * sum(e["documents"] for e in train)
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "sha256": tokenizer_sha,
            "vocab_size": tokenizer.vocab_size,
            "model_vocab_size": tokenizer.model_vocab_size,
            "offset": OFFSET,
            "pre_split": PRE_SPLIT_NAME,
            "special_ids": {"pad": byte_ids.BOE_ID, "bos": byte_ids.BOS_ID, "eos": byte_ids.EOS_ID},
        },
        "source": {"path": os.fspath(data), "manifest_sha256": sha256_file(manifest.path)},
        "bytes_per_token": sum(e["source_tokens"] for e in train) / max(token_stream, 1),
        "text_bytes_per_token": sum(e["bytes"] for e in train) / max(text_tokens, 1),
        "splits": entries,
    }
    write_atomic(folder / MANIFEST_NAME, (json.dumps(document, indent=1) + "\n").encode("utf-8"))
    if (folder / PROGRESS_FILE).exists():
        (folder / PROGRESS_FILE).unlink()
    return TokenizeResult(folder, load_manifest(folder), trained, written, kept)


# --- BPE-delimited byte shards (BLT's optional BPE-delimiter patching) ------------------------


def delimited_folder(data_dir: paths.PathLike, vocab_size: int) -> epath.Path:
    return paths.resolve(data_dir) / f"bpe-{vocab_size}-delimited"


def _delimited_stream(ids: np.ndarray, tokenizer: BPETokenizer) -> np.ndarray:
    """Byte ids with ``BPE_ID`` before every token's bytes; special ids stay themselves (one gather)."""
    pieces = [np.array([i], np.int64) if i < OFFSET else np.frombuffer(b, np.uint8).astype(np.int64) + OFFSET
              for i, b in enumerate(tokenizer._bytes)]  # fmt: skip
    pieces = [p if i < OFFSET else np.concatenate([[byte_ids.BPE_ID], p]) for i, p in enumerate(pieces)]
    lengths = np.array([p.size for p in pieces], np.int64)
    flat, starts = np.concatenate(pieces), np.concatenate([[0], np.cumsum(lengths)[:-1]])
    out_lengths = lengths[ids]
    first = np.concatenate([[0], np.cumsum(out_lengths)[:-1]])
    positions = np.repeat(starts[ids] - first, out_lengths) + np.arange(int(out_lengths.sum()))
    return flat[positions]


def write_delimited(
    data_dir: paths.PathLike,
    vocab_size: int,
    *,
    out: paths.PathLike | None = None,
    tokens: paths.PathLike | None = None,
) -> epath.Path:
    """Byte shards of DATA with the BPE delimiter id 3 before the bytes of every token of DATA/bpe-<V>
    (docs/architecture.md §3.11): a byte-shard folder (`bltjax.data.shards`; its ``bytes`` count the
    delimiters too) that a BLT with ``patching.mode = "bpe"`` trains on. Needs `tokenize_data` first
    (``tokens``: its folder, default DATA/bpe-<V>)."""
    data = paths.resolve(data_dir)
    tokens_dir = default_folder(data, vocab_size) if tokens is None else paths.resolve(tokens)
    manifest, tokenizer = load_manifest(tokens_dir), BPETokenizer.from_folder(tokens_dir)
    if manifest.vocab_size != vocab_size:
        raise BPEError(f"{manifest.path}: field 'tokenizer.vocab_size' is {manifest.vocab_size}, not {vocab_size}")
    folder = delimited_folder(data, vocab_size) if out is None else paths.resolve(out)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / MANIFEST_NAME).exists():
        (folder / MANIFEST_NAME).unlink()
    splits: dict[str, list[dict]] = {}
    for split in shard_format.SPLITS:
        splits[split] = []
        for info in manifest.shards(split):
            ids, offsets = shard_format.read_shard(tokens_dir, split, info.index)
            ids = np.asarray(ids, np.int64)
            stream = _delimited_stream(ids, tokenizer).astype(shard_format.TOKEN_DTYPE)
            piece_ends = np.concatenate([[0], np.cumsum(np.where(ids < OFFSET, 1, 1 + tokenizer.stream_bytes[ids]))])
            new_offsets = piece_ends[np.asarray(offsets)].astype(shard_format.OFFSET_DTYPE)
            write_atomic(folder / info.tokens_file, stream.tobytes())

            def save(local: str, values: np.ndarray = new_offsets) -> None:
                with open(local, "wb") as file:
                    np.save(file, values, allow_pickle=False)

            write_atomic(folder / info.docs_file, save)
            splits[split].append({
                "name": info.name, "documents": info.documents, "tokens": int(stream.size),
                "bytes": int(stream.size) - 2 * info.documents, "tokens_sha256": sha256_file(folder / info.tokens_file),
                "docs_sha256": sha256_file(folder / info.docs_file),
            })  # fmt: skip
    document = {
        "format": shard_format.FORMAT_NAME,
        "format_version": shard_format.FORMAT_VERSION,
        "settings": {
            "bpe_delimited": True,  # 'bytes' count the delimiters (id 3) too
            "bpe_delimiter_id": byte_ids.BPE_ID,
            "token_folder": os.fspath(tokens_dir),
            "tokenizer_sha256": manifest.tokenizer_sha256,
            "token_dtype": shard_format.TOKEN_DTYPE.str,
            "token_offset": OFFSET,
            "bos_id": byte_ids.BOS_ID,
            "eos_id": byte_ids.EOS_ID,
        },
        "splits": splits,
        "summary": {},
    }
    write_atomic(folder / MANIFEST_NAME, (json.dumps(document, indent=1) + "\n").encode("utf-8"))
    return folder
