"""`bltjax.kernels`: every attention implementation equals dense masked attention.

For each implementation behind `kernels.self_attention` and `kernels.cross_attention`, and each
mask kind the model uses (sliding window, full causal, document segments, the decoder's gathered
slots, the encoder's own patch), values and gradients are compared with `dense.attend` over the
explicit mask, itself checked against autodiff of the plain formula.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bltjax import kernels
from bltjax.kernels import blockwise, dense, masks
from bltjax.kernels.blockwise import CAUSAL_GROUPS, BlockLayout, blockwise_pays, default_block_size
from bltjax.kernels.contract import contract
from bltjax.models import configs
from bltjax.models.layers import eos_segment_ids, positions_like
from bltjax.models.local_encoder import encoder_cross_attn_mask
from bltjax.models.patch_ids import decoder_patch_ids, patch_ids, with_next_token

IMPLEMENTATIONS = kernels.ATTENTION_IMPLEMENTATIONS


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


def _assert_same(got, want):
    (out, grads), (want_out, want_grads) = got, want
    np.testing.assert_allclose(out, want_out, atol=2e-6, rtol=1e-6)
    for got_grad, want_grad in zip(grads, want_grads, strict=True):
        assert got_grad.shape == want_grad.shape
        np.testing.assert_allclose(got_grad, want_grad, atol=1e-5, rtol=1e-5)
        assert np.isfinite(np.asarray(got_grad)).all()


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


def _segments(seed: int, b: int, t: int, eos_rate: float) -> jax.Array:
    is_end = np.random.default_rng(seed).random((b, t)) < eos_rate
    return eos_segment_ids(jnp.asarray(is_end))


def test_implementation_names_match_the_config_schema():
    """The jax-free copy that config validation uses names the same implementations."""
    assert configs.ATTENTION_IMPLEMENTATIONS == kernels.ATTENTION_IMPLEMENTATIONS


@pytest.mark.parametrize("heads, kv_heads, window", [(4, 4, None), (4, 2, 6), (2, 1, 3)])
def test_dense_backward_equals_autodiff(heads, kv_heads, window):
    """`dense.attend` recomputes scores in its backward pass: the same gradients as autodiff.

    Segments, a window and one query row with no visible key at all (its output and every
    gradient through it must be 0) are included.
    """
    t = 29
    q, k, v = _qkv(7 + heads, 2, t, t, heads, kv_heads)
    positions = positions_like(q[..., 0, 0])
    mask = masks.local_causal_mask(positions, _segments(5, 2, t, 0.2), window).at[1, 4].set(False)  # row 1, query 4
    cotangent = jax.random.normal(jax.random.key(2), q.shape)
    want = _values_and_grads(lambda q, k, v: _autodiff_attend(q, k, v, mask), cotangent, q, k, v)
    got = _values_and_grads(lambda q, k, v: dense.attend(q, k, v, mask), cotangent, q, k, v)
    _assert_same(got, want)
    assert not np.any(got[0][1, 4])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "t, window, eos_rate, heads, kv_heads",
    [
        (150, 16, 0.0, 4, 2),  # sliding window (the local stacks), GQA
        (150, 16, 0.1, 2, 2),  # sliding window and document segments
        (150, None, 0.0, 4, 4),  # full causal (the latent stack), two blocks of 128
        (150, None, 0.1, 2, 1),  # full causal with document segments, MQA
        (37, 8, 0.2, 2, 2),  # blocks of 8 (the window), T not a multiple of them
        (20, None, 0.1, 2, 2),  # a row shorter than one block
    ],
)
def test_every_self_attention_implementation_equals_dense(implementation, t, window, eos_rate, heads, kv_heads):
    q, k, v = _qkv(t + (window or 0), 2, t, t, heads, kv_heads)
    positions = positions_like(q[..., 0, 0])
    segments = _segments(t, 2, t, eos_rate) if eos_rate else None
    cotangent = jax.random.normal(jax.random.key(1), q.shape)
    mask = masks.local_causal_mask(positions, segments, window)
    want = _values_and_grads(lambda q, k, v: _autodiff_attend(q, k, v, mask), cotangent, q, k, v)

    def attention(q, k, v):
        return kernels.self_attention(q, k, v, positions, segments, window, implementation=implementation)[0]

    _assert_same(_values_and_grads(attention, cotangent, q, k, v), want)


@pytest.mark.parametrize(
    "t, window, block, heads, kv_heads, eos_rate",
    [
        (37, 8, None, 4, 4, 0.0),  # T not a multiple of the block
        (64, 16, 8, 4, 2, 0.1),  # window spans two previous blocks; GQA
        (50, 12, 5, 2, 1, 0.3),  # window not a multiple of the block; MQA; many documents
        (40, 1, None, 2, 2, 0.0),  # only itself
        (33, 7, 32, 2, 2, 0.05),  # block larger than the window
        (37, None, 4, 4, 2, 0.1),  # full causal, T not a multiple of the block
        (50, None, 8, 2, 1, 0.0),  # full causal, MQA
        (100, None, 4, 2, 2, 0.05),  # full causal over 25 blocks: groups of 4, the last of 1
    ],
)
def test_blockwise_layouts_equal_dense(t, window, block, heads, kv_heads, eos_rate):
    """Block sizes the default layout does not reach at test sizes give the dense values too."""
    q, k, v = _qkv(t + (window or 0), 2, t, t, heads, kv_heads)
    positions = positions_like(q[..., 0, 0])
    segments = _segments(t, 2, t, eos_rate) if eos_rate else None
    cotangent = jax.random.normal(jax.random.key(1), q.shape)

    def reference(q, k, v):
        return dense.attend(q, k, v, masks.local_causal_mask(positions, segments, window))

    def blocks(q, k, v):
        return blockwise.attend_blockwise(q, k, v, positions, segments, window, block)[0]

    _assert_same(_values_and_grads(blocks, cotangent, q, k, v), _values_and_grads(reference, cotangent, q, k, v))


@pytest.mark.parametrize("t, window, block", [(912, None, 128), (100, None, 4), (37, None, 4), (4096, 512, 128)])
def test_block_groups_cover_every_query_block_with_its_keys(t, window, block):
    layout = BlockLayout.of(t, window, block, 16)
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


def test_auto_uses_blockwise_past_one_block():
    assert blockwise_pays(4096, 512) and blockwise_pays(4096, None) and blockwise_pays(129, None)
    assert not blockwise_pays(128, None) and not blockwise_pays(128, 512) and not blockwise_pays(16, 16)
    assert blockwise_pays(24, 16)  # blocks of 16 (the window)
    assert default_block_size(512) == 128 and default_block_size(16) == 16
    choose = kernels.self_attention_implementation
    assert choose(4096, 512) == choose(129, None) == choose(24, 16) == "xla_blockwise"
    assert choose(128, None) == choose(16, 16) == "dense"
    assert choose(4096, 512, "dense") == "dense" and choose(8, None, "xla_blockwise") == "xla_blockwise"
    q, k, v = _qkv(3, 1, 24, 24, 2, 2)
    positions = positions_like(q[..., 0, 0])
    for window in (None, 5, 16, 24, 40):
        want = jax.jit(lambda q, k, v, w=window: dense.attend(q, k, v, masks.local_causal_mask(positions, None, w)))
        got = jax.jit(lambda q, k, v, w=window: kernels.self_attention(q, k, v, positions, None, w)[0])
        np.testing.assert_allclose(got(q, k, v), want(q, k, v), atol=2e-6)


def test_unknown_implementation_is_rejected_naming_the_field():
    q, k, v = _qkv(3, 1, 8, 8, 2, 2)
    positions = positions_like(q[..., 0, 0])
    with pytest.raises(ValueError, match=r"model\.attention: expected one of .*'xla_blockwise'.*got 'flash'"):
        kernels.self_attention(q, k, v, positions, None, None, implementation="flash")
    with pytest.raises(ValueError, match=r"model\.attention: .*got 'flash'"):
        kernels.cross_attention(q, k, v, mask=jnp.ones((1, 8, 8), bool), implementation="flash")
    with pytest.raises(ValueError, match="exactly one of gather_index, key_patch, mask"):
        kernels.cross_attention(q, k, v, implementation="dense")


def _patch_lengths():
    # Row 0 adds up to N, row 1 to N + 1; both end in empty (zero-length) padding patches.
    return jnp.array([[1, 3, 2, 7, 1, 4, 5, 0, 0], [1, 1, 9, 13, 0, 0, 0, 0, 0]])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2)])
def test_own_patch_cross_attention_equals_dense(implementation, heads, kv_heads):
    """The encoder's k slots per patch see the bytes of their own patch only; empty patches get 0."""
    n, k = 23, 2
    lengths = _patch_lengths()
    pid = patch_ids(lengths, n)
    p = lengths.shape[1]
    q, keys, v = _qkv(7, 2, p * k, n, heads, kv_heads)
    cotangent = jax.random.normal(jax.random.key(2), q.shape)
    mask = encoder_cross_attn_mask(pid, p, k, 1)
    np.testing.assert_array_equal(masks.own_patch_mask(pid, p * k, k), mask)

    def attention(q, keys, v):
        return kernels.cross_attention(q, keys, v, key_patch=pid, slots_per_patch=k, implementation=implementation)

    got = _values_and_grads(attention, cotangent, q, keys, v)
    _assert_same(got, _values_and_grads(lambda q, k, v: _autodiff_attend(q, k, v, mask), cotangent, q, keys, v))
    empty = np.asarray(lengths) == 0
    assert np.all(np.asarray(got[0]).reshape(2, p, k, -1)[empty] == 0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2)])
def test_gathered_cross_attention_equals_dense(implementation, heads, kv_heads):
    """Each byte sees the k slots of its decoder patch; row 1 ends in empty padding patches."""
    n, k = 23, 2
    lengths = with_next_token(_patch_lengths(), n)
    dpid = decoder_patch_ids(lengths, n)
    p = lengths.shape[1]
    q, keys, v = _qkv(8, 2, n, p * k, heads, kv_heads)
    cotangent = jax.random.normal(jax.random.key(3), q.shape)
    mask = (jnp.arange(p * k) // k)[None, None, :] == dpid[:, :, None]
    index = dpid[:, :, None] * k + jnp.arange(k)
    np.testing.assert_array_equal(masks.gathered_mask(index, p * k), mask)

    def attention(q, keys, v):
        return kernels.cross_attention(q, keys, v, gather_index=index, implementation=implementation)

    got = _values_and_grads(attention, cotangent, q, keys, v)
    _assert_same(got, _values_and_grads(lambda q, k, v: _autodiff_attend(q, k, v, mask), cotangent, q, keys, v))


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
