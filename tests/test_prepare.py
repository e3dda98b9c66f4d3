"""Tests of ``python -m bltjax.prepare`` (`bltjax.data.prepare`) and its shard format (`bltjax.data.shards`)."""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from bltjax import prepare as program
from bltjax import tokenizer
from bltjax.data import prepare as prep
from bltjax.data import shards

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CORPUS_DIR = REPO_ROOT / "bltjax" / "data" / "corpus"


def read_documents(data_dir: pathlib.Path, split: str) -> list[bytes]:
    """Every document of a split, in stream order, as the bytes between its BOS and EOS."""
    manifest = shards.load_manifest(data_dir)
    documents = []
    for shard in manifest.shards(split):
        tokens, offsets = shards.read_shard(data_dir, split, shard.index)
        for begin, end in zip(offsets[:-1], offsets[1:], strict=True):
            ids = np.asarray(tokens[begin:end])
            assert ids[0] == tokenizer.BOS_ID and ids[-1] == tokenizer.EOS_ID
            assert ids[1:-1].min() >= tokenizer.OFFSET
            documents.append((ids[1:-1] - tokenizer.OFFSET).astype(np.uint8).tobytes())
    return documents


def folder_bytes(folder: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def write_jsonl(path: pathlib.Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")


@pytest.fixture
def mixed_inputs(tmp_path: pathlib.Path) -> tuple[pathlib.Path, list[bytes]]:
    """A folder with plain, non-ASCII, slightly invalid, gzip and JSONL inputs; returns (folder, documents)."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    docs = {
        "a.txt": b"Plain ASCII prose.\nSecond line.\n",
        "b.txt": "Grüße aus Köln. Привет, мир! 你好，世界。 🙂\n".encode(),
        "c.txt": b"caf\xe9 au lait: one latin-1 byte, kept as it is\n",
        "sub/d.txt.gz": "compressed: ñandú\n".encode(),
    }
    for name, data in docs.items():
        path = src / name
        path.write_bytes(gzip.compress(data, mtime=0) if name.endswith(".gz") else data)
    jsonl_texts = ["first JSON document", "zweites Dokument: äöü", "三つ目の文書"]
    write_jsonl(src / "e.jsonl", jsonl_texts)
    gz_texts = ["gzip JSONL one", "gzip JSONL two: ελληνικά"]
    (src / "sub" / "f.jsonl.gz").write_bytes(
        gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in gz_texts).encode(), mtime=0)
    )
    (src / "README.md").write_text("not an input: folders take *.txt and *.jsonl only\n")
    # Stream order: a folder's files in sorted order, then its sub-folders' (README.md is not taken).
    expected = [docs["a.txt"], docs["b.txt"], docs["c.txt"]]
    expected += [t.encode() for t in jsonl_texts]
    expected += [docs["sub/d.txt.gz"]] + [t.encode() for t in gz_texts]
    return src, expected


def test_round_trip_text_gzip_jsonl_and_raw_bytes(mixed_inputs, tmp_path):
    src, expected = mixed_inputs
    out = tmp_path / "out"
    result = prep.prepare([src], out, val_fraction=0.3, shard_bytes=64, seed=1, progress=False)

    train, validation = read_documents(out, "train"), read_documents(out, "validation")
    assert train == [d for d in expected if prep.split_of(d, 1, 0.3) == "train"]
    assert validation == [d for d in expected if prep.split_of(d, 1, 0.3) == "validation"]
    assert train and validation  # the fixture's documents fall on both sides with this seed
    assert b"caf\xe9" in b"".join(train + validation)  # the invalid byte is kept, not replaced
    assert tokenizer.decode(tokenizer.encode(expected[1])) == expected[1].decode()

    manifest = result.manifest
    assert manifest.total("train", "documents") + manifest.total("validation", "documents") == len(expected)
    assert manifest.total("train", "bytes") + manifest.total("validation", "bytes") == sum(map(len, expected))
    assert len(manifest.shards("train")) > 1  # 64-byte shards: several
    assert result.files == 6 and result.skipped == {}
    for split in shards.SPLITS:
        for shard in manifest.shards(split):
            assert shards.verify_shard(out, split, shard.index, manifest) == shard
            tokens = np.fromfile(out / shard.tokens_file, dtype="<u2")
            assert tokens.size == shard.tokens
            assert 2 * tokens.size >= 64 or shard.index == len(manifest.shards(split)) - 1  # closed when full


def test_two_runs_are_byte_identical(mixed_inputs, tmp_path):
    src, _ = mixed_inputs
    for name in ("one", "two"):
        prep.prepare([src], tmp_path / name, val_fraction=0.3, shard_bytes=48, seed=7, progress=False)
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "two")
    assert (tmp_path / "one" / "manifest.json").exists()


def test_split_fractions_follow_val_fraction_and_content(tmp_path):
    texts = [f"document number {i}: {'x' * (i % 13)}" for i in range(2000)]
    write_jsonl(tmp_path / "docs.jsonl", texts)
    result = prep.prepare([tmp_path / "docs.jsonl"], tmp_path / "a", val_fraction=0.2, seed=3, progress=False)
    validation = result.manifest.total("validation", "documents")
    assert validation + result.manifest.total("train", "documents") == 2000
    assert 0.16 < validation / 2000 < 0.24

    # A function of each document's bytes: reversing the input order reverses each split's order.
    write_jsonl(tmp_path / "reversed.jsonl", texts[::-1])
    prep.prepare([tmp_path / "reversed.jsonl"], tmp_path / "b", val_fraction=0.2, seed=3, progress=False)
    for split in shards.SPLITS:
        assert read_documents(tmp_path / "a", split) == read_documents(tmp_path / "b", split)[::-1]

    # Another seed gives another (equally sized) split; the extremes put everything on one side.
    other = prep.prepare([tmp_path / "docs.jsonl"], tmp_path / "c", val_fraction=0.2, seed=4, progress=False)
    assert read_documents(tmp_path / "c", "validation") != read_documents(tmp_path / "a", "validation")
    assert 0.16 < other.manifest.total("validation", "documents") / 2000 < 0.24
    none = prep.prepare([tmp_path / "docs.jsonl"], tmp_path / "d", val_fraction=0.0, progress=False)
    assert none.manifest.shards("validation") == () and none.manifest.total("train", "documents") == 2000
    every = prep.prepare([tmp_path / "docs.jsonl"], tmp_path / "e", val_fraction=1.0, progress=False)
    assert every.manifest.shards("train") == () and every.manifest.total("validation", "documents") == 2000


class Killed(Exception):
    pass


def test_resume_after_a_killed_run(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"doc{i:02d}.txt").write_text(f"document {i} " * (i + 3))
    settings = dict(val_fraction=0.25, shard_bytes=600, seed=0, progress=False)
    reference = tmp_path / "reference"
    prep.prepare([src], reference, **settings)
    assert len(shards.load_manifest(reference).shards("train")) >= 3

    out = tmp_path / "out"

    def kill_after_first(shard: shards.ShardInfo) -> None:
        raise Killed(shard.name)

    with pytest.raises(Killed):
        prep.prepare([src], out, on_shard=kill_after_first, **settings)
    assert not (out / "manifest.json").exists()  # an unfinished folder has no manifest
    finished = sorted(p.name for p in out.iterdir())
    assert len(finished) == 2  # the first shard's .tokens and .docs.npy, nothing half-written
    # What a kill during a write leaves behind: a temp file, never a file under a shard's name.
    (out / ".train-00001.tokens.tmp").write_bytes(b"half a shard")
    old_ns = 1_000_000_000_000_000_000
    for name in finished:
        os.utime(out / name, ns=(old_ns, old_ns))

    result = prep.prepare([src], out, **settings)
    assert result.shards_kept == 1
    assert (
        result.shards_written
        == len(shards.load_manifest(reference).shards("train"))
        + len(shards.load_manifest(reference).shards("validation"))
        - 1
    )
    for name in finished:
        assert (out / name).stat().st_mtime_ns == old_ns  # skipped, not rewritten
    assert folder_bytes(out) == folder_bytes(reference)  # temp file gone, result as if never killed

    # A stale shard (different bytes under a listed name) is rewritten on the next run.
    tokens_file = out / f"{shards.shard_name('train', 1)}.tokens"
    tokens_file.write_bytes(tokens_file.read_bytes()[::-1])
    again = prep.prepare([src], out, **settings)
    assert again.shards_written == 1
    assert folder_bytes(out) == folder_bytes(reference)


def test_a_shorter_rerun_removes_shards_the_manifest_no_longer_lists(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [f"doc {i} " * 20 for i in range(30)])
    out = tmp_path / "out"
    prep.prepare([tmp_path / "d.jsonl"], out, val_fraction=0.0, shard_bytes=200, progress=False)
    assert (out / "train-00005.tokens").exists()
    prep.prepare([tmp_path / "d.jsonl"], out, val_fraction=0.0, shard_bytes=1 << 20, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train-00000.docs.npy", "train-00000.tokens"]


@pytest.mark.slow
def test_cli_on_the_bundled_corpus(tmp_path):
    out = tmp_path / "bundled"
    command = [sys.executable, "-m", "bltjax.prepare", "--input", str(CORPUS_DIR), "--out", str(out)]
    run = subprocess.run([*command, "--shard-bytes", "1MiB"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "skipped    nothing" in run.stdout
    assert "MB/s" in run.stderr and "documents" in run.stderr  # the progress line: bytes/s, documents

    manifest = shards.load_manifest(out)
    inputs = sorted(CORPUS_DIR.glob("*.txt")) + sorted(CORPUS_DIR.glob("*.jsonl"))
    assert manifest.summary["files"] == len(inputs) >= 9  # PROVENANCE.md and build_corpus.py are not inputs
    assert manifest.total("train", "documents") > 10_000
    assert manifest.total("validation", "documents") > 50
    assert 3_000_000 < manifest.total("train", "bytes") + manifest.total("validation", "bytes") < 8_000_000
    assert manifest.settings["shard_bytes"] == 1 << 20
    text = b""
    for split in shards.SPLITS:
        for shard in manifest.shards(split):
            shards.verify_shard(out, split, shard.index, manifest)
        text += b"".join(read_documents(out, split))
    decoded = text.decode("utf-8")
    for sample in ("In the beginning God created", "def ", "Книга", "月", "¿", "perch"):
        assert sample in decoded, sample

    rerun = subprocess.run([*command, "--shard-bytes", "1MiB", "--no-progress"], cwd=REPO_ROOT, capture_output=True)
    assert rerun.returncode == 0 and b"0 written" in rerun.stdout and rerun.stderr == b""


# ---------------------------------------------------------------------------------------------
# Bad input


def good_file(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "good.txt"
    path.write_text("a good document\n")
    return path


@pytest.mark.parametrize(
    "name, content, reason, line",
    [
        ("empty.txt", b"", "empty file", None),
        ("blank.txt", b"  \n\n", "empty file", None),
        ("nul.txt", b"text with a \x00 NUL byte\n", "binary file", None),
        ("noise.txt", bytes(range(128, 256)) * 8 + bytes(range(1, 9)) * 8, "binary file", None),
        ("fields.jsonl", b'{"text": "fine"}\n{"body": "no text field"}\n', "missing text field", 2),
        ("number.jsonl", b'{"text": "fine"}\n\n{"text": 42}\n', "missing text field", 3),
        ("broken.jsonl", b'{"text": "fine"}\n{"text": "fine too"}\n{"text": unquoted\n', "bad JSON line", 3),
        ("truncated.txt.gz", gzip.compress(b"some text " * 100)[:-12], "unreadable file", None),
    ],
    ids=["empty", "blank", "nul", "noise", "no-field", "not-a-string", "bad-json", "truncated-gz"],
)
def test_bad_input_is_skipped_with_a_warning_naming_the_file(tmp_path, capsys, name, content, reason, line):
    bad = tmp_path / name
    bad.write_bytes(content)
    result = prep.prepare([good_file(tmp_path), bad], tmp_path / "out", val_fraction=0.0, progress=False)

    warning = capsys.readouterr().err
    where = f"{bad}:{line}" if line else str(bad)
    assert f"warning: {where}: skipped ({reason}" in warning
    assert result.skipped == {reason: 1}
    assert result.manifest.summary["skipped"] == {reason: 1}
    assert f"1 {reason}" in result.summary()
    documents = read_documents(tmp_path / "out", "train")
    assert documents[0] == b"a good document\n" and b"no text field" not in b"".join(documents)


def test_mostly_valid_utf8_is_not_binary():
    assert prep.binary_reason("ordinary text, with a stray \xe9 byte\n".encode("latin-1") * 50) is None
    assert prep.binary_reason("Кириллица и 漢字 are text".encode()) is None
    assert prep.binary_reason(b"\x1b[32mcoloured\x1b[m\ttab\x0cform feed\r\n") is None


def test_missing_path_fails_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "no-such-file.txt"
    with pytest.raises(prep.PrepareError, match=str(missing)):
        prep.prepare([good_file(tmp_path), missing], out, progress=False)
    assert not out.exists()

    assert program.main(["--input", str(missing), "--out", str(out)]) == 2
    assert f"error: --input: path does not exist: {missing}" in capsys.readouterr().err
    assert not out.exists()


def test_zst_without_zstandard_names_the_file_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "_zstandard", lambda: None)
    zst = tmp_path / "docs.jsonl.zst"
    zst.write_bytes(b"\x28\xb5\x2f\xfd not really zstd")
    with pytest.raises(prep.PrepareError, match=r"docs\.jsonl\.zst.*pip install zstandard"):
        prep.prepare([tmp_path], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_zst_inputs_multi_frame_and_truncated(tmp_path, capsys):
    zstandard = pytest.importorskip("zstandard")  # optional: not a dependency of bltjax
    compress = zstandard.ZstdCompressor().compress
    lines = [json.dumps({"text": f"zstd document {i}: ü"}) + "\n" for i in range(5)]
    # Two frames back to back, as parallel compressors write them.
    (tmp_path / "a.jsonl.zst").write_bytes(
        compress("".join(lines[:3]).encode()) + compress("".join(lines[3:]).encode())
    )
    (tmp_path / "b.txt.zst").write_bytes(compress("ein Text: äöü\n".encode()))
    (tmp_path / "c.txt.zst").write_bytes(compress(os.urandom(50_000).hex().encode())[:-20])
    result = prep.prepare([tmp_path], tmp_path / "out", val_fraction=0.0, progress=False)
    assert read_documents(tmp_path / "out", "train") == [f"zstd document {i}: ü".encode() for i in range(5)] + [
        "ein Text: äöü\n".encode()
    ]
    assert result.skipped == {"unreadable file": 1}
    assert f"{tmp_path / 'c.txt.zst'}: skipped (unreadable file: EOFError" in capsys.readouterr().err


def test_no_usable_document_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(prep.PrepareError, match="no usable documents"):
        prep.prepare([tmp_path / "empty.txt"], tmp_path / "out", progress=False)


def test_settings_are_checked(tmp_path):
    good = good_file(tmp_path)
    for kwargs, field in [
        (dict(val_fraction=1.5), "--val-fraction"),
        (dict(shard_bytes=0), "--shard-bytes"),
        (dict(text_field=""), "--text-field"),
        (dict(seed=1.5), "--seed"),
    ]:
        with pytest.raises(prep.PrepareError, match=field):
            prep.prepare([good], tmp_path / "out", progress=False, **kwargs)
    assert program.parse_size("64MiB") == 64 << 20 and program.parse_size("512k") == 512 << 10
    assert program.parse_size("1000") == 1000


# ---------------------------------------------------------------------------------------------
# Readers refuse corrupt, truncated and stale data


@pytest.fixture
def prepared(tmp_path: pathlib.Path) -> pathlib.Path:
    write_jsonl(tmp_path / "d.jsonl", [f"document {i}, " * (i + 1) for i in range(20)])
    prep.prepare([tmp_path / "d.jsonl"], tmp_path / "data", val_fraction=0.0, shard_bytes=300, progress=False)
    return tmp_path / "data"


def test_verify_shard_detects_a_modified_shard(prepared):
    path = prepared / "train-00001.tokens"
    data = bytearray(path.read_bytes())
    data[10] ^= 1  # same size, one bit different
    path.write_bytes(bytes(data))
    shards.verify_shard(prepared, "train", 0)
    with pytest.raises(shards.DataFormatError, match=r"train-00001\.tokens: sha256 .*tokens_sha256"):
        shards.verify_shard(prepared, "train", 1)


def test_verify_shard_detects_a_modified_offsets_file(prepared):
    path = prepared / "train-00000.docs.npy"
    offsets = np.load(path)
    offsets[1] += 1
    np.save(path, offsets)
    with pytest.raises(shards.DataFormatError, match=r"train-00000\.docs\.npy: sha256 .*docs_sha256"):
        shards.verify_shard(prepared, "train", 0)


def test_truncated_shard_is_detected_by_verify_and_read(prepared):
    path = prepared / "train-00002.tokens"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(shards.DataFormatError, match=r"train-00002\.tokens: size .*truncated"):
        shards.verify_shard(prepared, "train", 2)
    with pytest.raises(shards.DataFormatError, match=r"train-00002\.docs\.npy: offsets"):
        shards.read_shard(prepared, "train", 2)
    path.write_bytes(path.read_bytes()[:-1])  # an odd number of bytes
    with pytest.raises(shards.DataFormatError, match=r"train-00002\.tokens: size"):
        shards.read_shard(prepared, "train", 2)


def test_verify_shard_names_a_missing_file_and_a_missing_index(prepared):
    (prepared / "train-00001.docs.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"train-00001\.docs\.npy"):
        shards.verify_shard(prepared, "train", 1)
    with pytest.raises(shards.DataFormatError, match=r"manifest\.json.*no index 99"):
        shards.verify_shard(prepared, "train", 99)


def edit_manifest(data_dir: pathlib.Path, edit) -> None:
    path = data_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda m: m.update(format_version=2), "format_version"),
        (lambda m: m.update(format="something-else"), "format"),
        (lambda m: m.pop("settings"), "settings"),
        (lambda m: m["splits"].pop("validation"), "splits"),
        (lambda m: m["splits"]["train"][0].pop("tokens_sha256"), r"splits\.train\[0\]\.tokens_sha256"),
        (lambda m: m["splits"]["train"][1].update(name="train-00007"), r"splits\.train\[1\]\.name"),
        (lambda m: m["splits"]["train"][0].update(tokens="12"), r"splits\.train\[0\]\.tokens"),
        (lambda m: m["splits"]["train"][0].update(bytes=1), r"splits\.train\[0\]\.bytes"),
    ],
    ids=["version", "format", "settings", "splits", "sha256", "name", "tokens", "bytes"],
)
def test_malformed_manifest_names_the_file_and_field(prepared, edit, field):
    edit_manifest(prepared, edit)
    with pytest.raises(shards.DataFormatError, match=rf"manifest\.json: field '{field}'"):
        shards.load_manifest(prepared)


def test_manifest_that_is_not_json_or_absent(prepared):
    (prepared / "manifest.json").write_text('{"format": "bltjax-byte-shards", ')
    with pytest.raises(shards.DataFormatError, match=r"manifest\.json: not valid JSON"):
        shards.load_manifest(prepared)
    (prepared / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"manifest\.json: no manifest"):
        shards.load_manifest(prepared)


def test_prepare_does_not_import_jax():
    """Preparing shards is text and numpy only: the program and its library never load jax (or start a backend)."""
    code = "import sys, bltjax.prepare, bltjax.data.prepare; print('jax' in sys.modules, 'jaxlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.split() == ["False", "False"], result.stdout + result.stderr
