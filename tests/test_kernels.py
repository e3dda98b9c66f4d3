"""The fast attention paths equal the dense masked ones; remat and padded hash tables change nothing.

Blockwise sliding-window self-attention, the gathered own-patch encoder cross-attention and the
decoder's gathered k-slot cross-attention are checked against `attend` with the dense mask
(values and gradients); `remat="block"` against no remat; hash tables padded to a row multiple
against unpadded ones (and the HF export).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bltjax.convert import hf
from bltjax.models.blt import BLT
from bltjax.models.byte_lm import ByteLM
from bltjax.models.configs import BLTConfig, ByteLMConfig, TransformerConfig
from bltjax.models.hash_embed import HashNgramEmbedding
from bltjax.models.layers import (
    CAUSAL_GROUPS,
    Transformer,
    _attend_gathered,
    _Blocks,
    attend,
    attend_own_patch,
    blockwise_local_attend,
    blockwise_pays,
    causal_self_attend,
    contract,
    default_block_size,
    eos_segment_ids,
    local_causal_mask,
    positions_like,
)
from bltjax.models.local_encoder import encoder_cross_attn_mask
from bltjax.models.patch_ids import decoder_patch_ids, patch_ids, with_next_token


def _qkv(seed: int, b: int, t: int, s: int, h: int, kv: int, d: int = 8):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, t, h, d))
    k = jax.random.normal(keys[1], (b, s, kv, d))
    v = jax.random.normal(keys[2], (b, s, kv, d))
    return q, k, v


def _values_and_grads(f, cotangent, *args):
    """f(*args) and the gradient of sum(f * cotangent) with respect to every argument, jitted."""

    def run(*args):
        out, vjp = jax.vjp(f, *args)
        return out, vjp(cotangent)

    return jax.jit(run)(*args)


def _autodiff_attend(q, k, v, mask):
    """The plain formula, differentiated by JAX: the reference for the custom backward pass."""
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k) / np.sqrt(d)
    visible = mask[:, None, None]
    probs = jax.nn.softmax(jnp.where(visible, scores, -1e30), axis=-1)
    probs = jnp.where(visible.any(axis=-1, keepdims=True), probs, 0.0)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)


@pytest.mark.parametrize("heads, kv_heads, window", [(4, 4, None), (4, 2, 6), (2, 1, 3)])
def test_attention_backward_equals_autodiff(heads, kv_heads, window):
    """`attend` and the blockwise path recompute scores in their backward pass: same gradients.

    Segments, a window and one query row with no visible key at all (its output and every
    gradient through it must be 0) are included.
    """
    t = 29
    q, k, v = _qkv(7 + heads, 2, t, t, heads, kv_heads)
    positions = positions_like(q[..., 0, 0])
    segments = _segments(5, 2, t, 0.2)
    mask = local_causal_mask(positions, segments, window).at[1, 4].set(False)  # query 4 of row 1: no key
    cotangent = jax.random.normal(jax.random.key(2), q.shape)
    want, want_grads = _values_and_grads(lambda q, k, v: _autodiff_attend(q, k, v, mask), cotangent, q, k, v)
    got, got_grads = _values_and_grads(lambda q, k, v: attend(q, k, v, mask), cotangent, q, k, v)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-6)
    assert not np.any(got[1, 4])
    for want_grad, got_grad in zip(want_grads, got_grads, strict=True):
        np.testing.assert_allclose(got_grad, want_grad, atol=1e-5, rtol=1e-5)
    if window is not None:
        reference = local_causal_mask(positions, segments, window)
        want, want_grads = _values_and_grads(lambda q, k, v: _autodiff_attend(q, k, v, reference), cotangent, q, k, v)
        blockwise = _values_and_grads(
            lambda q, k, v: blockwise_local_attend(q, k, v, positions, segments, window, 4), cotangent, q, k, v
        )
        np.testing.assert_allclose(blockwise[0], want, atol=2e-6, rtol=1e-6)
        for want_grad, got_grad in zip(want_grads, blockwise[1], strict=True):
            np.testing.assert_allclose(got_grad, want_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("x_shape, kernel_shape, n_in", [((2, 5, 6), (6, 3, 4), 1), ((2, 5, 3, 4), (3, 4, 6), 2)])
def test_contract_gradients_equal_autodiff(x_shape, kernel_shape, n_in):
    """`Linear`'s hand-written backward pass equals autodiff of the same tensordot."""
    keys = jax.random.split(jax.random.key(4), 3)
    x, kernel = jax.random.normal(keys[0], x_shape), jax.random.normal(keys[1], kernel_shape)
    want, want_vjp = jax.vjp(lambda x, k: jnp.tensordot(x, k, axes=n_in), x, kernel)
    got, got_vjp = jax.vjp(lambda x, k: contract(x, k, n_in), x, kernel)
    cotangent = jax.random.normal(keys[2], want.shape)
    np.testing.assert_array_equal(got, want)
    for want_grad, got_grad in zip(want_vjp(cotangent), got_vjp(cotangent), strict=True):
        assert got_grad.shape == want_grad.shape
        np.testing.assert_allclose(got_grad, want_grad, atol=1e-5, rtol=1e-5)


