"""Model behaviour: causality, document masks, padding, RoPE convention, GQA, sizes."""

import dataclasses
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bltjax import tokenizer
from bltjax.config import ConfigError, load_config, validate
from bltjax.describe import count_parameters
from bltjax.kernels.dense import attend
from bltjax.models.blt import BLT
from bltjax.models.byte_lm import next_byte_entropy
from bltjax.models.factory import build_model, parameter_shapes
from bltjax.models.layers import apply_rope

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def tiny(name: str = "blt_tiny.py"):
    return load_config(str(EXPERIMENTS / name))


@pytest.fixture(scope="module")
def blt_tiny():
    config = tiny()
    model = build_model(config)
    text = "Causality: the logits of byte i never look at byte i + 1."
    tokens = tokenizer.encode(text)[None, :48].astype(np.int32)
    lengths = np.array([[1, 5, 3, 9, 1, 12, 7, 11, 0, 0]], np.int32)  # N + 1 = 49, padded
    params = jax.jit(model.init)(jax.random.key(0), tokens, lengths)["params"]
    apply = jax.jit(lambda p, t, lengths: model.apply({"params": p}, t, lengths))
    return model, params, apply, tokens, lengths


def test_blt_is_causal(blt_tiny):
    _, params, apply, tokens, lengths = blt_tiny
    base = np.asarray(apply(params, tokens, lengths))
    assert np.isfinite(base).all()
    for j in [1, 5, 6, 17, 18, 30, 47]:  # inside patches and on both sides of boundaries
        changed = tokens.copy()
        changed[0, j] = 4 + (int(changed[0, j]) + 17) % 256
        out = np.asarray(apply(params, changed, lengths))
        np.testing.assert_array_equal(out[0, :j], base[0, :j], err_msg=f"position < {j} saw byte {j}")
        assert not np.allclose(out[0, j:], base[0, j:]), "perturbing a byte should change later logits"


def test_byte_lm_is_causal_and_entropy_is_bounded():
    config = tiny("entropy_model.py:tiny")
    model = build_model(config)
    tokens = tokenizer.encode("entropy models predict the next byte")[None].astype(np.int32)
    params = jax.jit(model.init)(jax.random.key(1), tokens)["params"]
    apply = jax.jit(lambda p, t: model.apply({"params": p}, t))
    base = np.asarray(apply(params, tokens))
    for j in [1, 9, 20, tokens.shape[1] - 1]:
        changed = tokens.copy()
        changed[0, j] = 4 + (int(changed[0, j]) + 1) % 256
        np.testing.assert_array_equal(np.asarray(apply(params, changed))[0, :j], base[0, :j])
    entropy = np.asarray(next_byte_entropy(base))
    assert (entropy >= 0).all() and (entropy <= math.log(260) + 1e-4).all()


def _two_documents(document_mask: bool):
    config = tiny()
    config.model.document_mask = document_mask
    model = build_model(config)
    first = tokenizer.encode("first document, long enough to matter.")  # BOS ... EOS
    second = tokenizer.encode("second one")
    tokens = np.concatenate([first, second])[None].astype(np.int32)
    lengths = np.array([[1, 10, 10, first.size - 21, 1, second.size]], np.int32)  # EOS ends patch 3
    params = jax.jit(model.init)(jax.random.key(0), tokens, lengths)["params"]
    return model, params, tokens, lengths, first.size


@pytest.mark.parametrize("document_mask", [True, False])
def test_documents_are_isolated_only_with_document_masks(document_mask):
    model, params, tokens, lengths, split = _two_documents(document_mask)
    apply = jax.jit(lambda t: model.apply({"params": params}, t, lengths))
    base = np.asarray(apply(tokens))
    changed = tokens.copy()
    changed[0, 3] = 4 + ord("#")  # far from the boundary: no hash window reaches the 2nd document
    out = np.asarray(apply(changed))
    same = np.allclose(out[0, split:], base[0, split:], atol=1e-6)
    assert same == document_mask


