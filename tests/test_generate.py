"""Cached generation with incremental patching (bltjax.inference.generation, docs/architecture.md §16).

The main model is the committed Hugging Face fixture set B (tests/fixtures/hf_blt_tiny_b),
imported with `bltjax.convert.hf` (no torch needed): a tiny random BLT with GQA, k = 3, a global
input projection, two hash functions, a sliding window of 10 bytes and an entropy patcher
whose threshold (2.494) and `max_patch_length` (5) give patches of mixed lengths. A second,
randomly initialised BLT covers what the fixture does not: windowed cross-attention in both
directions, cross-attention after every encoder layer, average pooling and document masks.

Compilation dominates on CPU, so the tests share compiled programs on purpose: the patching
rule's numbers, sampling settings, forcing and stopping are traced (one program serves them
all), and prompt widths, `max_bytes` (= the teacher-forced step count) and batch sizes are
kept identical across tests; greedy runs keep their logits (`return_logits=True`) so that they
reuse the teacher-forcing program. The default path (no logits) runs in the batched tests.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_patching import _incremental_mask

from bltjax import patching, tokenizer
from bltjax.checkpoints import save_model
from bltjax.config import load_config
from bltjax.convert import hf
from bltjax.data.entropy import config_from_byte_lm, load_entropy_model
from bltjax.data.sidecars import SIDECARS_FILE
from bltjax.inference.generation import (
    IncrementalRule,
    full_forward,
    generate,
    generate_full_recompute,
    split_utf8,
    teacher_forced,
)
from bltjax.inference.generation import folders as generate_cli
from bltjax.inference.restore import RestoreError
from bltjax.kernels import kv_cache
from bltjax.models.blt import BLT
from bltjax.models.byte_lm import next_byte_entropy
from bltjax.models.configs import BLTConfig, TransformerConfig
from bltjax.models.factory import build_model, example_inputs
from bltjax.models.layers import Transformer, empty_kv_caches

REPO = pathlib.Path(__file__).resolve().parents[1]
MAX_BYTES = 48  # = the teacher-forced step count below, so both share one compiled program
PROMPTS = ["Hello, wor", "Über Wolken", "def f(x):"]  # < 16 ids each: one prompt width
TEXT = "It was the best of times, the worst; ünïcö!"  # 47 ids
ATOL = 1e-4


@pytest.fixture(scope="module")
def fixture_b(fixtures_dir):
    """(model, params, entropy (ByteLM, params), rule) of the committed transformers fixture."""
    path = fixtures_dir / "hf_blt_tiny_b"
    model, params = hf.load_hf_blt(path)
    entropy_model, entropy_params, threshold = hf.load_hf_entropy_model(path)
    max_patch_length = json.loads((path / "config.json").read_text())["max_patch_length"]
    rule = IncrementalRule(mode="entropy", threshold=threshold, max_patch_length=max_patch_length)
    return model, params, (entropy_model, entropy_params), rule


@pytest.fixture(scope="module")
def greedy_b(fixture_b):
    """Greedy generations of fixture B, one prompt at a time (shared by several tests)."""
    model, params, entropy, rule = fixture_b
    kwargs = dict(entropy_model=entropy, max_bytes=MAX_BYTES, return_logits=True)
    return [generate(model, params, rule, [p], **kwargs)[0] for p in PROMPTS]


def _entropies(entropy, ids: np.ndarray) -> np.ndarray:
    """H_t of the entropy model over ``ids`` (through `full_forward`'s compiled, padded forward)."""
    model, params = entropy
    logits = full_forward(model, params, None, [ids.tolist()]).logits[0, : ids.size]
    return np.asarray(next_byte_entropy(logits))


def _assert_teacher_forced_matches(model, params, rule, sequence, prefill_lengths, entropy=None) -> tuple[int, ...]:
    """Cached logits (prefill + one step per id) == one training forward; the patches equal bltjax.patching's."""
    reference = full_forward(model, params, rule, [sequence], entropy_model=entropy)
    n = len(sequence)
    for prefill_length in prefill_lengths:
        (forced,) = teacher_forced(
            model, params, rule, [sequence], prefill_length=prefill_length, entropy_model=entropy
        )
        expected = reference.logits[0, prefill_length - 1 : n]
        np.testing.assert_allclose(forced.logits, expected, atol=ATOL, rtol=0, err_msg=f"prefill {prefill_length}")
        assert forced.patch_lengths == tuple(reference.patch_lengths[0].tolist())
    return tuple(reference.patch_lengths[0].tolist())


def test_patch_rule_decides_like_the_patcher_one_position_at_a_time():
    """Every incremental mode, run position by position, reproduces `patch_start_mask` (include_next_token)."""
    rng = np.random.default_rng(0)
    tokens = tokenizer.encode("a1 b2\n\nc héllo wörld, x  y!", eos=False)[None].astype(np.int32)
    tokens[0, 12] = tokenizer.EOS_ID  # a special id inside the row (space mode ends a patch there)
    n = tokens.shape[1]
    entropies = rng.uniform(0.0, 4.0, size=(1, n)).astype(np.float32)
    rules = [
        IncrementalRule(mode="byte"),
        IncrementalRule(mode="static", patch_size=3),
        IncrementalRule(mode="space"),
        IncrementalRule(mode="space", max_patch_length=2),
        IncrementalRule(mode="entropy", threshold=2.0),
        IncrementalRule(mode="entropy", threshold=2.0, max_patch_length=3),
        IncrementalRule(mode="entropy", threshold=0.5, monotonicity=True),
        IncrementalRule(mode="entropy", threshold=1.5, threshold_add=0.2),
        IncrementalRule(mode="entropy", threshold=1.5, threshold_add=0.2, reference_quirks=True),
    ]
    for rule in rules:
        kwargs = rule.patching_kwargs()
        if rule.needs_entropy:
            kwargs["entropies"] = entropies
        expected = patching.patch_start_mask(tokens, include_next_token=True, **kwargs)[0]
        np.testing.assert_array_equal(_incremental_mask(rule, tokens, entropies), expected, err_msg=str(rule))


def test_chunked_prefix_attention_equals_dense_attention():
    """`attend_used_prefix` (several chunks, a traced stop, an extra key) == masked dense softmax."""
    rng = np.random.default_rng(0)
    b, kv_heads, groups, slots, d, chunk = 3, 2, 2, 16, 8, 4
    q = rng.standard_normal((b, kv_heads * groups, d)).astype(np.float32)
    keys, values = (rng.standard_normal((b, kv_heads, slots, d)).astype(np.float32) for _ in range(2))
    extra = tuple(rng.standard_normal((b, kv_heads, d)).astype(np.float32) for _ in range(2))
    used = 10  # slots 10..15 hold garbage that must never be read
    visible = rng.random((b, slots)) < 0.6
    visible[:, used:] = True

    def allowed(slot):
        return jnp.asarray(visible)[:, slot]

    got = kv_cache.attend_used_prefix(q, keys, values, allowed, jnp.int32(used), chunk, extra)
    all_keys = np.concatenate([keys[:, :, :used], extra[0][:, :, None]], axis=2)
    all_values = np.concatenate([values[:, :, :used], extra[1][:, :, None]], axis=2)
    mask = np.concatenate([visible[:, :used], np.ones((b, 1), bool)], axis=1)[:, None, :]
    expected = kv_cache.attend(q[:, None], all_keys, all_values, mask)[:, 0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)


@pytest.mark.parametrize("window, deferred", [(5, False), (None, True)], ids=["ring-step", "full-deferred-chunked"])
def test_stack_prefill_then_cached_steps_equal_the_training_forward(window, deferred):
    """One `Transformer` module: prefill of each row's first positions, then one position per row
    through its KV cache (`step`, or `step_deferred` + the write the caller does), equals the
    training forward (`apply` without a cache) at every position, to 1e-5. Rows have different
    prompt lengths and document segments; with a window of 5 the ring of 5 slots wraps around."""
    cfg = TransformerConfig(32, 2, 4, n_kv_heads=2, window=window)
    stack = Transformer(cfg)
    b, n = 2, 12
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, n, cfg.dim)).astype(np.float32)
    segments = np.array([[0] * 3 + [1] * 6 + [2] * 3, [0] * 8 + [1] * 4], np.int32)  # documents end mid-row
    positions = np.broadcast_to(np.arange(n, dtype=np.int32), (b, n))
    params = _random_params(stack, x, positions, segments)
    expected = stack.apply({"params": params}, x, positions, segments)

    lengths = np.array([4, 7], np.int32)  # prompt lengths: the prefill covers the widest, padding masked
    width = int(lengths.max())
    valid = positions[:, :width] < lengths[:, None]
    caches = empty_kv_caches(cfg, b, n, jnp.float32)
    prefilled, caches = stack.apply(
        {"params": params}, x[:, :width], positions[:, :width], segments[:, :width], caches, valid,
        method=Transformer.prefill,
    )  # fmt: skip
    got = np.zeros_like(np.asarray(expected))
    got[:, :width] = np.where(valid[..., None], prefilled, 0)
    rows = np.arange(b)
    for s in range(n - lengths.min()):
        pos = np.minimum(lengths + s, n - 1)
        active = lengths + s < n
        x_now, seg_now = x[rows, pos], segments[rows, pos]
        if deferred:
            out, new_kv = stack.apply(
                {"params": params}, x_now, pos, seg_now, caches, 4, method=Transformer.step_deferred
            )
            caches = tuple(
                kv_cache.write_step(cache, k, v, jnp.asarray(pos), jnp.asarray(seg_now), jnp.asarray(active))
                for cache, (k, v) in zip(caches, new_kv, strict=True)
            )
        else:
            out, caches = stack.apply(
                {"params": params}, x_now, pos, seg_now, caches, jnp.asarray(active), method=Transformer.step
            )
        got[rows[active], pos[active]] = np.asarray(out)[active]
    np.testing.assert_allclose(got, np.asarray(expected), atol=1e-5, rtol=0)


