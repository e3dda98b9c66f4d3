"""Packed rows (bltjax/data/packing.py, config.data.rows="packed") and the padding metrics
(bltjax/training/padding.py): per-document patching of the shard, the row cut against a hand
count, every target once, each row's patching equal to its documents' except the first patch,
batch = f(seed, step) and resume, the padded-column fraction, and the FLOPs spent on the padded
shapes against a hand count."""

from __future__ import annotations

import io
import pathlib

import numpy as np
import pytest
import test_pipeline as tp
import test_sidecar_modes as sidecar_modes

from bltjax.config import ConfigError, base_blt_config, base_byte_lm_config, validate
from bltjax.data import packing, pipeline, sidecar_rules, sidecars
from bltjax.data.pipeline import DataError, batch_at_step, make_dataset, make_iterator
from bltjax.patching import PatchingRule, patch_start_mask
from bltjax.tokenizer import BOE_ID
from bltjax.training import padding

N, K = tp.N, 16
# test_sidecar_modes' folder with the sidecars of every entropy rule, and the model it needs.
rule_corpus, entropy_model = sidecar_modes.corpus, sidecar_modes.entropy_model


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[pathlib.Path, dict]:
    root = tmp_path_factory.mktemp("shards")
    return root, tp.write_data(root)


@pytest.fixture(scope="module")
def data_dir(written) -> pathlib.Path:
    return written[0]


def packed_config(mode: str, max_patches: int = K, **patching):
    config = tp.make_config(mode, max_patches=max_patches, **patching)
    config.data.rows = "packed"
    return config


def packed_source(data_dir, config) -> packing.PackedSource:
    rule = PatchingRule.from_config(config.patching)
    return packing.PackedSource(pipeline.make_source(config, data_dir, "train"), int(config.data.max_patches), rule)


MODES = [("static", {}), ("space", {}), ("byte", {}), ("entropy", {}), ("space", {"max_patch_length": 3})]


@pytest.mark.parametrize("mode,extra", MODES)
def test_shard_mask_is_each_documents_own_patching(written, mode, extra):
    root, truth = written
    rule = PatchingRule.from_config(tp.make_config(mode, **extra).patching)
    for shard in truth.values():
        stream, offsets = shard["stream"], shard["offsets"]
        mask = packing.shard_start_mask(stream, rule, shard["starts"] if mode == "entropy" else None)
        for first, stop in zip(offsets[:-1], offsets[1:], strict=True):
            doc = stream[first:stop].astype(np.int32)[None]
            if mode == "entropy":
                expected = shard["starts"][first:stop]  # the sidecar holds each document's own bits
            else:
                expected = patch_start_mask(doc, rule, include_next_token=False)[0]
            np.testing.assert_array_equal(mask[first:stop], expected, err_msg=f"{mode} document at {first}")


def test_row_cut_by_hand():
    # Patches start at 0, 1, 4, 8, 12, 16 of a 20-token shard. K = 4 columns: row 0 holds
    # [0], [1..3], [4..7], [8..11] (the last one ends on the row's final target, 11); row 1
    # starts on that token: [11], [12..15], [16..19], stopping at the shard's last token.
    starts = [0, 1, 4, 8, 12, 16]
    assert packing.cut_rows(starts, 20, 4, 100).tolist() == [0, 11, 19]
    # A 6-byte cap binds first: rows of 6 inputs, the last one shorter (19 - 18 = 1).
    assert packing.cut_rows(starts, 20, 4, 6).tolist() == [0, 6, 12, 18, 19]
    # K = 2: one patch after the 1-byte first patch, cut before the next start.
    assert packing.cut_rows(starts, 20, 2, 100).tolist() == [0, 3, 7, 11, 15, 19]