@pytest.mark.slow
def test_padding_gives_finite_values_and_gradients(blt_tiny):
    model, params, _, tokens, lengths = blt_tiny
    batch_tokens = np.concatenate([tokens, tokens])
    batch_lengths = np.concatenate([lengths, np.array([[1, 47, 1, 0, 0, 0, 0, 0, 0, 0]], np.int32)])

    def loss(p):
        logits = model.apply({"params": p}, batch_tokens, batch_lengths)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(float(value))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_ambiguous_padded_row_warns_and_reads_first_zero_as_empty_last_patch(blt_tiny):
    """A row adding up to N with two zero columns: the model warns, and its last byte reads the
    global output of its last real patch, as the row with the next token in a patch of its own
    (docs/architecture.md §3.3)."""
    from bltjax.models.patch_ids import AmbiguousPaddingWarning

    model, params, apply, tokens, _ = blt_tiny
    ambiguous = np.array([[1, 5, 3, 9, 1, 12, 7, 10, 0, 0]], np.int32)  # adds up to N = 48
    explicit = np.array([[1, 5, 3, 9, 1, 12, 7, 10, 1, 0]], np.int32)  # N + 1, token N opens a patch
    continued = np.array([[1, 5, 3, 9, 1, 12, 7, 11, 0, 0]], np.int32)  # N + 1, token N continues it
    with pytest.warns(AmbiguousPaddingWarning, match="row 0 adds up to N = 48 and has 2 zero columns"):
        got = np.asarray(model.apply({"params": params}, tokens, ambiguous))
    np.testing.assert_allclose(got, np.asarray(apply(params, tokens, explicit)), rtol=1e-5, atol=1e-5)
    assert not np.allclose(got[0, -1], np.asarray(apply(params, tokens, continued))[0, -1])


@pytest.mark.parametrize("implementation", ["dense", "xla_blockwise"])
def test_attention_implementations_give_the_same_blt_logits(blt_tiny, implementation):
    """``model.attention`` picks how attention is computed, never what: the logits of "auto"."""
    model, params, apply, tokens, lengths = blt_tiny
    other = BLT(dataclasses.replace(model.config, attention=implementation))
    assert model.config.attention == "auto"
    out = jax.jit(lambda p: other.apply({"params": p}, tokens, lengths))(params)
    np.testing.assert_allclose(np.asarray(out), np.asarray(apply(params, tokens, lengths)), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("field, value", [("attention", "flash"), ("remat", "sometimes")])
@pytest.mark.parametrize("name", ["blt_tiny.py", "entropy_model.py:tiny"])
def test_bad_attention_or_remat_is_rejected_naming_the_field(name, field, value):
    config = tiny(name)
    validate(config)
    config.model[field] = value
    with pytest.raises(ConfigError, match=rf"^config\.model\.{field}: expected one of .*got '{value}'"):
        validate(config)


def test_rope_rotates_adjacent_pairs():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 3, 1, 8)), jnp.float32)
    positions = jnp.array([[0, 1, 7]])
    out = np.asarray(apply_rope(x, positions, theta=100.0))
    xs = np.asarray(x)
    for t, s in enumerate([0, 1, 7]):
        for m in range(4):
            w = 100.0 ** (-2 * m / 8)
            a, b = xs[0, t, 0, 2 * m], xs[0, t, 0, 2 * m + 1]
            expected = [a * np.cos(s * w) - b * np.sin(s * w), a * np.sin(s * w) + b * np.cos(s * w)]
            np.testing.assert_allclose(out[0, t, 0, 2 * m : 2 * m + 2], expected, rtol=1e-5, atol=1e-6)