def test_topk_entropy_patching_is_refused():
    with pytest.raises(ValueError, match="top-k"):
        IncrementalRule(mode="entropy", patch_size=4.5)


@pytest.mark.slow
def test_teacher_forced_logits_equal_training_forward_entropy_mode(fixture_b):
    """Spec §16.3: several thresholds, incl. all single-byte patches, one patch, and max_patch_length splits."""
    model, params, entropy, rule = fixture_b
    sequence = tokenizer.encode(TEXT, eos=False).tolist()
    # A threshold in the widest gap between the middle entropies: no entropy lies within float
    # rounding of it (the cached and the full entropy passes round differently, docs/architecture.md §2.1).
    h = np.sort(_entropies(entropy, np.asarray(sequence, np.int32)))
    middle = slice(len(h) // 4, 3 * len(h) // 4)
    gap = int(np.argmax(np.diff(h[middle]))) + middle.start
    median = float((h[gap] + h[gap + 1]) / 2)
    cases = [
        (IncrementalRule(mode="entropy", threshold=-1.0), "single"),  # H > -1 always: every patch has one byte
        (IncrementalRule(mode="entropy", threshold=100.0), "one"),  # never above: BOS, then one long patch
        (IncrementalRule(mode="entropy", threshold=100.0, max_patch_length=4), "split"),
        (IncrementalRule(mode="entropy", threshold=median), "mixed"),
        (rule, "fixture"),  # the checkpoint's own threshold with max_patch_length 5
    ]
    for case_rule, kind in cases:
        lengths = _assert_teacher_forced_matches(model, params, case_rule, sequence, (1, 7), entropy)
        body = lengths[1:]
        if kind == "single":
            assert set(lengths) == {1}
        elif kind == "one":
            assert lengths == (1, len(sequence))
        elif kind == "split":
            assert max(lengths) == 4 and len(lengths) > 10
        else:
            assert min(body) == 1 and max(body) > 2, lengths  # mixed lengths


@pytest.fixture(scope="module")
def windowed_blt():
    """A random BLT with what fixture B lacks: cross-attention windows > 1 (as the official debug
    config), cross-attention after every encoder layer without re-pooling, avg pooling, separate
    cross-attention heads, document masks."""
    cfg = BLTConfig(
        encoder=TransformerConfig(32, 2, 4, window=6),
        latent=TransformerConfig(48, 1, 4, n_kv_heads=2),
        decoder=TransformerConfig(32, 2, 2, window=6),
        cross_attn_k=2,
        cross_attn_heads=2,
        cross_attn_all_layers_encoder=True,
        cross_attn_window_encoder=3,
        cross_attn_window_decoder=2,
        pooling="avg",
        hash_sizes=(3, 4),
        hash_functions=2,
        hash_vocab=101,
    )
    model = BLT(cfg)
    return model, _random_params(model, np.ones((1, 8), np.int32), np.array([[1, 8]], np.int32))


def _random_params(model, *inputs, seed: int = 1) -> dict:
    """Random weights of the model's parameter tree, drawn in numpy (compiling `init` costs ~20 s on CPU).

    Kernels and tables ~ N(0, 1/fan_in); norm scales 1 +- 0.25, so a misplaced norm would show.
    """
    shapes = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))["params"])
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if path[-1].key == "scale":
            return rng.uniform(0.75, 1.25, leaf.shape).astype(np.float32)
        fan_in = leaf.shape[-2] if path[-1].key == "tables" else leaf.shape[0]
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.slow
def test_teacher_forced_windowed_cross_attention_space_mode(windowed_blt):
    """Space patching; an EOS mid-row starts a new document segment (local and global masks)."""
    model, params = windowed_blt
    sequence = (
        tokenizer.encode("first doc.", eos=True).tolist()
        + tokenizer.encode("Second one: a row,  spaced!", eos=False).tolist()
    )
    lengths = _assert_teacher_forced_matches(model, params, IncrementalRule(mode="space"), sequence, (1, 7))
    assert len(lengths) > 5 and max(lengths) > 2


