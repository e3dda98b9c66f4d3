"""Every entropy patching rule through the start-bit sidecars (bltjax/data/sidecar_rules.py), and
the entropy model's context reset at newlines (docs/architecture.md §2.5).

A random tiny entropy model computes the entropies of a small corpus with newlines once; every
rule's bits are then added from the stored entropies (no model run) and compared, document by
document, with the offline patcher. The slow tests train and evaluate a tiny BLT with monotonic
and top-k patching read from those sidecars.
"""

from __future__ import annotations

import io
import json
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bltjax import checkpoints
from bltjax.config import load_config
from bltjax.data import entropy as E
from bltjax.data import pipeline, prepare
from bltjax.data import sidecar_rules as R
from bltjax.data import sidecars as S
from bltjax.models.byte_lm import next_byte_entropy
from bltjax.models.factory import build_model, example_inputs
from bltjax.patching import (
    PatchingError,
    PatchingRule,
    lengths_from_start_mask,
    patch_lengths,
    split_long_patches,
)
from bltjax.patching.incremental import IncrementalRule
from bltjax.tokenizer import encode

REPO = pathlib.Path(__file__).resolve().parents[1]
CORPUS = REPO / "bltjax" / "data" / "corpus" / "jargon_file_4.4.7_appendix_a.txt"
ENTROPY_TINY = f"{REPO / 'experiments' / 'entropy_model.py'}:tiny"
BLT_TINY = str(REPO / "experiments" / "blt_tiny.py")
NEWLINE = R.NEWLINE_ID


@pytest.fixture(scope="module")
def entropy_model(tmp_path_factory):
    """(model, params, folder) of a random tiny entropy model, output head scaled so entropies spread."""
    config = load_config(ENTROPY_TINY)
    model = build_model(config)
    boxed = jax.jit(lambda: model.init(jax.random.key(0), *example_inputs(config))["params"])()
    params = jax.tree.map(np.asarray, nn.meta.unbox(boxed))
    params["output"]["kernel"] = params["output"]["kernel"] * 8
    folder = checkpoints.save_model(tmp_path_factory.mktemp("models") / "entropy", config, params)
    return model, params, folder


def _thresholds(entropies: np.ndarray) -> dict[str, float]:
    """Thresholds that give patches of a few bytes on these entropies (float16 values, exact)."""
    h = entropies.astype(np.float32)
    rise = np.diff(h)
    return {
        "global": float(np.quantile(h, 0.7)),
        "monotonic": float(np.quantile(rise, 0.75)),
        "combined": float(np.quantile(h, 0.5)),
        "combined_add": float(np.quantile(rise, 0.5)),
    }


@pytest.fixture(scope="module")
def corpus(entropy_model, tmp_path_factory):
    """A prepared folder of paragraphs of the bundled text (with their newlines), with the sidecars
    of every rule; returns (folder, {name: PatchingRule})."""
    root = tmp_path_factory.mktemp("modes")
    text = CORPUS.read_text(encoding="utf-8")[:24000]
    source = root / "docs.jsonl"
    paragraphs = [text[i : i + 700] for i in range(0, len(text), 700)]
    source.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    data = root / "data"
    prepare.prepare([source], data, shard_bytes=8000, val_fraction=0.1, progress=False)
    E.run(data, entropy_model[2], log=io.StringIO())  # entropies only
    shard = S.read_data_manifest(data)[0]
    values = _thresholds(np.asarray(S.read_entropies(data, shard.name)))
    rules = {
        "global": PatchingRule(mode="entropy", threshold=values["global"]),
        "monotonic": PatchingRule(mode="entropy", threshold=values["monotonic"], monotonicity=True),
        "combined": PatchingRule(mode="entropy", threshold=values["combined"], threshold_add=values["combined_add"]),
        "combined_quirks": PatchingRule(
            mode="entropy", threshold=values["combined"], threshold_add=values["combined_add"], reference_quirks=True
        ),
        "topk": PatchingRule(mode="entropy", patch_size=4.5),
    }
    for rule in rules.values():
        summary = E.run(data, entropy_model[2], rule=rule, log=io.StringIO())
        assert summary.computed == ()  # the entropies were reused: only bits were added
    return data, rules


