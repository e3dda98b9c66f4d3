"""FLOPs per byte (docs/architecture.md §14) and device peaks: the worked numbers of §14.3 and the matmul count."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import types

import jax
import pytest

from bltjax.config import load_config, model_config, stack_config
from bltjax.models import flops
from bltjax.models.configs import BLTConfig, ByteLMConfig, TransformerConfig
from bltjax.models.factory import build_model, example_inputs
from bltjax.runtime import peaks

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def _config(name: str):
    return load_config(str(EXPERIMENTS / name))


@pytest.fixture(scope="module")
def blt_1b() -> BLTConfig:
    return model_config(_config("blt_1b.py"))


# --- §14.3 worked numbers -----------------------------------------------------------------------


def test_blt_1b_components_at_patch_size_4_5(blt_1b):
    b = flops.blt_flops_per_byte(blt_1b, context_bytes=16384, mean_patch_size=4.5)
    expected = dict(global_=6.42e8, encoder=2.62e7, decoder=2.37e8, encoder_cross=6.1e6, decoder_cross=5.5e7)
    for name, value in expected.items():
        assert getattr(b, name) == pytest.approx(value, rel=0.01), name
    assert b.total_forward == pytest.approx(9.65e8, rel=0.01)
    assert b.train == pytest.approx(2.90e9, rel=0.01)
    assert b.train == pytest.approx(3 * b.total_forward)


@pytest.mark.parametrize("n_p, total, train", [(4.5, 9.65e8, 2.90e9), (6, 7.85e8, 2.35e9), (8, 6.56e8, 1.97e9)])
def test_blt_1b_totals(blt_1b, n_p, total, train):
    b = flops.blt_flops_per_byte(blt_1b, context_bytes=16384, mean_patch_size=n_p)
    assert b.total_forward == pytest.approx(total, rel=0.01)
    assert b.train == pytest.approx(train, rel=0.01)


def test_llama2_sanity_check():
    """A 470M non-embedding Llama-2 model: the paper's Table 2 says 3.1e8 inference FLOPs per byte."""
    assert flops.bpe_flops_per_byte(1280, 24, 32000, 8192, 3.7) == pytest.approx(3.14e8, rel=0.005)


def test_primitives_compose_as_written():
    h, layers, m, v = 512.0, 3.0, 100.0, 256.0
    assert flops.transformer_flops(h, layers, m, v) == 24 * layers * h**2 + 2 * layers * h * (m + 1) + 2 * h * v
    assert flops.attention_flops(layers, h, m) == 4 * layers * h * (m + 1) / 2
    assert flops.qkvo_flops(layers, h, 1) == 4 * 2 * layers * h**2
    assert flops.feed_forward_flops(layers, h) == 2 * layers * 2 * h * (4 * h)
    assert flops.cross_attention_flops(h, layers, m, 0.5) == flops.attention_flops(layers, h, m) + 3 * 2 * layers * h**2


def test_only_the_global_term_scales_with_patch_size(blt_1b):
    small = flops.blt_flops_per_byte(blt_1b, context_bytes=16384, mean_patch_size=4)
    large = flops.blt_flops_per_byte(blt_1b, context_bytes=16384, mean_patch_size=8)
    assert large.encoder == small.encoder and large.decoder == small.decoder
    assert large.global_ < small.global_ / 2  # 1/n_p and a shorter patch context
    assert large.total_forward < small.total_forward


def test_breakdown_as_dict(blt_1b):
    b = flops.blt_flops_per_byte(blt_1b, context_bytes=16384, mean_patch_size=4.5)
    d = b.as_dict()
    assert set(d) == {"global", "encoder", "decoder", "encoder_cross", "decoder_cross", "total_forward", "train"}
    assert d["train"] == b.train


# --- from experiment configs ----------------------------------------------------------------------


def test_analytic_from_config_uses_seq_len_and_patch_size(blt_1b):
    config = _config("blt_1b.py")
    expected = flops.blt_flops_per_byte(blt_1b, context_bytes=16384, mean_patch_size=4.5)
    assert flops.analytic_flops_per_byte(config) == expected
    override = flops.analytic_flops_per_byte(config, mean_patch_size=6)
    assert override.total_forward == pytest.approx(7.85e8, rel=0.01)