def test_greedy_cached_equals_full_recompute_space_mode(windowed_blt):
    model, params = windowed_blt
    rule = IncrementalRule(mode="space")
    cached = generate(model, params, rule, PROMPTS[:1], max_bytes=MAX_BYTES, return_logits=True)
    full = generate_full_recompute(model, params, rule, PROMPTS[:1], max_bytes=MAX_BYTES)
    assert cached[0].token_ids == full[0].token_ids
    assert cached[0].patch_lengths == full[0].patch_lengths
    assert cached[0].global_steps == len(cached[0].patch_lengths) - 1


def test_greedy_cached_equals_full_recompute_entropy_mode(fixture_b, greedy_b):
    model, params, entropy, rule = fixture_b
    reference = generate_full_recompute(model, params, rule, PROMPTS[:1], entropy_model=entropy, max_bytes=MAX_BYTES)
    for cached, full in zip(greedy_b[:1], reference, strict=True):
        assert cached.token_ids == full.token_ids
        assert cached.patch_lengths == full.patch_lengths
        assert cached.global_steps == full.global_steps == len(cached.patch_lengths) - 1
        assert len(cached.token_ids) == MAX_BYTES and cached.stop_reason == "max_bytes"
        assert min(cached.patch_lengths[1:]) < max(cached.patch_lengths[1:]) <= rule.max_patch_length