def test_grouped_query_attention_equals_repeated_heads():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 5, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 5, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 5, 2, 8)), jnp.float32)
    mask = jnp.tril(jnp.ones((5, 5), bool))[None].repeat(2, 0)
    grouped = attend(q, k, v, mask)
    repeated = attend(q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2), mask)
    np.testing.assert_allclose(np.asarray(grouped), np.asarray(repeated), rtol=1e-5, atol=1e-6)
    empty = attend(q, k, v, jnp.zeros((2, 5, 5), bool))
    np.testing.assert_array_equal(np.asarray(empty), 0.0)  # no key: zero output, not NaN


def test_bfloat16_compute_gives_float32_logits_close_to_float32(blt_tiny):
    model, params, apply, tokens, lengths = blt_tiny
    bf16 = BLT(dataclasses.replace(model.config, dtype="bfloat16"))
    out = jax.jit(lambda p: bf16.apply({"params": p}, tokens, lengths))(params)
    assert out.dtype == jnp.float32
    ref = np.asarray(apply(params, tokens, lengths))
    assert np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref)) < 0.05


def test_blt_1b_parameter_counts_match_spec():
    """Spec §14.4: global 1.285B, hash tables 3.07B, local encoder 19.4M, decoder 157.8M."""
    counts = count_parameters(parameter_shapes(tiny("blt_1b.py")))
    assert counts["latent"] == 25 * (4 * 2048**2 + 3 * 2048 * 5632 + 2 * 2048)  # + two norms a block
    assert counts["hash_embedding"] == 6 * 500002 * 1024
    block = 4 * 1024**2 + 3 * 1024 * 2816
    cross = 4 * 1024**2 + 2 * 1024
    byte_table = 260 * 1024
    assert counts["local_encoder"] == block + 2 * 1024 + cross + 1024 * 2048 + byte_table
    assert counts["local_decoder"] == 9 * (block + 2 * 1024 + cross) + 2048 * 2048 + 1024 + byte_table
    assert abs(counts["latent"] / 1.285e9 - 1) < 0.001


def test_released_entropy_model_size():
    counts = count_parameters(parameter_shapes(tiny("entropy_model.py:released")))
    non_embedding = counts["total"] - 2 * 260 * 768
    assert abs(non_embedding / 99.1e6 - 1) < 0.002


def test_swiglu_hidden_width_table():
    """docs/architecture.md §5.5: the Llama SwiGLU width rule gives the table's hidden widths."""
    from bltjax.models.configs import TransformerConfig, swiglu_hidden_dim

    table = {768: 2048, 1024: 2816, 1280: 3584, 2048: 5632, 2560: 6912, 3072: 8192, 4096: 11008}
    assert {dim: swiglu_hidden_dim(dim) for dim in table} == table
    assert TransformerConfig(1024, 1, 16).hidden_dim == 2816  # a stack without ffn_hidden uses the rule


def _small_blt_config(**changes):
    from bltjax.models.configs import BLTConfig, TransformerConfig

    return BLTConfig(
        encoder=TransformerConfig(64, 1, 4, window=8),
        latent=TransformerConfig(96, 1, 4),  # k * h_E = 128 != h_G: W_in exists
        decoder=TransformerConfig(64, 1, 4, window=8),
        hash_sizes=(3, 4),
        hash_vocab=500,
        **changes,
    )