def test_patch_size_by_mode():
    config = _config("blt_tiny.py")
    config.patching.patch_size = 3.0
    assert flops.expected_patch_size(config) == 3.0  # space patching: the expected mean
    config.patching.mode = "byte"
    assert flops.expected_patch_size(config) == 1.0
    config.patching.mode = "space"
    config.patching.patch_size = None
    with pytest.raises(ValueError, match="config.patching.patch_size"):
        flops.analytic_flops_per_byte(config)
    assert flops.analytic_flops_per_byte(config, mean_patch_size=3.0).total_forward > 0


def test_byte_lm_analytic_uses_the_byte_head_and_the_window():
    full = _config("byte_lm.py:1b")  # no window: the whole 8 KiB row
    assert flops.analytic_flops_per_byte(full).total_forward == flops.transformer_flops(2048, 25, 8192, 256)
    windowed = _config("entropy_model.py:released")  # window 512 over 8 KiB rows
    assert flops.analytic_flops_per_byte(windowed).global_ == flops.transformer_flops(768, 14, 512, 256)


# --- the matmul count ----------------------------------------------------------------------------


def test_mean_causal_keys_matches_brute_force():
    for n, w in [(10, None), (10, 3), (10, 10), (10, 20), (1000, 512)]:
        brute = sum(min(i + 1, w or n) for i in range(n)) / n
        assert flops.mean_causal_keys(n, w) == pytest.approx(brute)


def _paper_stack(dim: int, layers: int, heads: int) -> TransformerConfig:
    """A stack the analytic formula describes exactly: MHA, full causal, SwiGLU of 16·h² FLOPs."""
    assert (8 * dim) % 3 == 0
    return TransformerConfig(dim=dim, n_layers=layers, n_heads=heads, ffn_hidden=8 * dim // 3)


def test_matmul_equals_analytic_for_a_paper_shaped_byte_lm():
    record = ByteLMConfig(stack=_paper_stack(96, 3, 4))
    analytic = flops.byte_lm_flops_per_byte(record, context_bytes=300)
    matmul = flops.byte_lm_matmul_flops_per_byte(record, context_bytes=300)
    assert matmul.total_forward == pytest.approx(analytic.total_forward + 2 * 96 * (260 - 256))


def test_matmul_differs_from_analytic_only_by_documented_terms():
    """Paper-shaped stacks: the differences are the head (260 vs 256), the E_C / D_C projections,
    and cross-attention scores (exactly n_p or k keys instead of the paper's (m + 1) / 2)."""
    e, g, k, n, n_p = 96, 192, 2, 384, 4.0
    record = BLTConfig(
        encoder=_paper_stack(e, 2, 4),
        latent=_paper_stack(g, 3, 4),
        decoder=_paper_stack(e, 3, 4),
        cross_attn_k=k,
        cross_attn_all_layers_encoder=True,
    )
    analytic = flops.blt_flops_per_byte(record, context_bytes=n, mean_patch_size=n_p)
    matmul = flops.blt_matmul_flops_per_byte(record, context_bytes=n, mean_patch_size=n_p)
    assert matmul.global_ == pytest.approx(analytic.global_)  # k·e == g: no input projection
    assert matmul.encoder == pytest.approx(analytic.encoder)
    assert matmul.decoder == pytest.approx(analytic.decoder + 2 * e * 4)
    l_e, l_d = 2, 3
    enc_scores = 4 * l_e * e * k - 2 * l_e * e * k * (n_p + 1) / n_p
    assert matmul.encoder_cross == pytest.approx(analytic.encoder_cross + 2 * e * k * e / n_p + enc_scores)
    dec_scores = 4 * l_d * e * k - 2 * l_d * e * (k + 1)
    assert matmul.decoder_cross == pytest.approx(analytic.decoder_cross + 2 * g * k * e / n_p + dec_scores)


def test_matmul_counts_gqa_swiglu_and_input_projection(blt_1b):
    gqa = dataclasses.replace(blt_1b, latent=dataclasses.replace(blt_1b.latent, n_kv_heads=4))
    kw = dict(context_bytes=16384, mean_patch_size=4.5)
    full, grouped = flops.blt_matmul_flops_per_byte(blt_1b, **kw), flops.blt_matmul_flops_per_byte(gqa, **kw)
    saved = 25 * 2 * 2048 * 2 * (2048 - 4 * 128) / 4.5  # K and V shrink from 16 to 4 heads
    assert full.global_ - grouped.global_ == pytest.approx(saved)
    wide = dataclasses.replace(blt_1b, cross_attn_k=4)  # 4·1024 != 2048: W_in appears
    assert flops.blt_matmul_flops_per_byte(wide, **kw).global_ - full.global_ == pytest.approx(
        2 * 4 * 1024 * 2048 / 4.5
    )


@pytest.mark.parametrize("experiment", ["byte_lm.py:tiny", "entropy_model.py:tiny", "blt_tiny.py"])
def test_traced_forward_lies_between_useful_and_dense_counts(experiment):
    """What the modules ask of the matmul units: at least the useful scores, at most every pair."""
    config = _config(experiment)
    model = build_model(config)
    inputs = example_inputs(config, batch_size=2)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))
    traced = flops.traced_matmul_flops(lambda p, *a: model.apply(p, *a), params, *inputs)
    n = config.data.seq_len
    kw = {} if config.model_type != "blt" else dict(mean_patch_size=n / config.data.max_patches)
    useful = flops.matmul_flops_per_byte(config, **kw).total_forward * 2 * n
    dense = flops.matmul_flops_per_byte(config, dense_attention=True, **kw).total_forward * 2 * n
    assert useful <= traced <= dense


