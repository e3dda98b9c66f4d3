"""The MegaByte baseline (docs/architecture.md §19): prefix, fixed patches, concatenation pooling.

Shapes and the s - 1 BOE prefix, causality (logits at position i depend on tokens <= i only),
the patch vectors and the decoder's input against numpy written from the definition, a short
run of the real trainer, `bltjax.eval` against a direct computation, and the FLOP and parameter
counts against hand counts.
"""

from __future__ import annotations

import io
import json
import math
import pathlib

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from bltjax.config import ConfigError, load_config, model_config, stack_config, validate
from bltjax.inference.evaluate import evaluate
from bltjax.inference.restore import load_for_inference
from bltjax.models import flops
from bltjax.models.factory import build_model, example_inputs, parameter_shapes
from bltjax.models.layers import Transformer, positions_like
from bltjax.models.megabyte import MegaByteEncoder, concat_patches, num_patches, with_boe_prefix
from bltjax.tokenizer import BOE_ID, EOS_ID, OFFSET
from bltjax.training.metrics import read_jsonl

REPO = pathlib.Path(__file__).resolve().parents[1]
MEGABYTE = str(REPO / "experiments" / "megabyte.py")


def _small(patch_size: int = 3, seq_len: int = 20, **model):
    """A very small MegaByte: local width 16, global 24, hash n-grams on unless told otherwise."""
    config = load_config(f"{MEGABYTE}:tiny")
    config.model.encoder = stack_config(16, 1, 2, window=8)
    config.model.latent = stack_config(24, 2, 2)
    config.model.decoder = stack_config(16, 2, 2, window=8)
    config.model.patch_size = patch_size
    config.model.hash_sizes = [2, 3]
    config.model.hash_vocab = 97
    for key, value in model.items():
        config.model[key] = value
    config.data.seq_len = seq_len
    return config


def _init(config, seed: int = 0):
    model = build_model(config)
    params = jax.jit(model.init)(jax.random.key(seed), *example_inputs(config))["params"]
    return model, nn.meta.unbox(params)