def test_initial_weights_follow_the_init_table():
    """docs/architecture.md §12 (init_std_factor "disabled"): each weight's σ, truncation at 3σ, norm gains 1."""
    from flax import linen as nn

    from bltjax.models.byte_lm import ByteLM
    from bltjax.models.configs import ByteLMConfig, TransformerConfig

    e, g, k, hidden = 64, 96, 2, 256  # hidden = swiglu_hidden_dim(64) = swiglu_hidden_dim(96)
    tokens, lengths = np.ones((1, 8), np.int32), np.array([[1, 8]], np.int32)
    blt = nn.meta.unbox(jax.jit(BLT(_small_blt_config()).init)(jax.random.key(0), tokens, lengths)["params"])
    byte_lm = ByteLM(ByteLMConfig(stack=TransformerConfig(e, 1, 4)))
    entropy_model = nn.meta.unbox(jax.jit(byte_lm.init)(jax.random.key(1), tokens)["params"])

    def sigma(path: tuple[str, ...]) -> float:
        module = path[-2] if len(path) > 1 else ""
        if module == "down":  # W2 of the FFN
            return hidden**-0.5
        if module == "input_projection":  # W_in
            return (k * e) ** -0.5
        if module == "patch_projection":  # E_C, D_C
            return (g if path[0] == "local_decoder" else e) ** -0.5
        return (g if path[0] == "latent" else e) ** -0.5  # embeddings, tables, q k v o, W1 W3, output heads

    checked = 0
    for tree in (blt, entropy_model):
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            path, values = tuple(p.key for p in key_path), np.asarray(leaf)
            if path[-1] == "scale":
                np.testing.assert_array_equal(values, 1.0, err_msg="/".join(path))
                continue
            std = sigma(path)
            assert np.abs(values).max() <= 3 * std * (1 + 1e-6), "/".join(path)
            # the standard deviation of a normal truncated at ±3σ is 0.98658 σ
            assert values.std() == pytest.approx(0.98658 * std, rel=0.06), "/".join(path)
            checked += 1
    assert checked == 8 + 14 + 13 + 9  # latent, local encoder, local decoder, byte LM: every weight but the gains


def test_encoder_switches_for_the_paper_description():
    """docs/architecture.md §4.2 and §6.3, read from the sown intermediates: the double cross-attention residual
    adds the initial slots Z_0 once more, Z_0 pools the hidden states ("hidden") or the embeddings ("embedding"),
    and hash_normalize divides the input embedding by #sizes + 1."""
    from flax import linen as nn

    from bltjax.models.local_encoder import pool_patches
    from bltjax.models.patch_ids import patch_ids

    tokens = tokenizer.encode("switches of the paper")[None].astype(np.int32)  # N = 23
    lengths = np.array([[1, 7, 9, 7, 0]], np.int32)  # N + 1, one padding patch
    params = jax.jit(BLT(_small_blt_config()).init)(jax.random.key(0), tokens, lengths)["params"]

    def run(**changes) -> dict[str, np.ndarray]:
        model = BLT(_small_blt_config(**changes))
        _, state = jax.jit(lambda p: model.apply({"params": p}, tokens, lengths, mutable=["intermediates"]))(params)
        flat = jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]
        return {path[-2].key: np.asarray(value) for path, value in flat}

    kernel = np.asarray(nn.meta.unbox(params)["local_encoder"]["patch_projection"]["kernel"])  # E_C: [h_E, k * h_E]
    pid = patch_ids(jnp.asarray(lengths), tokens.shape[1])

    def initial_slots(source: np.ndarray) -> np.ndarray:  # Z_0 = E_C max-pool(source), [B, P, k * h_E]
        return np.asarray(pool_patches(jnp.asarray(source), pid, lengths.shape[1], "max")) @ kernel

    double, single = run(), run(double_cross_attn_residual=False)
    np.testing.assert_allclose(
        double["encoder_patch_embeds"] - single["encoder_patch_embeds"],
        initial_slots(double["encoder_hidden"]),
        atol=1e-5,
    )
    paper = dict(patch_query_init="embedding", hash_normalize=True)
    paper_double, paper_single = run(**paper), run(**paper, double_cross_attn_residual=False)
    np.testing.assert_allclose(paper_double["encoder_input_embeds"], double["encoder_input_embeds"] / 3, rtol=1e-5)
    np.testing.assert_allclose(
        paper_double["encoder_patch_embeds"] - paper_single["encoder_patch_embeds"],
        initial_slots(paper_double["encoder_input_embeds"]),
        atol=1e-5,
    )