@pytest.mark.parametrize("mode,extra", MODES)
def check_rows(source: packing.PackedSource, streams: dict, masks: dict, seq_len: int) -> tuple[int, int]:
    """Every row against its shard: tokens, BOE padding, lengths that follow the shard's patch
    starts (first patch forced to 1 byte), and every token but the first a target exactly once.
    Returns (rows using every column, rows stopped by the byte cap)."""
    kmax = source.max_patches
    full_rows = cap_rows = 0
    for number, shard in enumerate(source.windows.shards):
        stream, mask = streams[shard.info.name], masks[shard.info.name]
        covered = np.zeros(stream.size, dtype=int)
        for index in (i for i in range(len(source)) if source.locate(i)[0] == number):
            _, first, n = source.locate(index)
            element = source[index]
            window, lengths = element["window"].astype(np.int32), element["lengths"]
            assert int(element["row_bytes"]) == n and 1 <= n <= seq_len
            np.testing.assert_array_equal(window[: n + 1], stream[first : first + n + 1])
            assert (window[n + 1 :] == BOE_ID).all()
            assert lengths.sum() == seq_len + 1 and lengths[0] == 1 and np.count_nonzero(lengths) <= kmax
            used = lengths[lengths > 0].copy()
            used[-1] -= seq_len - n  # the padding joined the last patch
            row_mask = np.zeros(n + 1, dtype=bool)
            row_mask[np.cumsum(used)[:-1]] = True
            row_mask[0] = True
            expected = mask[first : first + n + 1].copy()
            expected[:2] = True  # first-patch rule
            np.testing.assert_array_equal(row_mask, expected)
            covered[first + 1 : first + n + 1] += 1
            full_rows += np.count_nonzero(lengths) == kmax
            cap_rows += n == seq_len
            # K columns, or the byte cap, or the shard's end stopped the row.
            assert np.count_nonzero(lengths) == kmax or n == seq_len or first + n == stream.size - 1
        assert (covered[1:] == 1).all() and covered[0] == 0  # every token but the first: one target
    return full_rows, cap_rows


@pytest.mark.parametrize("mode,extra", MODES)
def test_rows_cover_every_target_once_with_the_documents_patching(data_dir, written, mode, extra):
    truth = written[1]
    config = packed_config(mode, max_patches=N + 1 if mode == "byte" else K, **extra)
    source = packed_source(data_dir, config)
    rule = PatchingRule.from_config(config.patching)
    streams = {name: shard["stream"] for name, shard in truth.items()}
    masks = {
        name: packing.shard_start_mask(shard["stream"], rule, shard["starts"] if mode == "entropy" else None)
        for name, shard in truth.items()
    }
    full_rows, cap_rows = check_rows(source, streams, masks, N)
    assert full_rows > 0 and (cap_rows > 0 or mode == "static" or extra)  # short patches never reach the cap


@pytest.mark.parametrize("name", ["monotonic", "combined", "topk"])
def test_every_entropy_rule_packs_from_its_own_sidecar(rule_corpus, name):
    """The rules of test_sidecar_modes' corpus (a random entropy model, every rule's bits): packed
    rows follow the bits of the configured rule, with max_patch_length applied on top."""
    data, rules = rule_corpus
    for max_patch_length in (None, 3):
        rule = PatchingRule.from_config(rules[name], max_patch_length=max_patch_length)
        config = sidecar_modes._rule_config(data, rule)
        config.data.rows, config.data.max_patches = "packed", 24
        source = packing.PackedSource(pipeline.make_source(config, data, "train"), 24, rule)
        streams, masks = {}, {}
        for shard in source.windows.shards:
            tokens, _ = sidecars.read_shard(data, shard.info)
            bits = sidecars.read_starts(data, shard.info.name, sidecar_rules.rule_tag(rule), shard.n_tokens)
            streams[shard.info.name] = np.asarray(tokens)
            masks[shard.info.name] = packing.shard_start_mask(np.asarray(tokens), rule, np.asarray(bits, bool))
        full_rows, _ = check_rows(source, streams, masks, int(config.data.seq_len))
        assert full_rows > 0


def test_batches_mask_padding_and_are_a_function_of_seed_and_step(data_dir):
    config = packed_config("space")
    first = make_dataset(config, data_dir, "train", seed=7, process_index=0, process_count=1)
    again = make_dataset(config, data_dir, "train", seed=7, process_index=0, process_count=1)
    other = make_dataset(config, data_dir, "train", seed=8, process_index=0, process_count=1)
    for step in (0, 3, 40):
        a, b = batch_at_step(first, step), batch_at_step(again, step)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        expected = (a["targets"] != BOE_ID) & (np.arange(N)[None] < a["row_bytes"][:, None])
        np.testing.assert_array_equal(a["loss_mask"], expected)
        assert a["patch_lengths"].shape == (tp.B, K) and (a["patch_lengths"].sum(1) == N + 1).all()
    assert not np.array_equal(batch_at_step(first, 0)["tokens"], batch_at_step(other, 0)["tokens"])
    resumed = make_iterator(first, start_step=5)
    for step in (5, 6):
        batch = next(resumed)
        assert all(np.array_equal(batch[k], batch_at_step(again, step)[k]) for k in batch)


