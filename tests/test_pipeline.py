"""The data pipeline (bltjax/data/pipeline.py) on shards written here exactly per docs/data.md:
element shapes and patchings, batch = f(seed, step) across processes, devices and fresh
interpreters, resumable iterators, entropy sidecars and their errors, the overflow policy."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from bltjax.config import base_blt_config, base_byte_lm_config
from bltjax.data import pipeline, prepare
from bltjax.data import shards as shard_format
from bltjax.data.pipeline import DataError, batch_at_step, global_batch, make_dataset, make_iterator
from bltjax.data.sidecar_rules import rule_record, rule_tag
from bltjax.data.sidecars import start_mask, threshold_tag
from bltjax.models.patch_ids import check_patch_lengths
from bltjax.patching import (
    PatchingRule,
    decoder_patch_ids_from_lengths,
    lengths_from_start_mask,
    patch_ids_from_lengths,
    patch_lengths,
    patch_start_mask,
    split_long_patches,
    start_mask_from_lengths,
)
from bltjax.tokenizer import BOS_ID, encode

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CORPUS = REPO_ROOT / "bltjax" / "data" / "corpus" / "jargon_file_4.4.7_appendix_a.txt"
N = 64  # seq_len
B = 8  # global batch: divisible by 1, 2, 4 and 8 processes / devices
THETA = 1.335442066192627
TAG = threshold_tag(THETA)  # "t1.3354421": the tag bltjax.data.entropy gives this threshold
SEED = 1234


# ---------------------------------------------------------------------------------------------
# A tiny writer of the docs/data.md format (shards, manifest, entropy sidecars)


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _documents() -> list[str]:
    paragraphs = [p.strip() for p in CORPUS.read_text(encoding="utf-8").split("\n\n")]
    return [p for p in paragraphs if p]


def _entropies(doc_tokens: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Synthetic H_t with a mean patch near 4.5 at THETA (the real model is not needed here)."""
    return rng.gamma(0.6, 1.4, size=doc_tokens.size).astype(np.float16)


