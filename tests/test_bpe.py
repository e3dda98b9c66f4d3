"""The token baseline's data (bltjax/data/bpe.py, python -m bltjax.bpe): a byte-level BPE that covers
every byte, trained deterministically on the train split, and token shards whose byte counts are exact."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bltjax import bpe as bpe_program
from bltjax import tokenizer as byte_ids
from bltjax.data import bpe
from bltjax.data import shards as shard_format

VOCAB = 1024


@pytest.fixture(scope="module")
def token_folder(corpus_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe") / "tokens"
    result = bpe.tokenize_data(corpus_data, VOCAB, out=out, progress=False)
    return result


def _documents(data, split):
    manifest = shard_format.load_manifest(data)
    return [doc for info in manifest.shards(split) for doc in bpe.shard_documents(data, split, info.index)]


def test_round_trip_of_every_document_and_of_invalid_utf8(token_folder, corpus_data):
    tokenizer = bpe.BPETokenizer.from_folder(token_folder.folder)
    documents = _documents(corpus_data, "train") + _documents(corpus_data, "validation")
    assert documents
    for document, ids in zip(documents, tokenizer.encode_documents(documents), strict=True):
        assert tokenizer.decode(ids) == document
        assert ids.min() >= bpe.OFFSET and ids.max() < tokenizer.model_vocab_size
    rng = np.random.default_rng(0)
    awkward = [
        b"\xff\xfe\x80 caf\xc3\xa9 \xe2\x82",  # bytes that are no UTF-8 at all, a truncated sequence
        bytes(range(256)),  # every byte value once
        rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "naïve 日本語 \U0001f600\t\r\n  x".encode(),
        b"",
    ]
    for data in awkward:
        assert tokenizer.decode(tokenizer.encode(data)) == data
    # more than one byte per token on text the tokenizer has seen: the merges are used
    text = documents[0]
    assert len(tokenizer.encode(text)) < len(text)


def test_vocabulary_size_is_honoured(token_folder, corpus_data, tmp_path):
    tokenizer = bpe.BPETokenizer.from_folder(token_folder.folder)
    assert tokenizer.vocab_size == VOCAB and tokenizer.model_vocab_size == VOCAB + 4
    assert token_folder.manifest.vocab_size == VOCAB
    assert token_folder.manifest.model_vocab_size == VOCAB + 4
    for bad in (255, 70000, "4096", True):
        with pytest.raises(bpe.BPEError, match="--vocab-size"):
            bpe.tokenize_data(corpus_data, bad, out=tmp_path / "bad", progress=False)
    with pytest.raises(bpe.BPEError, match="supports only .* BPE ids"):  # more merges than the data holds
        bpe.train_tokenizer(iter([b"abab abab"]), 300)


def test_same_data_and_vocabulary_give_the_same_files(token_folder, corpus_data, tmp_path):
    again = bpe.tokenize_data(corpus_data, VOCAB, out=tmp_path / "again", progress=False)
    assert again.trained
    first, second = token_folder.folder, again.folder
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    for info in token_folder.manifest.shards("train") + token_folder.manifest.shards("validation"):
        assert (first / info.tokens_file).read_bytes() == (second / info.tokens_file).read_bytes()
    other = bpe.tokenize_data(corpus_data, VOCAB + 64, out=tmp_path / "other", progress=False)
    assert (other.folder / "tokenizer.json").read_bytes() != (first / "tokenizer.json").read_bytes()


def test_token_shards_cover_exactly_the_document_bytes(token_folder, corpus_data):
    tokenizer = bpe.BPETokenizer.from_folder(token_folder.folder)
    manifest = token_folder.manifest
    byte_manifest = shard_format.load_manifest(corpus_data)
    byte_stream = token_stream = 0
    for split in shard_format.SPLITS:
        assert len(manifest.shards(split)) == len(byte_manifest.shards(split))
        for info, source in zip(manifest.shards(split), byte_manifest.shards(split), strict=True):
            bpe.verify_shard(token_folder.folder, info)
            ids, offsets = shard_format.read_shard(token_folder.folder, split, info.index)  # BOS first, EOS last
            ids = np.asarray(ids, np.int64)
            documents = list(bpe.shard_documents(corpus_data, split, info.index))
            assert info.documents == len(documents) == len(offsets) - 1
            for document, start, stop in zip(documents, offsets[:-1], offsets[1:], strict=True):
                doc_ids = ids[start:stop]
                assert doc_ids[0] == byte_ids.BOS_ID and doc_ids[-1] == byte_ids.EOS_ID
                # the bytes each token covers sum to the document's length; BOS and EOS count one each
                assert int(tokenizer.stream_bytes[doc_ids].sum()) == len(document) + 2
                assert tokenizer.decode(doc_ids) == document
            assert info.bytes == source.bytes == sum(len(d) for d in documents)
            assert int(tokenizer.stream_bytes[ids].sum()) == source.tokens  # the byte stream, position for position
            if split == "train":
                byte_stream, token_stream = byte_stream + source.tokens, token_stream + info.tokens
    assert manifest.bytes_per_token == pytest.approx(byte_stream / token_stream, rel=1e-12)
    assert manifest.bytes_per_token > 1.5  # BPE merges: several bytes per token on this corpus


def test_a_rerun_keeps_what_matches_and_a_killed_run_resumes(corpus_data, tmp_path, monkeypatch):
    out = tmp_path / "tokens"
    calls = []
    real = bpe._tokenize_shard

    def dies_after_one(data, folder, info, tokenizer):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(info.name)
        return real(data, folder, info, tokenizer)

    monkeypatch.setattr(bpe, "_tokenize_shard", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        bpe.tokenize_data(corpus_data, VOCAB, out=out, progress=False)
    assert not (out / bpe.MANIFEST_NAME).exists()  # unfinished: no manifest, so no reader trusts it
    with pytest.raises(bpe.BPEError, match="no manifest"):
        bpe.load_manifest(out)
    monkeypatch.setattr(bpe, "_tokenize_shard", real)
    resumed = bpe.tokenize_data(corpus_data, VOCAB, out=out, progress=False)
    total = len(resumed.manifest.shards("train")) + len(resumed.manifest.shards("validation"))
    assert not resumed.trained and resumed.shards_kept == 1 and resumed.shards_written == total - 1
    assert not (out / bpe.PROGRESS_FILE).exists()
    again = bpe.tokenize_data(corpus_data, VOCAB, out=out, progress=False)
    assert not again.trained and again.shards_kept == total and again.shards_written == 0
    first = resumed.manifest.shards("train")[0]
    (out / first.tokens_file).write_bytes(b"\x01\x00\x02\x00")  # a tampered shard is rewritten
    fixed = bpe.tokenize_data(corpus_data, VOCAB, out=out, progress=False)
    assert fixed.shards_written == 1
    bpe.verify_shard(out, fixed.manifest.shards("train")[0])


def test_manifest_errors_name_the_file_and_field(token_folder, tmp_path):
    raw = json.loads((token_folder.folder / bpe.MANIFEST_NAME).read_text())
    assert raw["tokenizer"]["vocab_size"] == VOCAB and raw["format"] == bpe.FORMAT_NAME
    broken = tmp_path / "broken"
    broken.mkdir()
    raw["tokenizer"]["vocab_size"] = 12
    (broken / bpe.MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(bpe.BPEError, match=r"manifest.json: field 'tokenizer.vocab_size'"):
        bpe.load_manifest(broken)
    assert bpe.is_token_folder(token_folder.folder) and not bpe.is_token_folder(tmp_path)


def test_command_line(corpus_data, tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        bpe_program.main(["--data", str(corpus_data), "--vocab-size", "512", "--out", str(out), "--no-progress"]) == 0
    )
    printed = capsys.readouterr().out
    assert "512 BPE ids (model vocabulary 516)" in printed and "bytes per token" in printed
    assert bpe.load_manifest(out).vocab_size == 512
    assert bpe_program.main(["--data", str(tmp_path / "no-data")]) == 1
    assert "no-data" in capsys.readouterr().err
    default = bpe.default_folder(corpus_data, 512)
    assert default == corpus_data / "bpe-512"