def test_generated_patches_equal_patching_of_the_final_text(fixture_b, greedy_b):
    """The patches formed byte by byte are those `bltjax.patching` gives the whole final sequence."""
    _, _, entropy, rule = fixture_b
    for prompt, result in zip(PROMPTS, greedy_b, strict=True):
        ids = np.concatenate([tokenizer.encode(prompt, eos=False), np.asarray(result.token_ids)]).astype(np.int32)
        expected = patching.patch_lengths(
            ids[None], include_next_token=False, entropies=_entropies(entropy, ids)[None], **rule.patching_kwargs()
        )[0]
        assert result.patch_lengths == tuple(int(n) for n in expected if n > 0)
        assert sum(result.patch_lengths) == ids.size


@pytest.mark.slow
def test_batched_prompts_of_different_lengths_equal_one_at_a_time(fixture_b, greedy_b):
    model, params, entropy, rule = fixture_b
    batched = generate(model, params, rule, PROMPTS, entropy_model=entropy, max_bytes=MAX_BYTES)
    assert len({len(p.encode()) for p in PROMPTS}) == len(PROMPTS)
    for together, alone in zip(batched, greedy_b, strict=True):
        assert together.token_ids == alone.token_ids
        assert together.patch_lengths == alone.patch_lengths
        assert together.global_steps == alone.global_steps
    # Rows close patches at different times: their patchings differ.
    assert len({r.patch_lengths for r in batched}) == len(PROMPTS)