def test_traced_matmul_flops_counts_scans_and_batched_dots():
    a = jax.ShapeDtypeStruct((3, 4, 5), "float32")
    b = jax.ShapeDtypeStruct((3, 5, 6), "float32")
    assert flops.traced_matmul_flops(lambda x, y: x @ y, a, b) == 2 * 3 * 4 * 5 * 6

    def scanned(x, y):
        return jax.lax.scan(lambda c, _: (c @ y, None), x, None, length=7)[0]

    sq = jax.ShapeDtypeStruct((8, 8), "float32")
    assert flops.traced_matmul_flops(scanned, sq, sq) == 7 * 2 * 8**3


def test_mfu():
    assert peaks.mfu(3e9, 1e5, 1e15) == pytest.approx(3e-1)


# --- device peaks ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, family",
    [
        ("TPU v4", "tpu_v4"),
        ("TPU v5 lite", "tpu_v5e"),
        ("TPU v5", "tpu_v5p"),
        ("TPU v6 lite", "tpu_v6e"),
        ("NVIDIA H100 80GB HBM3", "nvidia_h100_sxm"),
        ("NVIDIA H100 PCIe", "nvidia_h100_pcie"),
        ("NVIDIA H200", "nvidia_h200"),
        ("NVIDIA A100-SXM4-80GB", "nvidia_a100"),
        ("cpu", None),
        ("Some Future Chip", None),
    ],
)
def test_device_family(kind, family):
    assert peaks.device_family(kind) == family


def _fake_device(kind: str, platform: str = "gpu", process_index: int = 0):
    return types.SimpleNamespace(device_kind=kind, platform=platform, process_index=process_index)


def test_table_peaks():
    value, source = peaks.peak_flops_per_device(_fake_device("TPU v5 lite", "tpu"), "bfloat16")
    assert value == 197e12 and "cloud.google.com" in source
    value, _ = peaks.peak_flops_per_device(_fake_device("NVIDIA H100 80GB HBM3"), "bfloat16")
    assert value == 989.5e12
    total, _ = peaks.peak_flops_total([_fake_device("TPU v4", "tpu")] * 4, "bfloat16")
    assert total == 4 * 275e12


def test_float32_table_respects_matmul_precision():
    """conftest asks for "highest" float32 matmuls: that is not TF32, so the peak is measured."""
    with jax.default_matmul_precision("default"):
        value, source = peaks.peak_flops_per_device(_fake_device("NVIDIA A100-SXM4-40GB"), "float32")
        assert value == 156e12 and source.startswith("table")
    with jax.default_matmul_precision("highest"):
        _, source = peaks.peak_flops_per_device(_fake_device("NVIDIA A100-SXM4-40GB"), "float32")
        assert source.startswith("measured")


