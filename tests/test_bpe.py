"""The token baseline's data (bltjax/data/bpe.py, python -m bltjax.bpe): a byte-level BPE that covers
every byte, trained deterministically on the train split, and token shards whose byte counts are exact."""

from __future__ import annotations

import json
import math

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


def test_bpe_delimiter_patching_starts_after_each_delimiter(token_folder, corpus_data, tmp_path):
    """docs/architecture.md §3.11: id 3 before every token's bytes; patches start at 0, 1 and after each delimiter."""
    import jax.numpy as jnp

    from bltjax.patching import PatchingRule, patch_lengths
    from bltjax.patching.incremental import IncrementalRule
    from bltjax.patching.traced import patch_lengths_jnp

    out = bpe.write_delimited(corpus_data, VOCAB, out=tmp_path / "delimited", tokens=token_folder.folder)
    manifest = shard_format.load_manifest(out)  # a byte-shard folder: every reader of byte shards reads it
    assert manifest.settings["bpe_delimited"] is True
    for split in shard_format.SPLITS:
        for info, tokens_info in zip(manifest.shards(split), token_folder.manifest.shards(split), strict=True):
            shard_format.verify_shard(out, split, info.index, manifest)
            stream = np.asarray(shard_format.read_shard(out, split, info.index)[0])
            source = np.asarray(shard_format.read_shard(corpus_data, split, info.index)[0])
            np.testing.assert_array_equal(stream[stream != byte_ids.BPE_ID], source)  # the bytes, unchanged
            assert (stream == byte_ids.BPE_ID).sum() == tokens_info.tokens - 2 * tokens_info.documents  # one per token
    rule = PatchingRule(mode="bpe")
    stream = np.asarray(shard_format.read_shard(out, "train", 0)[0]).astype(np.int32)
    windows = np.stack([stream[start : start + 65] for start in range(0, 64 * 16, 64)])
    inputs = windows[:, :-1]
    lengths = patch_lengths(inputs, rule, include_next_token=True)
    np.testing.assert_array_equal(
        np.asarray(patch_lengths_jnp(jnp.asarray(inputs), rule, max_patches=65, include_next_token=True)),
        np.pad(lengths, ((0, 0), (0, 65 - lengths.shape[1]))),
    )
    for row, window in zip(lengths, inputs, strict=True):
        starts = np.cumsum(row[row > 0])[:-1]  # every start after the forced 0 and 1
        expected = np.flatnonzero(window == byte_ids.BPE_ID) + 1  # up to N: the virtual next token's patch
        np.testing.assert_array_equal(starts[1:], expected[expected >= 2])
        assert row.sum() == 65
    step = IncrementalRule.of(rule)  # generation decides the same, one byte at a time
    positions = jnp.arange(2, 64)
    natural = step.natural_starts(
        jnp.asarray(rule.values()), positions, None, None, jnp.asarray(inputs[0, 1:63]), jnp.asarray(inputs[0, 0:62])
    )
    np.testing.assert_array_equal(np.asarray(natural), inputs[0, 1:63] == byte_ids.BPE_ID)


@pytest.mark.slow
def test_a_blt_trains_and_evaluates_with_bpe_delimiter_patching(token_folder, corpus_data, tmp_path):
    import io

    import jax

    from bltjax.config import load_config
    from bltjax.inference.evaluate import evaluate
    from bltjax.inference.restore import load_for_inference
    from bltjax.training.metrics import read_jsonl
    from bltjax.training.trainer import train

    folder = bpe.write_delimited(corpus_data, VOCAB, out=tmp_path / "delimited", tokens=token_folder.folder)
    config = load_config("experiments/blt_tiny.py")
    config.patching.mode, config.patching.threshold, config.patching.patch_size = "bpe", None, 3.0
    config.data.path, config.train.steps, config.train.log_every = str(folder), 12, 4
    config.train.eval_every, config.train.checkpoint_every, config.optimizer.warmup_steps = 0, 0, 2
    config.mesh.data = 1
    result = train(config, tmp_path / "run", console=io.StringIO(), devices=jax.devices()[:1])
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    assert result.final_step == 12 and records[-1]["loss"] < records[0]["loss"]
    assert 2.0 < records[-1]["mean_patch_size"] < 6.0  # a token's bytes plus its delimiter
    evaluated = evaluate(load_for_inference(tmp_path / "run", devices=jax.devices()[:1]), folder, progress=False)
    assert evaluated.patching["mode"] == "bpe" and math.isfinite(evaluated.bpb_bytes)
    # bpb_bytes counts text bytes only: the delimiters are targets but not bytes
    source = shard_format.load_manifest(corpus_data)
    assert evaluated.n_bytes == sum(info.bytes for info in source.shards("validation"))