def _segments(seed: int, b: int, t: int, eos_rate: float) -> jax.Array:
    is_end = np.random.default_rng(seed).random((b, t)) < eos_rate
    return eos_segment_ids(jnp.asarray(is_end))


@pytest.mark.parametrize(
    "t, window, block, heads, kv_heads, eos_rate",
    [
        (37, 8, None, 4, 4, 0.0),  # T not a multiple of the block
        (64, 16, 8, 4, 2, 0.1),  # window spans two previous blocks; GQA
        (50, 12, 5, 2, 1, 0.3),  # window not a multiple of the block; MQA; many documents
        (40, 1, None, 2, 2, 0.0),  # only itself
        (33, 7, 32, 2, 2, 0.05),  # block larger than the window
        (37, None, 4, 4, 2, 0.1),  # full causal (the latent transformer's path), T not a multiple
        (50, None, 8, 2, 1, 0.0),  # full causal, MQA
        (100, None, 4, 2, 2, 0.05),  # full causal over 25 blocks: groups of 4, the last of 1
    ],
)
def test_blockwise_local_attention_equals_dense(t, window, block, heads, kv_heads, eos_rate):
    q, k, v = _qkv(t + (window or 0), 2, t, t, heads, kv_heads)
    positions = positions_like(q[..., 0, 0])
    segments = _segments(t, 2, t, eos_rate) if eos_rate else None
    cotangent = jax.random.normal(jax.random.key(1), q.shape)

    def dense(q, k, v):
        return attend(q, k, v, local_causal_mask(positions, segments, window))

    def blockwise(q, k, v):
        return blockwise_local_attend(q, k, v, positions, segments, window, block)

    (want, want_grads), (got, got_grads) = (_values_and_grads(f, cotangent, q, k, v) for f in (dense, blockwise))
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-6)
    for want_grad, got_grad in zip(want_grads, got_grads, strict=True):
        np.testing.assert_allclose(got_grad, want_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t, window, block", [(912, None, 128), (100, None, 4), (37, None, 4), (4096, 512, 128)])
def test_block_groups_cover_every_query_block_with_its_keys(t, window, block):
    layout = _Blocks.of(t, window, block, 16)
    n_blocks = -(-t // block)
    covered = [i for first, count, _ in layout.groups for i in range(first, first + count)]
    assert covered == list(range(n_blocks))
    for first, count, key_blocks in layout.groups:
        last = first + count - 1
        needed = last + 1 if window is None else min(last, layout.n_prev) + 1
        assert needed <= key_blocks <= layout.n_prev + 1  # every visible key, never past the padding
        assert layout.key_start(first, key_blocks) >= 0
    if window is None:  # full causal: no more than (G + 1) / 2G of the square, plus one block per group
        read = sum(count * key_blocks for _, count, key_blocks in layout.groups)
        assert read <= n_blocks * n_blocks * (CAUSAL_GROUPS + 1) / (2 * CAUSAL_GROUPS) + n_blocks


def test_dispatch_uses_blockwise_past_one_block():
    assert blockwise_pays(4096, 512) and blockwise_pays(4096, None) and blockwise_pays(129, None)
    assert not blockwise_pays(128, None) and not blockwise_pays(128, 512) and not blockwise_pays(16, 16)
    assert blockwise_pays(24, 16)  # blocks of 16 (the window)
    q, k, v = _qkv(3, 1, 24, 24, 2, 2)
    positions = positions_like(q[..., 0, 0])
    for window in (None, 5, 16, 24, 40):
        want = jax.jit(lambda q, k, v, w=window: attend(q, k, v, local_causal_mask(positions, None, w)))(q, k, v)
        got = jax.jit(lambda q, k, v, w=window: causal_self_attend(q, k, v, positions, None, w))(q, k, v)
        np.testing.assert_allclose(got, want, atol=2e-6)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2)])