def test_cpu_peak_is_measured_once_per_host():
    devices = jax.devices()
    assert len(devices) == 8 and devices[0].platform == "cpu"  # conftest's fake devices
    one, source = peaks.peak_flops_per_device(devices[0], "float32")
    assert source.startswith("measured") and 1e9 < one < 1e14
    total, source = peaks.peak_flops_total(devices, "float32")
    assert total == one and "1 CPU host" in source
    assert peaks.measured_matmul_peak("float32") == peaks.measured_matmul_peak(jax.numpy.float32)  # cached


def test_positive_inputs_required(blt_1b):
    with pytest.raises(ValueError, match="mean_patch_size"):
        flops.blt_flops_per_byte(blt_1b, context_bytes=16384, mean_patch_size=0)
    assert math.isfinite(flops.blt_flops_per_byte(blt_1b, context_bytes=1, mean_patch_size=1).total_forward)


# --- parameter counts (docs/architecture.md §14.4) ----------------------------------------------------------------


def test_blt_1b_parameter_counts_match_spec(blt_1b):
    counts = flops.parameter_counts(blt_1b)
    expected = {  # as the spec writes them, rounded to its significant digits
        "encoder": "12.8e6",
        "global": "1.285e9",
        "decoder": "115.6e6",
        "encoder_cross": "4.2e6",
        "decoder_cross": "37.7e6",
        "encoder_patch_projection": "2.1e6",
        "decoder_patch_projection": "4.2e6",
        "byte_embedding": "0.27e6",
        "output_head": "0.27e6",
        "hash_tables": "3.07e9",
    }
    for name, text in expected.items():  # within one unit of the last written digit (norms: < 0.1%)
        mantissa, exponent = text.split("e")
        decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
        unit = 10.0 ** (int(exponent) - decimals)
        assert abs(counts[name] - float(text)) < unit, name
    assert counts["global"] == 1_284_608_000  # what `python -m bltjax.describe` prints for the latent
    assert counts["global_input_projection"] == 0  # k·h_E = 2 x 1024 = h_G
    assert counts["total"] == sum(v for k, v in counts.items() if k not in ("total", "non_embedding"))


def test_entropy_model_parameter_counts_match_spec():
    counts = flops.parameter_counts(model_config(_config("entropy_model.py:released")))
    assert counts["non_embedding"] == pytest.approx(99.1e6, rel=0.01)
    assert counts["byte_embedding"] + counts["output_head"] == pytest.approx(0.4e6, rel=0.01)


def _component_of(path: tuple[str, ...]) -> str:
    """The `parameter_counts` component of one Flax parameter path."""
    top, second = path[0], path[1] if len(path) > 1 else ""
    if top == "latent":
        return "global_input_projection" if second == "input_projection" else "global"
    if top in ("local_encoder", "local_decoder"):
        side = "encoder" if top == "local_encoder" else "decoder"
        if second.startswith("cross_attention"):
            return f"{side}_cross"
        if second == "patch_projection":
            return f"{side}_patch_projection"
        return {"byte_embedding": "byte_embedding", "hash_embedding": "hash_tables", "output": "output_head"}.get(
            second, side
        )
    return {"embedding": "byte_embedding", "output": "output_head"}.get(top, "global")  # byte LM


def _flax_counts(config) -> dict[str, int]:
    from bltjax.models.factory import parameter_shapes

    counts: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(parameter_shapes(config))[0]:
        name = _component_of(tuple(p.key for p in path))
        counts[name] = counts.get(name, 0) + math.prod(leaf.shape)
    return counts


def _odd_blt():
    """GQA, explicit head_dim, cross-attention heads, every encoder layer crossing, k·h_E != h_G."""
    config = _config("blt_tiny.py")
    config.model.latent.n_kv_heads = 2
    config.model.latent.head_dim = 48
    config.model.encoder.n_layers = 2
    config.model.cross_attn_all_layers_encoder = True
    config.model.cross_attn_heads = 2
    config.model.cross_attn_k = 3
    config.model.hash_rows_multiple = 7
    return config