def _documents(data: pathlib.Path, tag: str):
    """(tokens, float16 entropies, stored bits) of every document of every shard."""
    for shard in S.read_data_manifest(data):
        tokens, offsets = S.read_shard(data, shard)
        entropies = np.asarray(S.read_entropies(data, shard.name))
        bits = S.read_starts(data, shard.name, tag, shard.tokens)
        for lo, hi in zip(offsets[:-1], offsets[1:], strict=True):
            yield np.asarray(tokens[lo:hi], np.int32), entropies[lo:hi], bits[lo:hi]


@pytest.mark.parametrize("max_patch_length", [None, 3])
@pytest.mark.parametrize("name", ["global", "monotonic", "combined", "combined_quirks", "topk"])
def test_sidecar_bits_are_the_patchers_lengths_on_every_document(corpus, name, max_patch_length):
    """The stored bits of each rule, as lengths (split by max_patch_length, as the pipeline does
    at batch time), equal `patch_lengths` of the document alone under the rule."""
    data, rules = corpus
    rule = PatchingRule.from_config(rules[name], max_patch_length=max_patch_length)
    tag = R.rule_tag(rule)
    listed = R.listed_rules(json.loads((data / S.SIDECARS_FILE).read_text()))
    assert tag in listed and R.rule_tag(R.rule_of_record(listed[tag], tag)) == tag
    checked = 0
    for tokens, entropies, bits in _documents(data, tag):
        expected = patch_lengths(tokens[None], rule, entropies=entropies[None], include_next_token=False)
        stored = lengths_from_start_mask(bits[None])
        if max_patch_length is not None:
            stored = split_long_patches(stored, max_patch_length)
        np.testing.assert_array_equal(stored, expected)
        checked += 1
    assert checked >= 30


def test_rules_differ_and_tags_name_them(corpus):
    """Each rule has its own tag and its own bits (the comparison above is not vacuous)."""
    data, rules = corpus
    tags = {name: R.rule_tag(rule) for name, rule in rules.items()}
    assert tags["monotonic"].startswith("m") and tags["topk"] == "k4.5"
    assert tags["combined_quirks"].startswith("cq") and tags["global"] == S.threshold_tag(rules["global"].threshold)
    shard = S.read_data_manifest(data)[0]
    masks = {name: S.read_starts(data, shard.name, tag, shard.tokens) for name, tag in tags.items()}
    assert len({mask.tobytes() for mask in masks.values()}) == len(masks)
    sizes = {name: mask.size / mask.sum() for name, mask in masks.items()}
    assert all(2.0 < size < 8.0 for size in sizes.values()), sizes


def test_old_global_records_and_new_rules_share_one_manifest(corpus):
    """Global rules stay under `thresholds` (old readers, old folders); the others go under `rules`."""
    data, rules = corpus
    manifest = json.loads((data / S.SIDECARS_FILE).read_text())
    assert R.rule_tag(rules["global"]) in manifest["thresholds"]
    assert set(manifest["rules"]) == {R.rule_tag(r) for n, r in rules.items() if n != "global"}
    for shard in manifest["shards"].values():
        assert set(shard["starts_sha256"]) == {R.rule_tag(r) for r in rules.values()}


def test_top_k_per_document_keeps_floor_n_over_s_patches(corpus):
    data, rules = corpus
    for tokens, _, bits in _documents(data, R.rule_tag(rules["topk"])):
        assert bits.sum() == max(math.floor(tokens.size / 4.5), min(tokens.size, 2))


def _rule_config(data: pathlib.Path, rule: PatchingRule, steps: int = 3):
    config = load_config(BLT_TINY)
    config.data.path = str(data)
    config.data.batch_size = 8
    config.data.max_patches = 64
    config.train.steps = steps
    config.train.log_every = 1
    config.train.eval_every = 0
    config.train.checkpoint_every = steps
    config.optimizer.warmup_steps = 1
    fields = ("mode", "threshold", "threshold_add", "monotonicity", "patch_size", "max_patch_length")
    for key in (*fields, "entropy_reset_on_newline"):
        config.patching[key] = getattr(rule, key)
    if rule.reference_quirks:
        config.patching.reference_quirks = True
    return config