def test_own_patch_cross_attention_equals_dense(heads, kv_heads):
    # Row 0 adds up to N, row 1 to N + 1; both end in empty (zero-length) padding patches.
    n, k = 23, 2
    lengths = jnp.array([[1, 3, 2, 7, 1, 4, 5, 0, 0], [1, 1, 9, 13, 0, 0, 0, 0, 0]])
    pid = patch_ids(lengths, n)
    p = lengths.shape[1]
    q, keys, v = _qkv(7, 2, p * k, n, heads, kv_heads)
    cotangent = jax.random.normal(jax.random.key(2), q.shape)

    def dense(q, keys, v):
        return attend(q, keys, v, encoder_cross_attn_mask(pid, p, k, 1))

    def gathered(q, keys, v):
        return attend_own_patch(q, keys, v, pid, k)

    (want, want_grads), (out, got_grads) = (_values_and_grads(f, cotangent, q, keys, v) for f in (dense, gathered))
    np.testing.assert_allclose(out, want, atol=2e-6, rtol=1e-6)
    empty = np.asarray(lengths) == 0
    assert np.all(np.asarray(out).reshape(2, p, k, -1)[empty] == 0)
    for want_grad, got_grad in zip(want_grads, got_grads, strict=True):
        np.testing.assert_allclose(got_grad, want_grad, atol=1e-5, rtol=1e-5)
        assert np.isfinite(np.asarray(got_grad)).all()


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2)])
def test_decoder_gathered_cross_attention_equals_dense(heads, kv_heads):
    # Each byte sees the k slots of its decoder patch; row 1 ends in empty padding patches.
    n, k = 23, 2
    lengths = with_next_token(jnp.array([[1, 3, 2, 7, 1, 4, 5, 0, 0], [1, 1, 9, 13, 0, 0, 0, 0, 0]]), n)
    dpid = decoder_patch_ids(lengths, n)
    p = lengths.shape[1]
    q, keys, v = _qkv(8, 2, n, p * k, heads, kv_heads)
    cotangent = jax.random.normal(jax.random.key(3), q.shape)
    slot_patch = jnp.arange(p * k) // k

    def dense(q, keys, v):
        return attend(q, keys, v, slot_patch[None, None, :] == dpid[:, :, None])

    def gathered(q, keys, v):
        return _attend_gathered(q, keys, v, dpid[:, :, None] * k + jnp.arange(k))

    (want, want_grads), (out, got_grads) = (_values_and_grads(f, cotangent, q, keys, v) for f in (dense, gathered))
    np.testing.assert_allclose(out, want, atol=2e-6, rtol=1e-6)
    for want_grad, got_grad in zip(want_grads, got_grads, strict=True):
        np.testing.assert_allclose(got_grad, want_grad, atol=1e-5, rtol=1e-5)


def _tiny_blt(layers: int = 2, **kw) -> BLTConfig:
    return BLTConfig(
        encoder=TransformerConfig(32, 1, 4, window=8),
        latent=TransformerConfig(48, layers, 4),
        decoder=TransformerConfig(32, layers, 2, window=8),
        hash_sizes=(3, 4),
        hash_vocab=97,
        **kw,
    )


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 260, (2, 40)).astype(np.int32)
    tokens[:, 0] = 1
    tokens[0, 17] = 2  # an EOS: two documents in row 0
    lengths = np.array([[1, 6, 9, 5, 8, 12, 0], [1, 4, 4, 4, 4, 4, 20]], np.int32)  # N + 1 = 41
    return tokens, lengths