def test_rows_stop_after_their_first_completed_stop_sequence(fixture_b, greedy_b):
    """A row ends with the byte that completes a stop sequence, its bytes a prefix of the unstopped
    generation; other rows of the batch go on, and a sequence that never appears changes nothing."""
    model, params, entropy, rule = fixture_b
    full = greedy_b[0].data, greedy_b[1].data
    # A 2-byte stop first seen after byte 4 of row 0 (not in row 1's first bytes, so row 1 runs longer).
    start = next(i for i in range(4, len(full[0]) - 2) if full[0][i : i + 2] not in full[0][:i] + full[1])
    stop = full[0][start : start + 2]
    results = generate(model, params, rule, PROMPTS[:2], entropy_model=entropy, max_bytes=MAX_BYTES,
                       stop_sequences=[stop, b"\x00\x00never"])  # fmt: skip
    assert results[0].data == full[0][: start + 2] and results[0].stop_reason == "stop_sequence"
    assert results[1].data == full[1] and results[1].stop_reason == "max_bytes"
    closed = len(results[0].patch_lengths) - 1  # the last patch was still open when the row stopped
    assert results[0].patch_lengths[:closed] == greedy_b[0].patch_lengths[:closed]
    with pytest.raises(ValueError, match=r"stop_sequences\[0\]: expected a non-empty str or bytes"):
        generate(model, params, rule, PROMPTS[:1], entropy_model=entropy, stop_sequences=[""])


def test_sampling_is_deterministic_and_tiny_top_p_is_greedy(fixture_b, greedy_b):
    model, params, entropy, rule = fixture_b
    kwargs = dict(entropy_model=entropy, max_bytes=MAX_BYTES, temperature=1.0, return_logits=True)
    first = generate(model, params, rule, PROMPTS[:1], seed=7, top_p=0.9, **kwargs)[0]
    again = generate(model, params, rule, PROMPTS[:1], seed=7, top_p=0.9, **kwargs)[0]
    other = generate(model, params, rule, PROMPTS[:1], seed=8, top_p=0.9, **kwargs)[0]
    assert first.token_ids == again.token_ids and first.patch_lengths == again.patch_lengths
    assert first.token_ids != other.token_ids
    assert first.token_ids != greedy_b[0].token_ids
    nucleus_of_one = generate(model, params, rule, PROMPTS[:1], seed=7, top_p=1e-6, **kwargs)[0]
    assert nucleus_of_one.token_ids == greedy_b[0].token_ids


def test_utf8_is_never_broken_mid_character(fixture_b):
    assert split_utf8("naïve €".encode()) == ("naïve €", b"")
    for cut in (1, 2, 3):  # a 4-byte character cut after 1..3 bytes is held back whole
        text, pending = split_utf8("ok 🌧".encode()[: 3 + cut])
        assert (text, pending) == ("ok ", "🌧".encode()[:cut])
    assert split_utf8(b"a\xffb\xc3") == ("a\ufffdb", b"\xc3")  # invalid byte replaced, unfinished tail held
    model, params, entropy, rule = fixture_b
    results = generate(
        model, params, rule, PROMPTS, entropy_model=entropy, max_bytes=MAX_BYTES, temperature=1.0, seed=3
    )
    for result in results:
        complete = result.data[: len(result.data) - len(result.pending)]
        assert result.text == complete.decode("utf-8", errors="replace")
        assert result.data.endswith(result.pending) and len(result.pending) <= 3
        if result.pending:  # an unfinished sequence starts with a lead byte, the rest are continuations
            assert result.pending[0] >= 0xC2 and all(0x80 <= b < 0xC0 for b in result.pending[1:])


def test_byte_lm_cached_generation_equals_full_recompute(fixture_b):
    """The byte-level path (here the fixture's entropy model used as an LM), batched prompts of different lengths."""
    entropy_model, entropy_params = fixture_b[2]
    cached = generate(entropy_model, entropy_params, None, PROMPTS[:2], max_bytes=MAX_BYTES)
    full = generate_full_recompute(entropy_model, entropy_params, None, PROMPTS[:2], max_bytes=MAX_BYTES)
    for a, b in zip(cached, full, strict=True):
        assert a.token_ids == b.token_ids and a.patch_lengths is None and a.global_steps is None
        assert len(a.token_ids) == MAX_BYTES


def test_generate_rejects_bad_arguments(fixture_b):
    model, params, entropy, rule = fixture_b
    with pytest.raises(ValueError, match="entropy model"):
        generate(model, params, rule, ["x"], max_bytes=4)
    with pytest.raises(ValueError, match="max_bytes"):
        generate(model, params, rule, ["x"], entropy_model=entropy, max_bytes=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, params, rule, ["x"], entropy_model=entropy, top_p=0.0)
    with pytest.raises(ValueError, match="prompts"):
        generate(model, params, rule, "not a list", entropy_model=entropy)
    with pytest.raises(ValueError, match="patching"):
        generate(model, params, None, ["x"], entropy_model=entropy)