@pytest.mark.parametrize("make", [lambda: _config("blt_tiny.py"), _odd_blt, lambda: _config("byte_lm.py:tiny")],
                         ids=["blt_tiny", "blt_odd", "byte_lm_tiny"])  # fmt: skip
def test_parameter_counts_equal_the_flax_shapes(make):
    config = make()
    counts = flops.parameter_counts(model_config(config))
    flax_counts = _flax_counts(config)
    assert {k: v for k, v in counts.items() if v and k not in ("total", "non_embedding")} == flax_counts
    assert counts["total"] == sum(flax_counts.values())


def test_paper_sizes_and_the_debug_config_have_the_documented_shapes():
    """docs/architecture.md §15.2's table (latent parameters computed from the dimensions) and §15.3's configs."""
    from bltjax.config import paper_blt_config

    table = {  # size: encoder (layers, heads, width), latent, latent parameters in billions, decoder, k
        "400m": ((1, 12, 768), (24, 10, 1280), 0.49, (7, 12, 768), 2),
        "1b": ((1, 16, 1024), (25, 16, 2048), 1.28, (9, 16, 1024), 2),
        "2b": ((1, 16, 1024), (26, 20, 2560), 2.06, (9, 16, 1024), 3),
        "4b": ((1, 16, 1024), (36, 24, 3072), 4.08, (9, 16, 1024), 3),
        "8b": ((1, 20, 1280), (32, 32, 4096), 6.48, (6, 20, 1280), 4),
    }
    for size, (encoder, latent, billions, decoder, k) in table.items():
        config = paper_blt_config(size)
        model = config.model
        for stack, expected in ((model.encoder, encoder), (model.latent, latent), (model.decoder, decoder)):
            assert (stack.n_layers, stack.n_heads, stack.dim) == expected, size
        assert model.cross_attn_k == k
        assert round(flops.parameter_counts(model_config(config))["global"] / 1e9, 2) == billions, size
        assert (model.dtype, config.data.seq_len, config.data.max_patches, config.data.batch_size) == (
            "bfloat16", 16384, 4096, 1024,
        )  # fmt: skip
    debug = _config("blt_debug.py")
    model = debug.model
    assert (model.latent.dim, model.latent.n_layers, model.latent.n_heads) == (512, 8, 8)
    for stack in (model.encoder, model.decoder):
        assert (stack.dim, stack.n_layers, stack.n_heads, stack.window) == (256, 8, 8, 512)
    assert (model.cross_attn_k, model.cross_attn_heads, model.pooling) == (8, 4, "max")
    assert model.cross_attn_all_layers_encoder and model.cross_attn_all_layers_decoder
    assert (model.cross_attn_window_encoder, model.cross_attn_window_decoder) == (512, 512)
    assert (list(model.hash_sizes), model.hash_functions, model.hash_vocab) == ([4], 3, 50002)
    assert (debug.patching.mode, debug.patching.patch_size, debug.data.seq_len) == ("space", 6, 12288)
    tiny = _config("blt_tiny.py")
    assert (tiny.model.encoder.dim, tiny.model.latent.dim) == (64, 128)
    assert (tiny.patching.mode, tiny.data.seq_len) == ("space", 128)


# --- token-level baseline -------------------------------------------------------------------------


def test_token_llama_per_byte_is_the_paper_bpe_formula():
    stack = TransformerConfig(dim=1280, n_layers=24, n_heads=10)
    token = flops.token_lm_flops_per_byte(stack, context_bytes=8192, bytes_per_token=3.7, vocab=32000)
    assert token.total_forward == pytest.approx(3.14e8, rel=0.005)  # docs/architecture.md §14.3, Table 2's 3.1e8
    assert token.total_forward == flops.bpe_flops_per_byte(1280, 24, 32000, 8192, 3.7)
    longer = flops.token_lm_flops_per_byte(stack, context_bytes=8192, bytes_per_token=4.4, vocab=32000)
    assert longer.total_forward < token.total_forward  # fewer, longer tokens per byte
    with pytest.raises(ValueError, match="bytes_per_token"):
        flops.token_lm_flops_per_byte(stack, context_bytes=8192, bytes_per_token=0, vocab=32000)