def _random_params(model, *args) -> dict:
    """Random parameters of the model's tree (Linen init compiles slowly on CPU; this is instant)."""
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *args)["params"])
    leaves, tree = jax.tree.flatten(shapes)
    rng = np.random.default_rng(0)
    return jax.tree.unflatten(tree, [jnp.asarray(rng.normal(0, 0.3, leaf.shape), leaf.dtype) for leaf in leaves])


def _loss_and_grads(model, params, *args):
    targets = jnp.roll(jnp.asarray(args[0]), -1, axis=1)

    def loss(p):
        logits = model.apply({"params": p}, *args)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1))

    return jax.jit(jax.value_and_grad(loss))(params)


def _shapes_and_names(model, *args):
    return jax.tree.map(lambda x: (x.shape, x.dtype), jax.eval_shape(model.init, jax.random.key(0), *args))


def test_block_remat_gives_same_parameters_loss_and_gradients():
    tokens, lengths = _batch()
    plain, remat = BLT(_tiny_blt(layers=1)), BLT(_tiny_blt(layers=1, remat="block"))
    # Same names, shapes and logical axes (Partitioned names are part of the tree structure).
    assert _shapes_and_names(plain, tokens, lengths) == _shapes_and_names(remat, tokens, lengths)
    params = _random_params(plain, tokens, lengths)
    (loss, grads), (remat_loss, remat_grads) = (_loss_and_grads(m, params, tokens, lengths) for m in (plain, remat))
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), remat_grads, grads)


def _backward_temp_bytes(layers: int, remat: bool) -> int:
    """XLA's temporary buffer size for value_and_grad of a windowed stack (compiled, never run)."""
    config = TransformerConfig(dim=64, n_layers=layers, n_heads=2, ffn_hidden=192, window=64)
    stack = Transformer(config, remat="block" if remat else "none")
    x = jnp.zeros((1, 2048, 64))
    positions = positions_like(x[..., 0])
    params = jax.eval_shape(stack.init, jax.random.key(0), x, positions)

    def loss(params, x):
        return jnp.mean(stack.apply(params, x, positions) ** 2)

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_block_remat_bounds_activation_memory():
    """With remat, 4 blocks need about the temporary memory of 1; without it, about 4 times more.

    This is the property `checkpoint_after_cotangent` exists for: plain `jax.checkpoint` kept
    every layer's recomputed activations alive at once on CPU.
    """
    plain_1, plain_4 = _backward_temp_bytes(1, False), _backward_temp_bytes(4, False)
    remat_1, remat_4 = _backward_temp_bytes(1, True), _backward_temp_bytes(4, True)
    assert plain_4 > 2.5 * plain_1
    assert remat_4 < 1.3 * remat_1
    assert remat_4 < 0.5 * plain_4


def test_block_remat_replays_the_recorded_attention():
    """Remat recomputes a block's projections and FFN, not its attention scores.

    The first forward pass records each blockwise attention's output and log-sum-exp, and the
    recomputation replays them: the compiled gradient holds one forward and one backward scan
    over query blocks per layer and block group, with remat as without it (a third scan would
    mean recomputed scores).
    """
    for window, t in ((8, 40), (None, 300)):  # a local stack; a full causal one (blocks of 128)
        config = TransformerConfig(dim=32, n_layers=2, n_heads=2, window=window)
        groups = len(_Blocks.of(t, window, default_block_size(window), 16).groups)
        assert groups == (1 if window else 3)
        x = jax.random.normal(jax.random.key(0), (1, t, 32))
        positions = positions_like(x[..., 0])
        params = Transformer(config).init(jax.random.key(1), x, positions)

        def loss(remat: str, config=config, x=x, positions=positions):
            stack = Transformer(config, remat=remat)
            return jax.jit(jax.value_and_grad(lambda p: jnp.mean(stack.apply(p, x, positions) ** 2)))

        for remat in ("none", "block"):
            assert loss(remat).lower(params).as_text().count("stablehlo.while") == 2 * config.n_layers * groups
        (value, grads), (remat_value, remat_grads) = (loss(remat)(params) for remat in ("none", "block"))
        np.testing.assert_allclose(remat_value, value, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), remat_grads, grads)