@pytest.mark.slow
def test_imported_model_generates_the_same_greedy_bytes_as_transformers(fixture_b, fixtures_dir):
    """Live: `BltForCausalLM.generate` (full recomputation, its own patcher) vs the cached generator.

    Both without `max_patch_length`: with it, transformers drops the empty patch that the
    virtual next token opens after a high-entropy last byte (see `bltjax.patching`), so its
    last position reads a different patch than the include_next_token rule of training.
    """
    torch = pytest.importorskip("torch", reason="the hf extra (torch, transformers) is not installed")
    transformers = pytest.importorskip("transformers", reason="the hf extra (torch, transformers) is not installed")
    reference = transformers.BltForCausalLM.from_pretrained(
        fixtures_dir / "hf_blt_tiny_b", attn_implementation="eager"
    ).eval()
    reference.config.max_patch_length = None
    model, params, entropy, rule = fixture_b
    rule = IncrementalRule(mode="entropy", threshold=rule.threshold)
    results = generate(model, params, rule, PROMPTS, entropy_model=entropy, max_bytes=MAX_BYTES, stop_at_eos=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's thread pool spin-waits on a busy 2-core machine: 30x slower
    try:
        for prompt, ours in zip(PROMPTS, results, strict=True):
            ids = torch.tensor(tokenizer.encode(prompt, eos=False)[None].astype(np.int64))
            with torch.no_grad():
                theirs = reference.generate(ids, max_new_tokens=MAX_BYTES, do_sample=False, use_cache=False)
            assert list(ours.token_ids) == theirs[0, ids.shape[1] :].tolist(), prompt
    finally:
        torch.set_num_threads(threads)


# --- the command line ----------------------------------------------------------------------------


def _saved_entropy_model(fixture_b, directory: pathlib.Path) -> pathlib.Path:
    """The fixture's entropy model written as a `save_model` folder (a byte LM the CLI can load)."""
    entropy_model, entropy_params = fixture_b[2]
    return save_model(directory, config_from_byte_lm(entropy_model.config), entropy_params)


def test_cli_generates_from_a_saved_model(fixture_b, tmp_path):
    """`run` loads with `load_for_inference` and prints what `generate` returns (same compiled program)."""
    folder = _saved_entropy_model(fixture_b, tmp_path / "lm")
    out = io.StringIO()
    results = generate_cli.generate_from_folder(workdir=folder, prompts=PROMPTS[:2], max_bytes=MAX_BYTES, out=out)
    entropy_model, entropy_params = fixture_b[2]
    expected = generate(entropy_model, entropy_params, None, PROMPTS[:2], max_bytes=MAX_BYTES)
    assert [r.token_ids for r in results] == [r.token_ids for r in expected]
    printed = out.getvalue()
    assert printed.count("=== prompt") == 2 and PROMPTS[0] + results[0].text in printed
    assert f"{len(results[0].data)} bytes, stopped at" in printed


@pytest.mark.slow
def test_cli_rejects_bad_input(fixture_b, tmp_path):
    with pytest.raises(generate_cli.GenerateError, match="prompt 2 is empty"):
        generate_cli.generate_from_folder(workdir=tmp_path, prompts=["ok", ""])
    with pytest.raises(generate_cli.GenerateError, match="--max-bytes"):
        generate_cli.generate_from_folder(workdir=tmp_path, prompts=["ok"], max_bytes=0)
    with pytest.raises(RestoreError, match="neither a training workdir"):
        generate_cli.generate_from_folder(workdir=tmp_path, prompts=["ok"])  # an empty folder: no checkpoint
    # An entropy-patched BLT without its entropy model.
    config = load_config(str(REPO / "experiments" / "blt_tiny.py"))
    config.patching.mode, config.patching.threshold = "entropy", 1.0
    model = build_model(config)
    save_model(tmp_path / "blt", config, _random_params(model, *example_inputs(config)))
    with pytest.raises(generate_cli.GenerateError, match="--entropy-model"):
        generate_cli.generate_from_folder(workdir=tmp_path / "blt", prompts=["ok"])
    with pytest.raises(generate_cli.GenerateError, match="--entropy-model: .*no such folder"):
        generate_cli.generate_from_folder(workdir=tmp_path / "blt", prompts=["ok"], entropy_model=tmp_path / "missing")
    # As a program: the message on stderr and exit status 1.
    proc = subprocess.run(
        [sys.executable, "-m", "bltjax.generate", "--model", str(tmp_path), "--prompt", "", "--max-bytes", "4"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"),
    )  # fmt: skip
    assert proc.returncode == 1 and "error: --prompt: prompt 1 is empty" in proc.stderr


def test_cli_finds_the_entropy_model_the_sidecars_name(fixture_b, tmp_path):
    """Quickstart layout: WORKDIR/../entropy_model/export is the default only if its fingerprint matches.

    (sidecars.json records the model as ``entropy_model.fingerprint``; the quickstart test in
    test_cli.py checks the same against sidecars written by `bltjax.data.entropy`.)"""
    export = _saved_entropy_model(fixture_b, tmp_path / "entropy_model" / "export")
    data = tmp_path / "data"
    data.mkdir()
    config = load_config(str(REPO / "experiments" / "blt_tiny.py"))
    config.data.path = str(data)
    fingerprint = load_entropy_model(export).fingerprint
    (data / SIDECARS_FILE).write_text(json.dumps({"entropy_model": {"fingerprint": fingerprint}}))
    assert generate_cli.default_entropy_model(tmp_path / "blt", config) == export.absolute()
    (data / SIDECARS_FILE).write_text(json.dumps({"entropy_model": {"fingerprint": "another model"}}))
    assert generate_cli.default_entropy_model(tmp_path / "blt", config) is None


@pytest.mark.slow
def test_generation_benchmark_prints_table(tmp_path):
    """Smoke run of benchmarks/generate.py on the tiny config (plumbing only: the numbers mean nothing)."""
    out = tmp_path / "generate.json"
    command = [sys.executable, str(REPO / "benchmarks" / "generate.py"), "--model", "tiny", "--batches", "1",
               "--max-bytes", "6", "--prompt-bytes", "8", "--samples", "3", "--skip-hf", "--out", str(out)]  # fmt: skip
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("| model | batch | method | bytes/s |")
    cached = next(line for line in lines if "| bltjax cached |" in line)
    assert float(cached.split("|")[4].replace(",", "")) > 0
    assert "skipped: --skip-hf" in next(line for line in lines if "| transformers |" in line)
    report = json.loads(out.read_text())
    rows = {row["method"]: row for row in report["rows"] if row["model"] == "tiny"}
    assert rows["bltjax cached"]["bytes"] == rows["bltjax full recompute"]["bytes"] == 6
    assert rows["bltjax full recompute"]["same_bytes_as_cached"] is True
    assert rows["bltjax cached"]["speedup_vs_recompute"] > 0


@pytest.mark.slow
def test_cli_generates_from_a_hugging_face_folder_with_its_own_patcher(fixture_b, greedy_b, fixtures_dir):
    """`--workdir HF_FOLDER`: imported on the fly, patched by the folder's own entropy model and threshold."""
    out = io.StringIO()
    results = generate_cli.generate_from_folder(
        workdir=fixtures_dir / "hf_blt_tiny_b", prompts=PROMPTS[:1], max_bytes=MAX_BYTES, out=out
    )
    assert results[0].token_ids == greedy_b[0].token_ids
    assert results[0].patch_lengths == greedy_b[0].patch_lengths
    assert "entropy model: " in out.getvalue()


def _benchmark_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_threshold_keeps_a_margin_from_entropies_one_ulp_apart():
    """The generation benchmark's threshold must not sit on an entropy of the text (the byte-418 divergence)."""
    gap_threshold = _benchmark_module("generate").gap_threshold
    one = np.float32(3.3120999)
    neighbours = [one, np.nextafter(one, np.float32(4)), np.nextafter(np.nextafter(one, np.float32(4)), np.float32(4))]
    entropies = np.sort(np.array([2.0, *neighbours, 3.9], np.float32))
    threshold = gap_threshold(entropies, quantile=float(one))
    assert min(abs(threshold - float(e)) for e in entropies) > 0.1  # a real gap's midpoint, not a neighbour
    assert threshold in (pytest.approx((2.0 + float(one)) / 2), pytest.approx((float(neighbours[-1]) + 3.9) / 2))
    with pytest.raises(ValueError, match="no two entropies differ"):
        gap_threshold(np.array(neighbours, np.float32), quantile=3.3)