def _tokens(rows: int, n: int, seed: int = 0, eos_every: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(OFFSET, 260, (rows, n)).astype(np.int32)
    tokens[:, 0] = 1  # BOS
    if eos_every:
        tokens[:, eos_every::eos_every] = EOS_ID
    return tokens


def _run(model, params, tokens):
    logits, state = model.apply({"params": params}, tokens, mutable=["intermediates"])
    return np.asarray(logits), {name: np.asarray(value[0]) for name, value in state["intermediates"].items()}


# --- shapes and the prefix ----------------------------------------------------------------------


@pytest.mark.parametrize("patch_size,seq_len", [(3, 20), (4, 16), (2, 7)])
def test_shapes_and_the_boe_prefix(patch_size, seq_len):
    config = _small(patch_size, seq_len)
    model, params = _init(config)
    tokens = _tokens(2, seq_len)
    tokens[1, 1:] = tokens[0, 1:][::-1]  # rows agree on token 0 (BOS) only
    logits, inter = _run(model, params, tokens)
    s, p = patch_size, -(-seq_len // patch_size)
    assert num_patches(seq_len, s) == p
    assert logits.shape == (2, seq_len, 260)
    assert inter["encoder_hidden"].shape == (2, seq_len + s - 1, 16)
    assert inter["encoder_patch_embeds"].shape == (2, p, s * 16)
    assert inter["global_output"].shape == (2, p, 24)

    prefixed = np.asarray(with_boe_prefix(tokens, s))
    np.testing.assert_array_equal(prefixed[:, : s - 1], BOE_ID)
    np.testing.assert_array_equal(prefixed[:, s - 1 :], tokens)
    # Patch 0 is s - 1 fillers and token 0: its states are the same in both rows, and so is O[0].
    hidden = inter["encoder_hidden"]
    np.testing.assert_allclose(hidden[0, :s], hidden[1, :s], atol=1e-6)
    np.testing.assert_allclose(inter["global_output"][0, 0], inter["global_output"][1, 0], atol=1e-6)
    assert not np.allclose(hidden[0, s:], hidden[1, s:])
    # The encoder ran over exactly the prefixed ids.
    encoder = MegaByteEncoder(model_config(config))
    segments = np.cumsum(prefixed == EOS_ID, axis=1) - (prefixed == EOS_ID)
    alone = encoder.apply({"params": params["local_encoder"]}, prefixed, segments)
    np.testing.assert_allclose(hidden, np.asarray(alone), atol=1e-6)


# --- causality ----------------------------------------------------------------------------------


@pytest.mark.parametrize("patch_size,eos_every", [(3, 0), (4, 7), (2, 0)])
def test_logits_at_position_i_depend_only_on_tokens_up_to_i(patch_size, eos_every):
    """No byte sees its own target (token i + 1) or a later one; and each byte does see token i."""
    n = 24
    config = _small(patch_size, n)
    model, params = _init(config)
    apply = jax.jit(lambda t: model.apply({"params": params}, t))
    tokens = _tokens(1, n, eos_every=eos_every)
    base = np.asarray(apply(tokens))
    for t in range(1, n):
        changed = tokens.copy()
        changed[0, t] = OFFSET + (changed[0, t] - OFFSET + 101) % 256
        logits = np.asarray(apply(changed))
        np.testing.assert_allclose(logits[0, :t], base[0, :t], atol=1e-6, err_msg=f"position < {t} saw token {t}")
        assert np.abs(logits[0, t] - base[0, t]).max() > 1e-4, f"position {t} does not see its own input"


def test_each_byte_reads_the_newest_safe_global_output():
    """Byte i reads O[floor(i / s)], which has seen token floor(i / s) * s: the last byte of each
    patch changes through the global model when only that token's global path changes."""
    s, n = 4, 16
    config = _small(s, n)
    model, params = _init(config)
    tokens = _tokens(1, n)
    _, inter = _run(model, params, tokens)
    changed = tokens.copy()
    changed[0, 8] = OFFSET + (changed[0, 8] - OFFSET + 7) % 256  # token 8 sits in encoder patch 2
    _, after = _run(model, params, changed)
    moved = np.abs(after["global_output"][0] - inter["global_output"][0]).max(axis=-1) > 1e-5
    np.testing.assert_array_equal(moved, [False, False, True, True])


# --- concatenation pooling and the decoder's input against numpy ---------------------------------


def _rms_norm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def test_concatenation_pooling_and_decoder_input_equal_a_numpy_reference():
    s, n, e, g = 3, 10, 16, 24
    config = _small(s, n, document_mask=False)
    model, params = _init(config, seed=3)
    tokens = _tokens(2, n, seed=5)
    logits, inter = _run(model, params, tokens)
    hidden, global_out = inter["encoder_hidden"], inter["global_output"]
    p = 4  # ceil(10 / 3)

    # Patch j of row b: the states of encoder positions j*s .. j*s + s - 1, side by side.
    reference = np.zeros((2, p, s * e), np.float32)
    for b in range(2):
        for j in range(p):
            reference[b, j] = np.concatenate([hidden[b, j * s + r] for r in range(s)])
    np.testing.assert_array_equal(inter["encoder_patch_embeds"], reference)
    np.testing.assert_array_equal(np.asarray(concat_patches(hidden, s, p)), reference)
    # The latent model's input is W_in (s*E -> G) of that vector.
    w_in = params["latent"]["input_projection"]["kernel"]
    latent_in = reference @ w_in
    latent = Transformer(model_config(config).latent)
    expected_global = latent.apply(
        {"params": params["latent"]["transformer"]}, latent_in, positions_like(latent_in[..., 0])
    )
    np.testing.assert_allclose(global_out, np.asarray(expected_global), atol=1e-5)

    # Decoder input of byte i: its encoder state (prefix dropped) plus slot i mod s of D · O[i // s].
    d = params["local_decoder"]["patch_projection"]["kernel"]  # [G, s*E]
    x = np.zeros((2, n, e), np.float32)
    for b in range(2):
        for i in range(n):
            slot = global_out[b, i // s] @ d[:, (i % s) * e : (i % s + 1) * e]
            x[b, i] = hidden[b, i + s - 1] + slot
    decoder = params["local_decoder"]
    y = Transformer(model_config(config).decoder).apply(
        {"params": decoder["transformer"]}, x, positions_like(x[..., 0])
    )
    y = _rms_norm(np.asarray(y), decoder["final_norm"]["scale"], 1e-5)
    np.testing.assert_allclose(logits, y @ decoder["output"]["kernel"], atol=1e-4)
    assert global_out.shape[-1] == g


# --- config -------------------------------------------------------------------------------------


def test_config_errors_name_the_field():
    config = _small()
    config.model.patch_size = 1
    with pytest.raises(ConfigError, match=r"config\.model\.patch_size: expected an integer >= 2"):
        validate(config)
    config = _small()
    config.model.decoder.dim = 32
    with pytest.raises(ConfigError, match=r"config\.model\.decoder\.dim"):
        validate(config)
    config = _small()
    config.model.pooling = "max"  # a BLT field: not in the MegaByte schema
    with pytest.raises(ConfigError, match=r"config\.model\.pooling: unknown key \(not in the megabyte config schema"):
        validate(config)
    assert "patching" not in load_config(f"{MEGABYTE}:sweep")


# --- training, evaluation -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def megabyte_run(corpus_data, trained_run):
    """The tiny MegaByte trained 30 steps by the real trainer on the prepared corpus (no sidecars)."""
    config = load_config(f"{MEGABYTE}:tiny")
    config.data.path = str(corpus_data)
    config.data.batch_size = 8
    config.train.steps = 30
    config.train.log_every = 1
    config.train.eval_every = 0
    config.train.eval_batches = 1
    config.train.checkpoint_every = 0
    config.optimizer.warmup_steps = 2
    config.optimizer.learning_rate = 3e-3
    return trained_run(config)


@pytest.mark.slow
def test_a_few_training_steps_lower_the_loss(megabyte_run):
    rows = [r for r in read_jsonl(megabyte_run.workdir / "metrics.jsonl") if r["split"] == "train"]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < losses[0] - 1.0, losses
    # MFU and FLOPs spent use MegaByte's own analytic count (docs/architecture.md §19).
    config = load_for_inference(megabyte_run.workdir).config
    expected = flops.analytic_flops_per_byte(config).train
    assert [r["flops_per_byte"] for r in rows] == pytest.approx([expected] * len(rows))


@pytest.mark.slow
def test_eval_bpb_matches_a_direct_computation(megabyte_run, corpus_data):
    loaded = load_for_inference(megabyte_run.workdir)
    assert loaded.config.model_type == "megabyte"
    result = evaluate(loaded, corpus_data, split="validation", batch_size=8, progress=False)
    n = loaded.config.data.seq_len
    manifest = json.loads((corpus_data / "manifest.json").read_text())
    windows = []
    for shard in manifest["splits"]["validation"]:
        tokens = np.fromfile(corpus_data / f"{shard['name']}.tokens", dtype="<u2").astype(np.int32)
        for offset in range(0, tokens.size - 1, n):
            chunk = tokens[offset : offset + n + 1]
            windows.append(np.pad(chunk, (0, n + 1 - chunk.size)))
    windows = np.stack(windows)
    assert result.n_windows == len(windows)
    logits = np.asarray(jax.jit(loaded.model.apply)({"params": loaded.params}, windows[:, :-1]), np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, windows[:, 1:, None], axis=-1)[..., 0]
    mask = windows[:, 1:] != BOE_ID
    assert result.n_targets == int(mask.sum())
    np.testing.assert_allclose(result.bpb, nll[mask].sum() / (math.log(2) * mask.sum()), rtol=1e-5)


# --- FLOPs and parameters -----------------------------------------------------------------------


def test_flops_and_parameters_equal_a_hand_count():
    # E = 16 (2 heads, window 8, hidden 256), G = 24 (2 heads, hidden 256), s = 3, N = 20.
    config = _small(3, 20)
    record = model_config(config)
    assert (record.encoder.hidden_dim, record.latent.hidden_dim) == (256, 256)
    n, s, e, g = 20, 3, 16, 24

    # Analytic (paper primitives): 24·l·h² + 2·l·h·(m + 1) per position, + 2·h·256 for the head.
    encoder = 24 * 1 * e * e + 2 * 1 * e * (8 + 1)
    global_ = (24 * 2 * g * g + 2 * 2 * g * (n / s + 1)) / s
    decoder = 24 * 2 * e * e + 2 * 2 * e * (8 + 1) + 2 * e * 256
    analytic = flops.analytic_flops_per_byte(config)
    assert analytic.encoder == pytest.approx(encoder)
    assert analytic.global_ == pytest.approx(global_)
    assert analytic.decoder == pytest.approx(decoder)
    assert analytic.encoder_cross == pytest.approx(2 * s * e * g / s)  # W_in once per patch
    assert analytic.decoder_cross == pytest.approx(2 * g * s * e / s)  # D once per patch
    assert analytic.train == pytest.approx(3 * (encoder + global_ + decoder + 4 * e * g))

    # bltjax's matmuls: 22 encoder positions, 7 patches; block = projections + scores + SwiGLU.
    def block(dim, keys, hidden=256):
        return 2 * dim * 4 * dim + 4 * dim * keys + 6 * dim * hidden

    def causal(length, window):
        return sum(min(i + 1, window) for i in range(length)) / length

    m, p = n + s - 1, 7
    matmul = flops.matmul_flops_per_byte(config)
    assert matmul.encoder == pytest.approx(m * block(e, causal(m, 8)) / n)
    assert matmul.global_ == pytest.approx(p * 2 * block(g, causal(p, p)) / n)
    assert matmul.decoder == pytest.approx(2 * block(e, causal(n, 8)) + 2 * e * 260)
    assert matmul.encoder_cross == pytest.approx(p * 2 * s * e * g / n)
    assert matmul.decoder_cross == pytest.approx(p * 2 * g * s * e / n)
    # What the traced forward multiplies lies between the useful count and every pair.
    model = build_model(config)
    inputs = example_inputs(config, batch_size=2)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))
    traced = flops.traced_matmul_flops(lambda q, *a: model.apply(q, *a), params, *inputs)
    dense = flops.matmul_flops_per_byte(config, dense_attention=True).total_forward * 2 * n
    assert matmul.total_forward * 2 * n <= traced <= dense

    # Parameters: blocks (QKVO + SwiGLU + 2 norms), W_in, D, final norm, embeddings, hash tables, head.
    counts = flops.parameter_counts(record)
    enc_block, lat_block = 4 * e * e + 3 * e * 256 + 2 * e, 4 * g * g + 3 * g * 256 + 2 * g
    assert counts["encoder"] == enc_block
    assert counts["decoder"] == 2 * enc_block + e
    assert counts["global"] == 2 * lat_block
    assert counts["global_input_projection"] == s * e * g == counts["decoder_patch_projection"]
    assert counts["hash_tables"] == 2 * 97 * e and counts["byte_embedding"] == counts["output_head"] == 260 * e
    shapes = parameter_shapes(config)
    assert counts["total"] == sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def test_flops_cli_prints_the_megabyte_table():
    from bltjax.flops import format_breakdown

    table = format_breakdown(load_config(f"{MEGABYTE}:sweep"))
    assert table.startswith("MegaByte, context 256 bytes, fixed patches of 4 bytes")
    assert "concatenation projection W_in" in table and "cross-attention" not in table


def test_scan_layers_computes_the_same_function():
    """The stacked layout (one `lax.scan` per stack) holds the same values and gives the same logits."""
    config = _small(3, 12)
    model, params = _init(config)
    tokens = _tokens(2, 12)
    stacked = jax.tree.map(lambda x: x, params)  # fresh dicts, shared leaves
    for side in ("local_encoder", "latent", "local_decoder"):
        stack = stacked[side]["transformer"]
        names = sorted((k for k in stack if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))
        stack["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *[stack.pop(k) for k in names])
    config.model.scan_layers = True
    scanned = build_model(config)
    expected = jax.eval_shape(lambda: scanned.init(jax.random.key(0), *example_inputs(config)))["params"]
    assert jax.tree.map(lambda x: x.shape, nn.meta.unbox(expected)) == jax.tree.map(lambda x: x.shape, stacked)
    np.testing.assert_allclose(
        np.asarray(scanned.apply({"params": stacked}, tokens)),
        np.asarray(model.apply({"params": params}, tokens)),
        atol=1e-5,
    )


def test_generation_is_refused_with_a_clear_error(tmp_path):
    from bltjax import checkpoints
    from bltjax.inference.generation import generate
    from bltjax.inference.generation.folders import GenerateError, generate_from_folder

    config = _small(3, 12)
    model, params = _init(config)
    with pytest.raises(TypeError, match="got MegaByte"):
        generate(model, params, config, ["hi"], max_bytes=2)
    folder = checkpoints.save_model(tmp_path / "model", config, params)
    with pytest.raises(GenerateError, match=r"--model: .* is a MegaByte baseline .* python -m bltjax.eval"):
        generate_from_folder(workdir=folder, prompts=["hi"], max_bytes=2, out=io.StringIO())


# --- sweeps -------------------------------------------------------------------------------------


def _megabyte_sweep(data: pathlib.Path):
    from bltjax.sweep import spec

    sweep = spec.load_sweep(str(REPO / "experiments" / "patch_sweep.py"))
    sweep.modes = ["static", "megabyte"]
    sweep.patch_sizes = [4.0, 8.0]
    sweep.baseline = ""
    sweep.data.path = str(data)
    return sweep


def test_sweep_plans_megabyte_next_to_static_blts_at_the_same_budget(tmp_path, corpus_data):
    from bltjax.sweep import plan

    result = plan.make_plan(_megabyte_sweep(corpus_data), tmp_path, log=io.StringIO())
    budget = result["budget"]["inference_flops_per_byte"]
    jobs = result["jobs"]
    assert [(j["kind"], j["patch_size"]) for j in jobs] == [
        ("blt", 4.0), ("blt", 8.0), ("megabyte", 4.0), ("megabyte", 8.0)
    ]  # fmt: skip
    base = load_config(f"{REPO / 'experiments' / 'patch_sweep.py'}:blt")
    for job in jobs[2:]:
        assert job["name"].startswith(f"megabyte-ps{job['patch_size']:g}-")
        assert job["fit"]["within_tolerance"], job["name"]
        assert job["flops_per_byte"]["total_forward"] == pytest.approx(budget, rel=0.05)
        config = ml_collections.ConfigDict(job["config"])
        assert config.model_type == "megabyte" and config.model.patch_size == int(job["patch_size"])
        assert config.model.encoder == base.model.encoder and config.model.decoder == base.model.decoder
        assert list(config.model.hash_sizes) == [] and "patching" not in config
        assert flops.analytic_flops_per_byte(config).total_forward == job["flops_per_byte"]["total_forward"]
    # The larger patch buys the larger latent model, as for the static BLTs.
    assert jobs[3]["parameters"]["global"] > jobs[2]["parameters"]["global"]


@pytest.mark.slow
def test_a_planned_megabyte_job_trains_and_reports_its_fixed_patch(tmp_path, corpus_data):
    from bltjax.sweep import job_config, plan, report
    from bltjax.training.trainer import train

    sweep = _megabyte_sweep(corpus_data)
    sweep.modes, sweep.patch_sizes = ["megabyte"], [4.0]
    made = plan.make_plan(sweep, tmp_path, log=io.StringIO())
    plan.write_plan(made, tmp_path)
    job = made["jobs"][0]
    config = job_config.get_config(str(plan.job_file(tmp_path, job["name"])))
    assert config.data.path == str(corpus_data)
    config.train.steps, config.train.log_every, config.train.eval_every = 3, 1, 3
    config.optimizer.warmup_steps = 1
    train(config, report.run_dir(tmp_path, job["name"]), console=io.StringIO())
    (row,) = report.gather(tmp_path)
    assert row.mode == "megabyte" and row.steps_done == 3 and row.final_bpb is not None
    assert row.realised_patch_size == 4.0
    assert row.inference_flops_per_byte == job["flops_per_byte"]["total_forward"]