def test_pipeline_accepts_every_rule_and_reads_its_bits(corpus):
    """A batch of each rule has the lengths of that rule's bits for its windows (0 and 1 forced)."""
    data, rules = corpus
    for name, rule in rules.items():
        config = _rule_config(data, rule)
        source = pipeline.make_source(config, data, "train")
        assert all(shard.starts_path.endswith(f".starts.{R.rule_tag(rule)}.bits") for shard in source.shards), name
        batch = pipeline.make_dataset(config, data, "train", seed=0, process_index=0, process_count=1)[0]
        assert batch["patch_lengths"].shape == (8, 64)
        assert np.all(batch["patch_lengths"].sum(axis=1) == config.data.seq_len + 1)


def test_a_rule_without_sidecar_names_the_folder_the_rule_and_the_command(corpus):
    data, rules = corpus
    missing = PatchingRule(mode="entropy", threshold=rules["monotonic"].threshold + 0.5, monotonicity=True)
    with pytest.raises(pipeline.DataError) as error:
        pipeline.make_source(_rule_config(data, missing), data, "train")
    message = str(error.value)
    assert f"{data / 'sidecars.json'}: no sidecar computed with the monotonic rule" in message
    assert f"python -m bltjax.entropy --data {data} --entropy-model " in message
    assert f"--rule monotonic --threshold {missing.threshold!r}" in message
    named = r"top-k \(no threshold, patch_size 6\.0\).*--rule topk --patch-size 6"
    with pytest.raises(pipeline.DataError, match=named):
        pipeline.make_source(_rule_config(data, PatchingRule(mode="entropy", patch_size=6)), data, "train")


def test_monotonic_threshold_is_calibrated_on_train(corpus, entropy_model, tmp_path):
    """--rule monotonic --target-patch-size: θ_r chosen on the train split, its bits added, no model run."""
    data, _ = corpus
    copy = tmp_path / "data"
    copy.mkdir()
    for file in data.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    summary = E.run(copy, entropy_model[2], target_patch_size=5.0, target_kind="monotonic", log=io.StringIO())
    assert summary.computed == () and summary.rule["kind"] == "monotonic" and summary.tag.startswith("m")
    calibration = json.loads((copy / S.SIDECARS_FILE).read_text())["rules"][summary.tag]["calibration"]
    assert calibration["kind"] == "monotonic" and calibration["mean_tokens_per_patch"] == pytest.approx(5.0, rel=0.05)
    rule = PatchingRule(mode="entropy", threshold=summary.threshold, monotonicity=True)
    assert R.rule_tag(rule) == summary.tag
    tokens = patches = 0
    for shard in S.read_data_manifest(copy):
        if shard.split == "train":
            tokens += shard.tokens
            patches += int(S.read_starts(copy, shard.name, summary.tag, shard.tokens).sum())
    assert tokens / patches == pytest.approx(calibration["mean_tokens_per_patch"])


# --- the newline reset ------------------------------------------------------------------------------


def _model_entropies(model, params, tokens: np.ndarray) -> np.ndarray:
    """float32 entropies of the model on `tokens` alone, one forward pass."""
    logits = jax.jit(lambda p, t: model.apply({"params": p}, t))(params, jnp.asarray(tokens[None], jnp.int32))
    return np.asarray(next_byte_entropy(logits))[0]


def test_entropies_after_a_newline_equal_the_suffix_run_alone(entropy_model):
    """With the reset, H_t after every newline equals the entropies of the text after that newline
    run alone through the entropy model (float32), and the reset pass of the suffix as a document."""
    model, params, _ = entropy_model
    lines = ["first line of text", "", "second, after an empty line", "third line without end"]
    document = np.concatenate([[1], encode("\n".join(lines))[1:-1], [2]]).astype(np.int64)
    offsets = np.array([0, document.size])
    reset = E.compute_entropies(model, params, document, offsets, context=128, reset_on_newline=True, dtype=np.float32)
    plain = E.compute_entropies(model, params, document, offsets, context=128, dtype=np.float32)
    newlines = np.flatnonzero(document == NEWLINE)
    assert newlines.size == 3
    np.testing.assert_allclose(reset[: newlines[0] + 1], plain[: newlines[0] + 1], rtol=1e-5, atol=1e-5)
    for j in newlines:
        suffix = document[j + 1 :]
        line_end = np.flatnonzero(suffix == NEWLINE)
        stop = line_end[0] + 1 if line_end.size else suffix.size
        alone = _model_entropies(model, params, suffix[:stop])
        np.testing.assert_allclose(reset[j + 1 : j + 1 + stop], alone, rtol=1e-5, atol=1e-5)
        again = E.compute_entropies(
            model, params, suffix, np.array([0, suffix.size]), context=128, reset_on_newline=True, dtype=np.float32
        )
        np.testing.assert_allclose(reset[j + 1 :], again, rtol=1e-5, atol=1e-5)
    assert not np.allclose(reset[newlines[0] + 1 :], plain[newlines[0] + 1 :], atol=1e-3)  # the reset did something