def test_process_slices_union_to_the_global_batch(data_dir):
    config = packed_config("entropy")
    whole = batch_at_step(make_dataset(config, data_dir, "train", seed=3, process_index=0, process_count=1), 2)
    parts = [
        batch_at_step(make_dataset(config, data_dir, "train", seed=3, process_index=p, process_count=2), 2)
        for p in range(2)
    ]
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_packed_rows_pad_fewer_columns_than_windows(data_dir):
    # Windows need room for their most fragmented row (40 columns for 64 bytes, as in
    # test_pipeline); packed rows take max_patches near N / mean patch (about 5 bytes here) and
    # fill them unless the byte cap binds first.
    windows = tp.make_config("space", max_patches=40)
    packed = packed_config("space", max_patches=12)
    fractions = {}
    for name, config in (("windows", windows), ("packed", packed)):
        data = make_dataset(config, data_dir, "train", seed=0, process_index=0, process_count=1)
        meter = padding.PaddingMeter(config)
        for step in range(20):
            meter.add(padding.batch_padding(batch_at_step(data, step)))
        fractions[name] = meter.values(meter.totals, 20)
    assert fractions["packed"]["padded_patch_fraction"] < fractions["windows"]["padded_patch_fraction"]
    assert fractions["windows"]["padded_byte_fraction"] == 0.0 < fractions["packed"]["padded_byte_fraction"]


def test_config_field_defaults_to_windows_and_is_checked():
    config = base_blt_config()
    assert config.data.rows == "windows"
    config.data.rows = "rows"
    with pytest.raises(ConfigError, match=r"config\.data\.rows"):
        validate(config)
    byte_lm = base_byte_lm_config()
    byte_lm.data.rows = "packed"
    with pytest.raises(ConfigError, match=r"config\.data\.rows"):
        validate(byte_lm)
    static = base_blt_config()
    static.patching.mode, static.patching.patch_size, static.patching.threshold = "static", 4, None
    static.data.seq_len, static.data.max_patches = 64, 8  # too few columns for 64-byte windows, fine packed
    with pytest.raises(ConfigError, match=r"config\.data\.max_patches"):
        validate(static)
    static.data.rows = "packed"
    validate(static)


def test_byte_lm_cannot_pack(data_dir):
    config = base_byte_lm_config()
    config.data.seq_len, config.data.batch_size = N, tp.B
    with config.ignore_type():
        config.data.rows = "packed"
    with pytest.raises(DataError, match="rows='packed'"):
        make_dataset(config, data_dir, "train", seed=0, process_index=0, process_count=1)


def test_padding_stats_count_empty_columns_and_padded_bytes():
    batch = {
        "tokens": np.zeros((2, 8), np.int32),
        "patch_lengths": np.array([[1, 4, 4, 0], [1, 8, 0, 0]], np.int32),
        "row_bytes": np.array([8, 5], np.int32),
    }
    stats = padding.batch_padding(batch)
    assert stats == {"pad_columns": 3.0, "all_columns": 8.0, "pad_positions": 3.0, "all_positions": 16.0}
    windows = padding.batch_padding({k: v for k, v in batch.items() if k != "row_bytes"})
    assert windows["pad_positions"] == 0.0
    # Throughput and patch statistics leave the BOE padding of each row's last patch out.
    batch["patch_lengths"] = np.array([[1, 4, 4, 0], [1, 3, 5, 0]], np.int32)  # row 1: 5 real inputs + 3 BOE
    assert padding.real_patch_lengths(batch).tolist() == [[1, 4, 4, 0], [1, 3, 2, 0]]
    assert padding.real_bytes(batch) == 13.0
    window_rows = {"tokens": batch["tokens"], "patch_lengths": batch["patch_lengths"]}
    assert padding.real_bytes(window_rows) == 16.0
    assert padding.real_patch_lengths(window_rows) is window_rows["patch_lengths"]