def test_realised_static_patch_size():
    assert flops.realised_static_patch_size(128, 4) == pytest.approx(129 / 33)
    lengths = flops.static_patch_lengths(10, 4, max_patches=5)
    assert lengths.tolist() == [[1, 4, 4, 2, 0]] and lengths.sum() == 11
    assert flops.realised_static_patch_size(10, 4) == pytest.approx(11 / 4)
    with pytest.raises(ValueError, match="config.data.max_patches"):
        flops.static_patch_lengths(10, 4, max_patches=3)


# --- agreement with XLA's own count -----------------------------------------------------------------


def _paper_shaped_byte_lm():
    config = _config("byte_lm.py:tiny")
    config.model.stack = stack_config(192, 2, 4, ffn_hidden=192 * 8 // 3)
    config.data.seq_len = 64
    return config


def _paper_shaped_blt():
    """MHA stacks with SwiGLU 8h/3 (the paper's 16·h² FFN), static patches of 4, no padded patch columns."""
    config = _config("blt_tiny.py")
    config.model.encoder = stack_config(96, 1, 4, window=32, ffn_hidden=256)
    config.model.latent = stack_config(192, 2, 4, ffn_hidden=512)
    config.model.decoder = stack_config(96, 2, 4, window=32, ffn_hidden=256)
    config.patching.mode = "static"
    config.patching.patch_size = 4
    config.data.seq_len = 128
    config.data.max_patches = 33  # exactly 1 + 128 / 4: XLA counts every patch column it computes
    return config


def test_analytic_forward_agrees_with_xla_for_a_byte_lm():
    config = _paper_shaped_byte_lm()
    xla = flops.xla_flops_per_byte(config)
    assert flops.analytic_flops_per_byte(config).total_forward == pytest.approx(xla, rel=0.10)
    assert flops.matmul_flops_per_byte(config).total_forward == pytest.approx(xla, rel=0.10)


@pytest.mark.slow
def test_analytic_forward_and_training_agree_with_xla_for_a_blt():
    config = _paper_shaped_blt()
    n_p = flops.realised_static_patch_size(128, 4)
    analytic = flops.analytic_flops_per_byte(config, mean_patch_size=n_p)
    xla_forward = flops.xla_flops_per_byte(config)
    assert analytic.total_forward == pytest.approx(xla_forward, rel=0.10)
    assert flops.matmul_flops_per_byte(config, mean_patch_size=n_p).total_forward == pytest.approx(
        xla_forward, rel=0.10
    )
    xla_train = flops.xla_flops_per_byte(config, train=True)
    assert xla_train == pytest.approx(3 * xla_forward, rel=0.05)  # backward = 2 x forward (docs/architecture.md §14.1)
    assert analytic.train == pytest.approx(xla_train, rel=0.10)


@pytest.mark.slow
def test_xla_counts_padded_patch_columns():
    """Why the comparison needs tight max_patches: the latent runs over every column."""
    config = _paper_shaped_blt()
    tight = flops.xla_flops_per_byte(config)
    config.data.max_patches = 64
    assert flops.xla_flops_per_byte(config) > 1.2 * tight


# --- the command line -----------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_prints_the_breakdown_table():
    import subprocess
    import sys

    repo = EXPERIMENTS.parent
    result = subprocess.run(
        [sys.executable, "-m", "bltjax.flops", "--config", "experiments/blt_1b.py", "--patch-size", "4.5",
         "--bytes-per-token", "3.7"],
        cwd=repo, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "mean patch size 4.5 bytes (from --patch-size)" in out
    assert "| global (latent) | 6.421e+08 | 66.5% |" in out
    assert "| **total** | **9.654e+08** | 100% | **2.896e+09** |" in out
    assert "| hash n-gram tables | 0 | 0.0% | 0 | 0 | 3,072,012,288 |" in out
    assert "token-level Llama, 3.7 bytes/token, vocab 32000" in out
    bad = subprocess.run(
        [sys.executable, "-m", "bltjax.flops", "--config", "experiments/blt_tiny.py", "--patch-size", "0"],
        cwd=repo, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode != 0 and "mean_patch_size" in bad.stderr