def test_reset_is_recorded_and_a_mismatch_is_refused(corpus, entropy_model, tmp_path):
    data, rules = corpus
    copy = tmp_path / "data"
    copy.mkdir()
    for file in data.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    summary = E.run(copy, entropy_model[2], rule=rules["topk"], reset_on_newline=True, log=io.StringIO())
    assert len(summary.computed) == len(S.read_data_manifest(copy))  # toggling the reset recomputes all
    manifest = json.loads((copy / S.SIDECARS_FILE).read_text())
    assert manifest["entropy_model"]["reset_on_newline"] is True
    assert "reset_on_newline" not in json.loads((data / S.SIDECARS_FILE).read_text())["entropy_model"]
    without = _rule_config(copy, rules["topk"])
    reason = r"computed with the newline reset, but config.patching.entropy_reset_on_newline is False; recompute"
    with pytest.raises(pipeline.DataError, match=reason):
        pipeline.make_source(without, copy, "train")
    with_reset = _rule_config(copy, PatchingRule.from_config(rules["topk"], entropy_reset_on_newline=True))
    pipeline.make_source(with_reset, copy, "train")
    with pytest.raises(pipeline.DataError, match=r"computed without the newline reset"):
        pipeline.make_source(with_reset, data, "train")
    # The reset entropies are those of the lines run alone, stored as float16.
    shard = S.read_data_manifest(copy)[0]
    tokens, offsets = S.read_shard(copy, shard)
    stored = np.asarray(S.read_entropies(copy, shard.name))
    first = np.asarray(tokens[offsets[0] : offsets[1]], np.int64)
    cut = int(np.flatnonzero(first == NEWLINE)[0]) + 1
    second = np.flatnonzero(first[cut:] == NEWLINE)
    stop = cut + (int(second[0]) + 1 if second.size else first.size - cut)
    alone = _model_entropies(entropy_model[0], entropy_model[1], first[cut:stop])
    np.testing.assert_allclose(stored[cut:stop].astype(np.float32), alone, rtol=2e-3, atol=2e-3)


def test_other_modes_refuse_the_reset_field():
    with pytest.raises(PatchingError, match=r"patching\.entropy_reset_on_newline: expected False when"):
        PatchingRule(mode="space", entropy_reset_on_newline=True)