def test_flops_spent_per_step_equal_a_hand_count():
    config = base_blt_config()
    config.data.seq_len, config.data.max_patches, config.data.batch_size = 64, 16, 4
    record_dim = lambda stack: config.model[stack].dim  # noqa: E731
    enc, lat, dec = (config.model[s] for s in ("encoder", "latent", "decoder"))
    k = config.model.cross_attn_k
    n, p = 64, 16
    n_p = n / p

    def transformer(h, layers, context, vocab):  # 24 l h^2 + 2 l h (m + 1) + 2 h V
        return 24 * layers * h * h + 2 * layers * h * (context + 1) + 2 * h * vocab

    def cross(h, layers, context, kv):  # Attention + QKVO(r)
        return 2 * layers * h * (context + 1) + (2 * kv + 2) * 2 * layers * h * h

    win = lambda stack, m: m if stack.window is None else min(stack.window, m)  # noqa: E731
    cross_enc = enc.n_layers if config.model.cross_attn_all_layers_encoder else 1
    cross_dec = dec.n_layers if config.model.cross_attn_all_layers_decoder else 1
    forward = (
        p * transformer(lat.dim, lat.n_layers, win(lat, p), 0)  # P columns, P-column attention
        + n * transformer(enc.dim, enc.n_layers, win(enc, n), 0)
        + n * transformer(dec.dim, dec.n_layers, win(dec, n), 256)
        + k * p * cross(record_dim("encoder"), cross_enc, n_p, n_p / k)  # k slots per column
        + n * cross(dec.dim, cross_dec, k, k / n_p)
    )
    expected = 3 * forward * config.data.batch_size
    assert padding.spent_flops_per_step(config) == pytest.approx(expected, rel=1e-12)
    meter = padding.PaddingMeter(config)
    assert meter.values({}, 10)["flops_spent_total"] == pytest.approx(10 * expected, rel=1e-12)


def test_meter_continues_from_a_checkpoint_or_recounts(data_dir):
    config = packed_config("space")
    data = make_dataset(config, data_dir, "train", seed=0, process_index=0, process_count=1)
    straight = padding.PaddingMeter(config)
    for step in range(6):
        straight.add(padding.batch_padding(batch_at_step(data, step)))
    saved = padding.PaddingMeter(config)
    saved.restore({padding.META_KEY: straight.state()}, 6, lambda s: batch_at_step(data, s))
    recounted = padding.PaddingMeter(config)
    recounted.restore({"step": 6}, 6, lambda s: batch_at_step(data, s))  # a checkpoint from before the field
    assert saved.totals == straight.totals == recounted.totals


@pytest.mark.slow
def test_training_on_packed_rows_logs_padding_and_resumes_its_totals(corpus_data, tmp_path):
    # The tiny BLT on packed rows, 6 steps straight and 3 + 3 with a relaunch: the same losses,
    # and the cumulative padding and FLOPs continue from the checkpoint's metadata.
    from test_trainer import tiny_config

    from bltjax.training.metrics import read_jsonl
    from bltjax.training.trainer import train

    def run(workdir, steps):
        config = tiny_config(corpus_data, **{"train.steps": steps, "train.checkpoint_every": 3})
        config.data.rows, config.data.max_patches = "packed", 32
        train(config, workdir, console=io.StringIO())
        return {r["step"]: r for r in read_jsonl(workdir / "metrics.jsonl") if r["split"] == "train"}

    straight = run(tmp_path / "straight", 6)
    run(tmp_path / "resumed", 3)
    resumed = run(tmp_path / "resumed", 6)
    assert sorted(straight) == sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        for key in ("loss", "padded_patch_fraction", "padded_byte_fraction", "padded_patch_fraction_total",
                    "padded_byte_fraction_total", "flops_spent_per_step", "flops_spent_total"):  # fmt: skip
            assert resumed[step][key] == straight[step][key], (step, key)
    assert 0 < straight[6]["padded_byte_fraction_total"] < 1
    assert straight[6]["flops_spent_total"] == 6 * straight[1]["flops_spent_per_step"]
