"""`bltjax.models.remat`: every remat policy keeps parameters, loss and gradients; "block" bounds memory.

"block" (the anchored recompute) is also checked for what it exists for: backward temporary
memory that does not grow with depth on XLA:CPU, and attention scores that are replayed, not
recomputed.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bltjax.kernels.blockwise import BlockLayout, default_block_size
from bltjax.models.blt import BLT
from bltjax.models.byte_lm import ByteLM
from bltjax.models.configs import REMAT_POLICIES, BLTConfig, ByteLMConfig, TransformerConfig
from bltjax.models.layers import Transformer, TransformerBlock, positions_like
from bltjax.models.remat import rematerialise


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


def _assert_same_loss_and_grads(got, want):
    (loss, grads), (want_loss, want_grads) = got, want
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads, want_grads)


@pytest.mark.slow
@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_every_remat_policy_gives_same_parameters_loss_and_gradients(policy):
    tokens, lengths = _batch()
    plain, remat = BLT(_tiny_blt(layers=1)), BLT(_tiny_blt(layers=1, remat=policy))
    # Same names, shapes and logical axes (Partitioned names are part of the tree structure).
    assert _shapes_and_names(plain, tokens, lengths) == _shapes_and_names(remat, tokens, lengths)
    params = _random_params(plain, tokens, lengths)
    _assert_same_loss_and_grads(*(_loss_and_grads(m, params, tokens, lengths) for m in (remat, plain)))


def test_unknown_remat_policy_is_rejected_naming_the_field():
    with pytest.raises(ValueError, match=r"model\.remat: expected one of \('none', 'block', 'full', 'save_dots'\)"):
        rematerialise(TransformerBlock, "everything")


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


@pytest.mark.slow
def test_block_remat_bounds_activation_memory():
    """With "block" remat, 4 blocks need about the temporary memory of 1; without it, about 4 times more.

    This is the property the anchored recompute exists for: plain `jax.checkpoint` kept every
    layer's recomputed activations alive at once on CPU.
    """
    plain_1, plain_4 = _backward_temp_bytes(1, False), _backward_temp_bytes(4, False)
    remat_1, remat_4 = _backward_temp_bytes(1, True), _backward_temp_bytes(4, True)
    assert plain_4 > 2.5 * plain_1
    assert remat_4 < 1.3 * remat_1
    assert remat_4 < 0.5 * plain_4


@pytest.mark.slow
def test_block_remat_replays_the_recorded_attention():
    """ "block" remat recomputes a block's projections and FFN, not its attention scores.

    The first forward pass records each blockwise attention's output and log-sum-exp, and the
    recomputation replays them: the compiled gradient holds one forward and one backward scan
    over query blocks per layer and block group, with remat as without it (a third scan would
    mean recomputed scores).
    """
    for window, t in ((8, 40), (None, 300)):  # a local stack; a full causal one (blocks of 128)
        config = TransformerConfig(dim=32, n_layers=2, n_heads=2, window=window)
        groups = len(BlockLayout.of(t, window, default_block_size(window), 16).groups)
        assert groups == (1 if window else 3)
        x = jax.random.normal(jax.random.key(0), (1, t, 32))
        positions = positions_like(x[..., 0])
        params = Transformer(config).init(jax.random.key(1), x, positions)

        def loss(remat: str, config=config, x=x, positions=positions):
            stack = Transformer(config, remat=remat)
            return jax.jit(jax.value_and_grad(lambda p: jnp.mean(stack.apply(p, x, positions) ** 2)))

        for remat in ("none", "block"):
            assert loss(remat).lower(params).as_text().count("stablehlo.while") == 2 * config.n_layers * groups
        _assert_same_loss_and_grads(*(loss(remat)(params) for remat in ("block", "none")))


@pytest.mark.slow
def test_byte_lm_remat_and_blockwise_path():
    tokens, _ = _batch()
    stack = TransformerConfig(32, 1, 4, n_kv_heads=2, window=8)
    plain, remat = ByteLM(ByteLMConfig(stack)), ByteLM(ByteLMConfig(stack, remat="block"))
    assert _shapes_and_names(plain, tokens) == _shapes_and_names(remat, tokens)
    params = _random_params(plain, tokens)
    _assert_same_loss_and_grads(*(_loss_and_grads(m, params, tokens) for m in (remat, plain)))
    # A window covering the whole row takes the dense path: the same logits as the blockwise one.
    wide = ByteLM(ByteLMConfig(dataclasses.replace(stack, window=None)))
    short = tokens[:, :8]
    np.testing.assert_allclose(
        jax.jit(plain.apply)({"params": params}, short), jax.jit(wide.apply)({"params": params}, short), atol=1e-5
    )