def test_generation_resets_the_entropy_context_like_the_sidecars(fixtures_dir):
    """Generation with the reset: the entropy model's segmented forward (a segment ends at each
    newline) gives the entropy pass's values, and the cached decoder (prefill + one step per
    byte) patches exactly as the full forward and the patcher on those entropies."""
    from bltjax.convert import hf
    from bltjax.inference.generation import decode, full_forward, teacher_forced

    path = fixtures_dir / "hf_blt_tiny_b"
    model, params = hf.load_hf_blt(path)
    entropy_model, entropy_params, threshold = hf.load_hf_entropy_model(path)
    ids = encode("ab\ncd ef\n\ngh ij kl mn\nop", eos=False).astype(np.int64)  # BOS + bytes, 3 newlines
    n = ids.size
    sidecar = E.compute_entropies(
        entropy_model, entropy_params, ids, np.array([0, n]), context=128, reset_on_newline=True, dtype=np.float32
    )
    segmented = np.asarray(
        next_byte_entropy(decode._byte_lm_forward(entropy_model.config, True)(entropy_params, ids[None]))
    )
    plain = np.asarray(next_byte_entropy(decode._byte_lm_forward(entropy_model.config)(entropy_params, ids[None])))
    np.testing.assert_allclose(segmented[0], sidecar, rtol=1e-5, atol=1e-5)
    first_newline = int(np.flatnonzero(ids == NEWLINE)[0])
    assert not np.allclose(plain[0, first_newline + 1 :], sidecar[first_newline + 1 :], atol=1e-3)

    rule = IncrementalRule(mode="entropy", threshold=threshold, entropy_reset_on_newline=True)
    entropy = (entropy_model, entropy_params)
    reference = full_forward(model, params, rule, [ids.tolist()], entropy_model=entropy)
    expected = patch_lengths(ids[None].astype(np.int32), rule, entropies=sidecar[None], include_next_token=True)[0]
    assert reference.patch_lengths[0].tolist() == expected[expected > 0].tolist()
    for prefill_length in (3, n // 2):
        (forced,) = teacher_forced(
            model, params, rule, [ids.tolist()], prefill_length=prefill_length, entropy_model=entropy
        )
        assert forced.patch_lengths == tuple(reference.patch_lengths[0].tolist())
        np.testing.assert_allclose(forced.logits, reference.logits[0, prefill_length - 1 : n], atol=1e-4, rtol=0)


def test_hugging_face_export_warns_that_its_patcher_does_not_reset():
    """transformers' in-forward patcher has no newline reset: exporting such a run says so."""
    from bltjax.convert.export import _threshold

    config = load_config(BLT_TINY)
    config.patching.mode, config.patching.threshold = "entropy", 1.25
    config.patching.entropy_reset_on_newline = True
    log = io.StringIO()
    assert _threshold(config, None, log) == 1.25
    assert "entropy_reset_on_newline is set; transformers' patcher never resets" in log.getvalue()


def test_cli_adds_a_rule_from_stored_entropies(corpus, entropy_model, tmp_path, capsys):
    from bltjax import entropy as program

    data, _ = corpus
    copy = tmp_path / "data"
    copy.mkdir()
    for file in data.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    model = str(entropy_model[2])
    argv = ["--data", str(copy), "--entropy-model", model, "--rule", "combined", "--threshold", "1.5"]
    assert program.main([*argv, "--threshold-add", "0.25", "--reference-quirks"]) == 0
    assert "rule=combined tag=cq1.5_0.25" in capsys.readouterr().out
    assert "cq1.5_0.25" in json.loads((copy / S.SIDECARS_FILE).read_text())["rules"]
    assert program.main(argv) == 2  # combined without --threshold-add
    assert "--threshold_add is required" in capsys.readouterr().err
    assert program.main([*argv[:4], "--rule", "topk", "--patch-size", "4", "--threshold-add", "1"]) == 2
    assert "--threshold-add does not go with --rule topk" in capsys.readouterr().err
    assert program.main([*argv[:4], "--rule", "monotonic", "--target-patch-size", "5"]) == 0
    calibrated = [r for r in json.loads((copy / S.SIDECARS_FILE).read_text())["rules"].values() if r["calibration"]]
    assert [r["kind"] for r in calibrated] == ["monotonic"] and "rule=monotonic tag=m" in capsys.readouterr().out
    assert program.main([*argv[:4], "--rule", "topk", "--target-patch-size", "5"]) == 2
    assert "calibrates the global and monotonic rules, not --rule topk" in capsys.readouterr().err


# --- training and evaluation ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["monotonic", "topk"])
def test_tiny_blt_trains_and_evaluates_with_the_rule(corpus, name, tmp_path):
    """A few training steps of the tiny BLT on the rule's sidecars, then bltjax.eval: the patches it
    counts are those of the stored bits, window by window."""
    from bltjax.inference.evaluate import evaluate
    from bltjax.inference.restore import load_for_inference
    from bltjax.training.metrics import read_jsonl
    from bltjax.training.trainer import train

    data, rules = corpus
    config = _rule_config(data, rules[name])
    train(config, tmp_path / "run", console=io.StringIO())
    losses = [r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    assert len(losses) == 3 and all(np.isfinite(losses))
    result = evaluate(load_for_inference(tmp_path / "run"), data, split="validation", batch_size=8, progress=False)
    assert result.patching["mode"] == "entropy" and np.isfinite(result.bpb)
    n, expected = config.data.seq_len, 0
    tag = R.rule_tag(rules[name])
    for shard in S.read_data_manifest(data):
        if shard.split != "validation":
            continue
        bits = S.read_starts(data, shard.name, tag, shard.tokens)
        for offset in range(0, shard.tokens - 1, n):
            real = min(n, shard.tokens - 1 - offset)
            expected += 1 + (real >= 2) + int(bits[offset + 2 : offset + real].sum())  # 0 and 1 forced
    assert result.n_patches == expected