def test_byte_lm_remat_and_blockwise_path():
    tokens, _ = _batch()
    stack = TransformerConfig(32, 1, 4, n_kv_heads=2, window=8)
    plain, remat = ByteLM(ByteLMConfig(stack)), ByteLM(ByteLMConfig(stack, remat="block"))
    assert _shapes_and_names(plain, tokens) == _shapes_and_names(remat, tokens)
    params = _random_params(plain, tokens)
    (loss, grads), (remat_loss, remat_grads) = (_loss_and_grads(m, params, tokens) for m in (plain, remat))
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), remat_grads, grads)
    # A window covering the whole row takes the dense path: the same logits as the blockwise one.
    wide = ByteLM(ByteLMConfig(dataclasses.replace(stack, window=None)))
    short = tokens[:, :8]
    np.testing.assert_allclose(
        jax.jit(plain.apply)({"params": params}, short), jax.jit(wide.apply)({"params": params}, short), atol=1e-5
    )


def test_hash_table_init_does_not_depend_on_the_row_multiple():
    ids = jnp.array([[[0, 4, 6]], [[1, 1, 2]]])  # [tables=2, B=1, N=3]
    plain = HashNgramEmbedding(num_tables=2, vocab=7, dim=3)
    padded = HashNgramEmbedding(num_tables=2, vocab=7, dim=3, rows_multiple=4)
    tables = plain.init(jax.random.key(0), ids)["params"]["tables"]
    padded_tables = padded.init(jax.random.key(0), ids)["params"]["tables"]
    assert padded_tables.names == ("hash_tables", "hash_rows", "hash_embed")
    assert padded_tables.value.shape == (2, 8, 3)
    np.testing.assert_array_equal(padded_tables.value[:, :7], tables.value)
    assert not np.asarray(padded_tables.value[:, 7:]).any()
    np.testing.assert_array_equal(
        padded.apply({"params": {"tables": padded_tables}}, ids), plain.apply({"params": {"tables": tables}}, ids)
    )


def test_padded_hash_tables_same_logits_and_export(tmp_path):
    tokens, lengths = _batch()
    cfg = _tiny_blt(document_mask=False, repool_every_cross_attn_layer=True)
    padded_cfg = dataclasses.replace(cfg, hash_rows_multiple=8)
    model, padded = BLT(cfg), BLT(padded_cfg)
    assert padded_cfg.hash_table_rows == 104
    params = _random_params(model, tokens, lengths)
    tables = np.asarray(params["local_encoder"]["hash_embedding"]["tables"])
    padded_params = jax.tree.map(lambda x: x, params)
    padded_params["local_encoder"]["hash_embedding"]["tables"] = jnp.pad(tables, [(0, 0), (0, 7), (0, 0)])
    shapes = nn.meta.unbox(jax.eval_shape(padded.init, jax.random.key(0), tokens, lengths)["params"])
    assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(lambda x: x.shape, padded_params)
    logits = jax.jit(model.apply)({"params": params}, tokens, lengths)
    np.testing.assert_array_equal(jax.jit(padded.apply)({"params": padded_params}, tokens, lengths), logits)

    state = hf.to_hf_state_dict(padded, padded_params)
    np.testing.assert_array_equal(state["model.encoder_hash_tok_embedding.weight"], tables.reshape(2 * 97, 32))
    assert hf.blt_config_to_hf(padded_cfg) == hf.blt_config_to_hf(cfg)  # not model semantics
    hf.save_hf_blt(padded, padded_params, tmp_path / "export")
    loaded, loaded_params = hf.load_hf_blt(tmp_path / "export", hash_rows_multiple=8)
    assert loaded.config.hash_rows_multiple == 8
    np.testing.assert_array_equal(
        loaded_params["local_encoder"]["hash_embedding"]["tables"],
        padded_params["local_encoder"]["hash_embedding"]["tables"],
    )
    np.testing.assert_allclose(jax.jit(loaded.apply)({"params": loaded_params}, tokens, lengths), logits, atol=1e-6)
    plain_loaded, plain_params = hf.load_hf_blt(tmp_path / "export")
    np.testing.assert_array_equal(plain_params["local_encoder"]["hash_embedding"]["tables"], tables)