def write_data(root: pathlib.Path, n_shards: int = 3, split: str = "train") -> dict:
    """Shards of the jargon-file paragraphs, their manifest and entropy sidecars for TAG."""
    root.mkdir(parents=True, exist_ok=True)
    docs = _documents()
    rng = np.random.default_rng(0)
    entries, sidecar_shards = [], {}
    per_shard = -(-len(docs) // n_shards)
    truth = {}
    for index in range(n_shards):
        name = f"{split}-{index:05d}"
        encoded = [encode(doc).astype(np.uint16) for doc in docs[index * per_shard : (index + 1) * per_shard]]
        long = next(i for i, d in enumerate(encoded) if d.size > N + 1)
        encoded.insert(0, encoded.pop(long))  # window 0 of every shard lies inside one document
        offsets = np.concatenate([[0], np.cumsum([d.size for d in encoded])]).astype(np.int64)
        stream = np.concatenate(encoded).astype("<u2")
        entropies = [_entropies(d, rng) for d in encoded]
        starts = np.concatenate(
            [
                patch_start_mask(d[None].astype(np.int32), mode="entropy", entropies=h[None], threshold=THETA,
                                 include_next_token=False)[0]
                for d, h in zip(encoded, entropies, strict=True)
            ]
        )  # fmt: skip
        (root / f"{name}.tokens").write_bytes(stream.tobytes())
        np.save(root / f"{name}.docs.npy", offsets.astype("<i8"))
        (root / f"{name}.entropy.f16").write_bytes(np.concatenate(entropies).astype("<f2").tobytes())
        (root / f"{name}.starts.{TAG}.bits").write_bytes(np.packbits(starts).tobytes())
        entries.append(
            {
                "name": name,
                "documents": len(encoded),
                "tokens": int(stream.size),
                "bytes": int(stream.size - 2 * len(encoded)),
                "tokens_sha256": _sha256(root / f"{name}.tokens"),
                "docs_sha256": _sha256(root / f"{name}.docs.npy"),
            }
        )
        sidecar_shards[name] = {
            "split": split,
            "tokens": int(stream.size),
            "tokens_sha256": entries[-1]["tokens_sha256"],
            "entropy_sha256": _sha256(root / f"{name}.entropy.f16"),
            "starts_sha256": {TAG: _sha256(root / f"{name}.starts.{TAG}.bits")},
        }
        truth[name] = {"stream": stream, "entropies": entropies, "starts": starts, "offsets": offsets}
    manifest = {
        "format": "bltjax-byte-shards",
        "format_version": 1,
        "settings": {"inputs": [CORPUS.name]},
        "splits": {"train": [], "validation": [], split: entries},
        "summary": {},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    sidecars = {
        "format": "bltjax.entropy-sidecars",
        "version": 1,
        "entropy_model": {"fingerprint": "synthetic-test-entropies"},
        "threshold": THETA,
        "tag": TAG,
        "thresholds": {TAG: {"threshold": THETA, "calibration": None}},
        "shards": sidecar_shards,
    }
    (root / "sidecars.json").write_text(json.dumps(sidecars, indent=1))
    return truth


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[pathlib.Path, dict]:
    root = tmp_path_factory.mktemp("shards")
    return root, write_data(root)


@pytest.fixture(scope="module")
def data_dir(written) -> pathlib.Path:
    return written[0]


@pytest.fixture(scope="module")
def truth(written) -> dict:
    return written[1]


def make_config(mode: str = "space", *, max_patches: int = 40, **patching):
    config = base_blt_config()
    config.data.seq_len = N
    config.data.batch_size = B
    config.data.max_patches = N + 1 if mode == "byte" else max_patches
    config.patching.mode = mode
    config.patching.threshold = THETA if mode == "entropy" else None
    config.patching.patch_size = 4 if mode == "static" else None
    for key, value in patching.items():
        config.patching[key] = value
    return config


def dataset(data_dir, config, *, process_index=0, process_count=1, seed=SEED, **kwargs):
    return make_dataset(
        config, data_dir, "train", seed=seed, process_index=process_index, process_count=process_count, **kwargs
    )


def stream_windows(data_dir, config, indices, seed=SEED) -> np.ndarray:
    """Windows of global rows `indices`, read by an independent path (source + grain shuffle)."""
    source = pipeline.make_source(config, data_dir, "train")
    rows = pipeline.grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    return np.stack([rows[int(i)]["window"] for i in indices]).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Elements


@pytest.mark.parametrize("mode", ["static", "space", "byte", "entropy"])
def test_elements_have_static_shapes_valid_patchings_and_shifted_targets(data_dir, mode):
    config = make_config(mode)
    ds = dataset(data_dir, config)
    for step in (0, 5):
        batch = batch_at_step(ds, step)
        assert set(batch) == {"tokens", "targets", "loss_mask", "patch_lengths"}
        assert batch["tokens"].shape == batch["targets"].shape == batch["loss_mask"].shape == (B, N)
        assert batch["tokens"].dtype == batch["targets"].dtype == np.int32
        assert batch["loss_mask"].dtype == np.bool_
        assert batch["patch_lengths"].shape == (B, config.data.max_patches)
        assert batch["patch_lengths"].dtype == np.int32
        check_patch_lengths(batch["patch_lengths"], N)
        np.testing.assert_array_equal(batch["patch_lengths"].sum(axis=1), N + 1)
        np.testing.assert_array_equal(batch["tokens"][:, 1:], batch["targets"][:, :-1])
        windows = stream_windows(data_dir, config, range(step * B, step * B + B))
        np.testing.assert_array_equal(batch["tokens"], windows[:, :-1])
        np.testing.assert_array_equal(batch["targets"], windows[:, 1:])
        assert batch["loss_mask"].all()  # no padding in full windows, no overflow at 40 patches


def test_static_space_and_byte_lengths_are_the_patchers_on_the_window(data_dir):
    for mode, kwargs in (("static", {"patch_size": 4}), ("space", {}), ("byte", {})):
        config = make_config(mode)
        batch = batch_at_step(dataset(data_dir, config), 3)
        expected = patch_lengths(batch["tokens"], mode=mode, include_next_token=True, **kwargs)
        got = batch["patch_lengths"]
        np.testing.assert_array_equal(got[:, : expected.shape[1]], expected)
        assert not got[:, expected.shape[1] :].any()
    static = batch_at_step(dataset(data_dir, make_config("static")), 0)["patch_lengths"][0]
    assert static[:18].tolist() == [1] + [4] * 16 + [0]  # 1 + 16 * 4 = N + 1


def test_windows_tile_each_shard_and_drop_the_short_tail(data_dir, truth):
    source = pipeline.make_source(make_config("space"), data_dir, "train")
    assert len(source) == sum((t["stream"].size - 1) // N for t in truth.values())
    for number, (_, shard_truth) in enumerate(sorted(truth.items())):
        windows = (shard_truth["stream"].size - 1) // N
        first = source._first[number]
        for w in (0, windows - 1):
            assert source.locate(first + w) == (number, w * N)
            np.testing.assert_array_equal(source[first + w]["window"], shard_truth["stream"][w * N : w * N + N + 1])
        assert source._first[number + 1] == first + windows  # the short tail has no window
    with pytest.raises(IndexError):
        source[len(source)]


def test_byte_lm_configs_get_no_patch_lengths(data_dir):
    config = base_byte_lm_config()
    config.data.seq_len, config.data.batch_size = N, B
    batch = batch_at_step(dataset(data_dir, config), 0)
    assert set(batch) == {"tokens", "targets", "loss_mask"}


# ---------------------------------------------------------------------------------------------
# Entropy sidecars


def test_entropy_lengths_follow_the_sidecar_and_the_first_patch_rule(data_dir, truth):
    config = make_config("entropy")
    source = pipeline.make_source(config, data_dir, "train")
    builder = pipeline.BatchBuilder(seq_len=N, max_patches=40, rule=PatchingRule(mode="entropy", threshold=THETA))
    name = sorted(truth)[0]
    shard = truth[name]
    doc_lengths = np.diff(shard["offsets"])
    doc = int(np.flatnonzero(doc_lengths > N + 1)[0])  # a document that holds a whole window
    start = int(shard["offsets"][doc])
    window_index = start // N + 1  # first window starting inside this document
    offset = window_index * N
    element = source[window_index]
    np.testing.assert_array_equal(element["starts"], shard["starts"][offset : offset + N + 1])
    out = builder({k: v[None] for k, v in element.items()})
    lengths = out["patch_lengths"]
    check_patch_lengths(lengths, N)
    mask = start_mask_from_lengths(lengths, N + 1)[0]
    assert mask[0] and mask[1]  # re-split first patch of a window that starts mid-document
    np.testing.assert_array_equal(mask[2:], shard["starts"][offset + 2 : offset + N + 1])

    # A window that starts at a BOS and stays in its document: exactly the in-forward patcher with
    # include_next_token=True on this document's entropies (the sidecar bit of token N is H_{N-1} > θ).
    d = 0
    assert doc_lengths[d] > N + 1
    element = source[0]
    assert element["window"][0] == BOS_ID
    got = builder({k: v[None] for k, v in element.items()})["patch_lengths"]
    h = shard["entropies"][d][:N]
    expected = patch_lengths(element["window"][None, :N].astype(np.int32), mode="entropy", entropies=h[None],
                             threshold=THETA, include_next_token=True)  # fmt: skip
    np.testing.assert_array_equal(got[:, : expected.shape[1]], expected)


def test_entropy_virtual_next_token_uses_the_bit_of_token_n():
    builder = pipeline.BatchBuilder(seq_len=8, max_patches=6, rule=PatchingRule(mode="entropy", threshold=THETA))
    window = np.array([[40, 41, 42, 43, 44, 45, 46, 47, 48]], np.uint16)  # mid-document: no BOS
    starts = np.zeros((1, 9), bool)
    starts[0, [0, 5]] = True  # position 0 started a patch of 5 in its document
    for last, expected in ((False, [1, 4, 4, 0, 0, 0]), (True, [1, 4, 3, 1, 0, 0])):
        starts[0, 8] = last
        got = builder({"window": window, "starts": starts.copy()})["patch_lengths"]
        assert got.tolist() == [expected]


def test_entropy_max_patch_length_splits_after_the_forced_starts(data_dir):
    batch = batch_at_step(dataset(data_dir, make_config("entropy", max_patch_length=3, max_patches=N + 1)), 2)
    lengths = batch["patch_lengths"]
    check_patch_lengths(lengths, N)
    assert lengths.max() <= 3
    plain = batch_at_step(dataset(data_dir, make_config("entropy", max_patches=N + 1)), 2)["patch_lengths"]
    expected = split_long_patches(plain, 3)
    np.testing.assert_array_equal(lengths[:, : expected.shape[1]], expected)
    assert not lengths[:, expected.shape[1] :].any()


def _copy_data(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


def test_entropy_errors_name_the_file(data_dir, tmp_path):
    config = make_config("entropy")
    # Missing sidecar.
    missing = _copy_data(data_dir, tmp_path / "missing")
    (missing / f"train-00001.starts.{TAG}.bits").unlink()
    with pytest.raises(DataError, match=rf"train-00001\.starts\.{TAG}\.bits: missing"):
        dataset(missing, config)
    # Missing sidecar manifest.
    (missing / "sidecars.json").unlink()
    with pytest.raises(DataError, match=r"sidecars\.json: missing sidecar manifest"):
        dataset(missing, config)
    # A threshold no sidecar was computed with, and a tag of another threshold.
    with pytest.raises(DataError, match=r"sidecars\.json: no sidecar computed with threshold 1\.5"):
        dataset(data_dir, make_config("entropy", threshold=1.5))
    with pytest.raises(DataError, match=rf"sidecar tag '{TAG}' was computed with threshold 1\.33"):
        dataset(data_dir, make_config("entropy", threshold=1.5), sidecar_tag=TAG)
    with pytest.raises(DataError, match=r"no sidecar tag 'nope'"):
        dataset(data_dir, config, sidecar_tag="nope")
    # Sidecars computed from another version of the shard.
    stale = _copy_data(data_dir, tmp_path / "stale")
    sidecars = json.loads((stale / "sidecars.json").read_text())
    sidecars["shards"]["train-00002"]["tokens_sha256"] = "0" * 64
    (stale / "sidecars.json").write_text(json.dumps(sidecars))
    with pytest.raises(DataError, match=rf"train-00002\.starts\.{TAG}\.bits: computed from a \.tokens file"):
        dataset(stale, config)
    # A bits file whose content changed (same size).
    altered = _copy_data(data_dir, tmp_path / "altered")
    bits = bytearray((altered / f"train-00000.starts.{TAG}.bits").read_bytes())
    bits[10] ^= 0xFF
    (altered / f"train-00000.starts.{TAG}.bits").write_bytes(bytes(bits))
    with pytest.raises(DataError, match=rf"train-00000\.starts\.{TAG}\.bits: sha256 .*sidecars\.json"):
        dataset(altered, config)
    dataset(altered, config, verify="size")  # sizes still fine: content not hashed


RULES = {  # entropy rules besides the global threshold, each with its own sidecar (data/sidecar_rules.py)
    "monotonic": {"threshold": 0.5, "monotonicity": True},
    "combined": {"threshold": THETA, "threshold_add": 0.1},
    "combined_quirks": {"threshold": THETA, "threshold_add": 0.1, "reference_quirks": True},
    "topk": {"threshold": None, "patch_size": 4.5},
}


@pytest.fixture(scope="module")
def rule_data(data_dir, tmp_path_factory) -> pathlib.Path:
    """A copy of the data with the sidecars of every rule in RULES added, as bltjax.entropy adds them."""
    data = _copy_data(data_dir, tmp_path_factory.mktemp("rules") / "data")
    manifest = json.loads((data / "sidecars.json").read_text())
    for fields in RULES.values():
        rule = PatchingRule(mode="entropy", **fields)
        tag = rule_tag(rule)
        manifest.setdefault("rules", {})[tag] = {**rule_record(rule), "calibration": None}
        for name, record in manifest["shards"].items():
            tokens = np.fromfile(data / f"{name}.tokens", "<u2")
            entropies = np.fromfile(data / f"{name}.entropy.f16", "<f2")
            bits = np.packbits(start_mask(tokens, np.load(data / f"{name}.docs.npy"), entropies, rule)).tobytes()
            (data / f"{name}.starts.{tag}.bits").write_bytes(bits)
            record["starts_sha256"][tag] = hashlib.sha256(bits).hexdigest()
    (data / "sidecars.json").write_text(json.dumps(manifest))
    return data


@pytest.mark.parametrize("max_patch_length", [None, 3])
@pytest.mark.parametrize("name", sorted(RULES))
def test_every_entropy_rule_reads_its_own_sidecar(rule_data, truth, name, max_patch_length):
    """Monotonic, combined and top-k train like the global rule: each window gets the bits of its
    rule (the patcher on each document alone), 0 and 1 forced, then max_patch_length."""
    config = make_config("entropy", max_patches=N + 1, max_patch_length=max_patch_length, **RULES[name])
    rule = PatchingRule.from_config(config)
    source = pipeline.make_source(config, rule_data, "train")
    assert all(shard.starts_path.endswith(f".starts.{rule_tag(rule)}.bits") for shard in source.shards)
    builder = pipeline.BatchBuilder(seq_len=N, max_patches=N + 1, rule=rule)
    natural = PatchingRule.from_config(rule, max_patch_length=None)
    expected_bits = {
        shard: np.concatenate(
            [
                patch_start_mask(doc[None].astype(np.int32), natural, entropies=h[None], include_next_token=False)[0]
                for doc, h in zip(np.split(t["stream"], t["offsets"][1:-1]), t["entropies"], strict=True)
            ]
        )
        for shard, t in truth.items()
    }
    for index in range(0, len(source), 7):
        number, offset = source.locate(index)
        bits = expected_bits[source.shards[number].info.name][offset : offset + N + 1]
        element = source[index]
        np.testing.assert_array_equal(element["starts"], bits)
        mask = bits.copy()
        mask[:2] = True
        expected = lengths_from_start_mask(mask[None])
        if max_patch_length is not None:
            expected = split_long_patches(expected, max_patch_length)
        got = builder({k: v[None] for k, v in element.items()})["patch_lengths"]
        np.testing.assert_array_equal(got[:, : expected.shape[1]], expected)
        assert not got[:, expected.shape[1] :].any()
    batch = batch_at_step(dataset(rule_data, config), 3)
    check_patch_lengths(batch["patch_lengths"], N)
    global_rule = batch_at_step(dataset(rule_data, make_config("entropy", max_patches=N + 1)), 3)["patch_lengths"]
    assert not np.array_equal(batch["patch_lengths"], global_rule)


def test_an_entropy_rule_without_sidecar_names_the_folder_the_rule_and_the_command(data_dir):
    with pytest.raises(DataError) as error:
        dataset(data_dir, make_config("entropy", threshold=0.7, monotonicity=True))
    message = str(error.value)
    assert message.startswith(f"{data_dir / 'sidecars.json'}: no sidecar computed with the monotonic rule")
    assert f"(monotonicity=True, threshold 0.7) in {data_dir}; available: '{TAG}' (threshold {THETA!r})" in message
    assert f"python -m bltjax.entropy --data {data_dir} --entropy-model ENTROPY_MODEL --rule monotonic" in message
    named = r"top-k \(no threshold, patch_size 4\.5\).*--rule topk --patch-size 4\.5"
    with pytest.raises(DataError, match=named):
        dataset(data_dir, make_config("entropy", threshold=None, patch_size=4.5))
    named = r"combined rule .*reference_quirks=True.*--threshold-add 0\.1 --reference-quirks"
    with pytest.raises(DataError, match=named):
        dataset(data_dir, make_config("entropy", threshold_add=0.1, reference_quirks=True))


def test_shard_errors_name_the_file(data_dir, tmp_path):
    config = make_config("space")
    bad = _copy_data(data_dir, tmp_path / "bad")
    tokens = bytearray((bad / "train-00001.tokens").read_bytes())
    tokens[100] ^= 0x01  # same size, other content
    (bad / "train-00001.tokens").write_bytes(bytes(tokens))
    with pytest.raises(DataError, match=r"train-00001\.tokens: sha256 .*manifest\.json"):
        dataset(bad, config)
    # Lazy verification: construction passes, the first read of that shard raises.
    ds = dataset(bad, config, verify="lazy")
    with pytest.raises(DataError, match=r"train-00001\.tokens: sha256"):
        for step in range(40):
            batch_at_step(ds, step)
    (bad / "train-00001.tokens").write_bytes(bytes(tokens[:-6]))  # truncated
    with pytest.raises(DataError, match=r"train-00001\.tokens: \d+ bytes, expected \d+"):
        dataset(bad, config, verify="size")
    (bad / "train-00001.tokens").unlink()
    with pytest.raises(DataError, match=r"train-00001\.tokens: missing"):
        dataset(bad, config)
    with pytest.raises(DataError, match=r"manifest\.json: split 'validation' lists no shards"):
        make_dataset(config, data_dir, "validation", seed=0, process_index=0, process_count=1)
    with pytest.raises(DataError, match=r"manifest\.json: no split 'test'"):
        make_dataset(config, data_dir, "test", seed=0, process_index=0, process_count=1)
    with pytest.raises(DataError, match=r"manifest\.json: no manifest"):
        dataset(tmp_path / "nowhere", config)


# ---------------------------------------------------------------------------------------------
# Overflow policy


def test_overflow_merges_the_tail_and_masks_exactly_the_affected_targets(data_dir):
    max_patches = 8  # space patching of 64 bytes needs ~15 patches: every row overflows
    config = make_config("space", max_patches=max_patches)
    batch = batch_at_step(dataset(data_dir, config), 1)
    lengths, mask = batch["patch_lengths"], batch["loss_mask"]
    assert lengths.shape == (B, max_patches)
    check_patch_lengths(lengths, N)
    np.testing.assert_array_equal(lengths.sum(axis=1), N + 1)
    full = patch_lengths(batch["tokens"], mode="space", include_next_token=True)
    assert full.shape[1] > max_patches
    first_dropped = full[:, :max_patches].sum(axis=1)
    np.testing.assert_array_equal(mask.sum(axis=1), first_dropped - 1)
    # Every target left in the loss reads the same decoder patch (and its bytes the same encoder
    # patches) as under the untruncated patching: the truncation changes nothing it is trained on.
    dpid_cut = decoder_patch_ids_from_lengths(lengths, N)
    dpid_full = decoder_patch_ids_from_lengths(full, N)
    pid_cut, pid_full = patch_ids_from_lengths(lengths, N), patch_ids_from_lengths(full, N)
    for row in range(B):
        kept = mask[row]
        np.testing.assert_array_equal(dpid_cut[row][kept], dpid_full[row][kept])
        np.testing.assert_array_equal(pid_cut[row][kept], pid_full[row][kept])
        assert not np.array_equal(dpid_cut[row][~kept], dpid_full[row][~kept])
    with pytest.raises(DataError, match=r"more than config\.data\.max_patches=8"):
        batch_at_step(dataset(data_dir, config, overflow="error"), 1)


@settings(max_examples=60, deadline=None)
@given(
    seq_len=st.integers(2, 40),
    max_patches=st.integers(2, 12),
    max_patch_length=st.one_of(st.none(), st.integers(1, 6)),
    seed=st.integers(0, 2**31),
)
def test_any_start_mask_gives_a_valid_row_and_an_exact_loss_mask(seq_len, max_patches, max_patch_length, seed):
    rng = np.random.default_rng(seed)
    starts = rng.random((3, seq_len + 1)) < rng.uniform(0.05, 0.9)
    window = rng.integers(4, 260, size=(3, seq_len + 1)).astype(np.uint16)
    rule = PatchingRule(mode="entropy", threshold=THETA, max_patch_length=max_patch_length)
    builder = pipeline.BatchBuilder(seq_len, max_patches, rule)
    out = builder({"window": window, "starts": starts})
    lengths, mask = out["patch_lengths"], out["loss_mask"]
    assert lengths.shape == (3, max_patches)
    check_patch_lengths(lengths, seq_len)
    np.testing.assert_array_equal(lengths.sum(axis=1), seq_len + 1)
    full = pipeline.BatchBuilder(seq_len, seq_len + 1, rule)
    unlimited = full({"window": window, "starts": starts})["patch_lengths"]
    kept = mask
    np.testing.assert_array_equal(
        decoder_patch_ids_from_lengths(lengths, seq_len)[kept], decoder_patch_ids_from_lengths(unlimited, seq_len)[kept]
    )
    fits = np.count_nonzero(unlimited, axis=1) <= max_patches
    assert mask[fits].all()
    width = max(max_patches, seq_len + 1)
    pad = lambda x: np.pad(x, ((0, 0), (0, width - x.shape[1])))
    np.testing.assert_array_equal(pad(lengths)[fits], pad(unlimited)[fits])


# ---------------------------------------------------------------------------------------------
# batch = f(seed, step): processes, devices, interpreters, resumption


def test_process_slices_union_to_the_global_batch(data_dir):
    config = make_config("entropy")
    whole = dataset(data_dir, config)
    other_seed = batch_at_step(dataset(data_dir, config, seed=SEED + 1), 0)
    assert not np.array_equal(other_seed["tokens"], batch_at_step(whole, 0)["tokens"])
    for count in (2, 4, 8):
        parts = [dataset(data_dir, config, process_index=p, process_count=count) for p in range(count)]
        for step in (0, 7, 120):  # 120 * 8 rows is past the first epoch
            expected = batch_at_step(whole, step)
            for key, value in expected.items():
                stacked = np.concatenate([batch_at_step(part, step)[key] for part in parts])
                np.testing.assert_array_equal(stacked, value, err_msg=f"{key}, {count} processes, step {step}")
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        dataset(data_dir, config, process_index=0, process_count=3)


def test_each_epoch_is_a_permutation_of_all_windows(data_dir):
    source = pipeline.make_source(make_config("space"), data_dir, "train")
    rows = pipeline.grain.MapDataset.source(source).shuffle(seed=SEED).repeat()  # as make_dataset orders rows
    n = len(source)
    lookup = {source[i]["window"].tobytes(): i for i in range(n)}
    assert len(lookup) == n  # windows of text are distinct, so content identifies them
    order = [lookup[rows[i]["window"].tobytes()] for i in range(2 * n)]
    assert sorted(order[:n]) == list(range(n)) == sorted(order[n:])
    assert order[:n] != order[n:]  # each epoch is reshuffled


_FRESH_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np
    sys.path.insert(0, {tests!r})
    from test_pipeline import make_config
    from bltjax.data.pipeline import make_dataset, batch_at_step
    ds = make_dataset(make_config("entropy"), {data!r}, "train", seed={seed}, process_index=0, process_count=1)
    np.savez({out!r}, **{{f"{{k}}_{{s}}": v for s in (3, 250) for k, v in batch_at_step(ds, s).items()}})
    """
)


@pytest.mark.slow
def test_fresh_interpreter_gives_identical_batches(data_dir, tmp_path):
    out = tmp_path / "fresh.npz"
    script = _FRESH_SCRIPT.format(tests=str(REPO_ROOT / "tests"), data=str(data_dir), seed=SEED, out=str(out))
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=REPO_ROOT, timeout=120)
    fresh = np.load(out)
    ds = dataset(data_dir, make_config("entropy"))
    for step in (3, 250):
        for key, value in batch_at_step(ds, step).items():
            np.testing.assert_array_equal(fresh[f"{key}_{step}"], value)


def _mesh(n_devices: int):
    return jax.make_mesh((n_devices,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n_devices])


def test_resume_at_step_gives_the_same_global_batches_on_8_and_4_devices(data_dir):
    config = make_config("space")
    reference = make_iterator(dataset(data_dir, config))
    uninterrupted = [next(reference) for _ in range(6)]
    for n_devices in (8, 4):
        sharding = NamedSharding(_mesh(n_devices), P("data"))
        resumed = make_iterator(dataset(data_dir, config), start_step=4)  # a fresh run resuming at step 4
        for step in (4, 5):
            arrays = global_batch(next(resumed), sharding)
            for key, array in arrays.items():
                assert array.shape == uninterrupted[step][key].shape
                assert len(array.addressable_shards) == n_devices
                np.testing.assert_array_equal(np.asarray(array), uninterrupted[step][key])
                shard = array.addressable_shards[1]
                rows = B // n_devices
                np.testing.assert_array_equal(np.asarray(shard.data), uninterrupted[step][key][rows : 2 * rows])


def test_grain_iterator_state_round_trip(data_dir):
    config = make_config("entropy")
    iterator = make_iterator(dataset(data_dir, config))
    for _ in range(3):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))  # what a checkpoint stores
    expected = [next(iterator) for _ in range(2)]
    restored = make_iterator(dataset(data_dir, config))
    restored.set_state(state)
    for batch in expected:
        got = next(restored)
        for key in batch:
            np.testing.assert_array_equal(got[key], batch[key])
    np.testing.assert_array_equal(expected[0]["tokens"], batch_at_step(dataset(data_dir, config), 3)["tokens"])


def test_grain_iterator_state_saves_and_restores_through_orbax(data_dir, tmp_path):
    """The data position goes into the same orbax step as the train state (grain's handler)."""
    import grain
    import orbax.checkpoint as ocp

    config = make_config("space")
    iterator = make_iterator(dataset(data_dir, config))
    for _ in range(2):
        next(iterator)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
        manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
    expected = next(iterator)
    fresh = make_iterator(dataset(data_dir, config))
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
        manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    got = next(fresh)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


_PROCESS_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, jax
    sys.path.insert(0, {tests!r})
    pid, port = int(sys.argv[1]), sys.argv[2]
    jax.config.update("jax_num_cpu_devices", 2)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{{port}}", num_processes=2, process_id=pid)
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from jax.experimental import multihost_utils
    from test_pipeline import make_config
    from bltjax.data.pipeline import make_dataset, batch_at_step, global_batch
    ds = make_dataset(make_config("space"), {data!r}, "train", seed={seed})  # jax's process index and count
    mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))
    arrays = global_batch(batch_at_step(ds, 9), NamedSharding(mesh, P("data")))
    gathered = multihost_utils.process_allgather(arrays, tiled=True)
    if pid == 0:
        np.savez({out!r}, **{{k: np.asarray(v) for k, v in gathered.items()}})
    jax.distributed.shutdown()
    """
)


@pytest.mark.slow
def test_two_real_processes_build_the_one_process_global_batch(data_dir, tmp_path):
    portpicker = pytest.importorskip("portpicker")
    port = str(portpicker.pick_unused_port())
    out = tmp_path / "two.npz"
    script = _PROCESS_SCRIPT.format(tests=str(REPO_ROOT / "tests"), data=str(data_dir), seed=SEED, out=str(out))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(p), port], env=env, cwd=REPO_ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for p in range(2)
    ]  # fmt: skip
    logs = [proc.communicate(timeout=120)[0].decode(errors="replace") for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), "\n".join(logs)[-3000:]
    got = np.load(out)
    expected = batch_at_step(dataset(data_dir, make_config("space")), 9)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value)


def test_reads_what_prepare_writes(tmp_path):
    corpus = tmp_path / "paragraphs.jsonl"  # a .txt file is one document; JSON lines are many
    corpus.write_text("".join(json.dumps({"text": p}) + "\n" for p in _documents()))
    out = tmp_path / "prepared"
    prepare.prepare([corpus], out, shard_bytes=8192, val_fraction=0.2, progress=False)
    manifest = shard_format.load_manifest(out)
    assert len(manifest.shards("train")) > 1
    for split in ("train", "validation"):
        ds = make_dataset(make_config("space"), out, split, seed=0, process_index=0, process_count=1)
        batch = batch_at_step(ds, 2)
        check_patch_lengths(batch["patch_lengths"], N)
        assert batch["tokens"].shape == (B, N)
        assert (batch["tokens"] == BOS_ID).any()  # rows cross documents
