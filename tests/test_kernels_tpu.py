"""The TPU and GPU kernels behind `model.attention`: splash (Pallas) and cuDNN.

On a CPU machine the splash kernels run in Pallas interpret mode, so they are checked here
against dense attention (values and gradients, every mask kind of `test_kernels.py` runs them
too), inside a whole tiny BLT, and compiled for a real TPU topology by libtpu's compiler
(skipped when `libtpu` is absent). cuDNN needs a GPU: its masks are checked by running the
same `jax.nn.dot_product_attention` call on XLA.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding
from test_kernels import _assert_same, _autodiff_attend, _qkv, _segments, _values_and_grads

from bltjax import kernels
from bltjax.config import load_config
from bltjax.kernels import cudnn, dense, masks, splash
from bltjax.models.factory import build_model
from bltjax.models.layers import positions_like
from bltjax.runtime import aot
from bltjax.tokenizer import EOS_ID
from bltjax.training.metrics import token_nll

needs_libtpu = pytest.mark.skipif(not aot.libtpu_available(), reason="needs the libtpu package (pip install libtpu)")


def test_auto_resolves_by_the_platform_compiled_for():
    """On CPU auto keeps its choice; compiling for a TPU it is splash, for a GPU cuDNN where cuDNN can."""
    choose = kernels.self_attention_implementation
    assert kernels.target_platform() == "cpu"
    assert choose(4096, 512) == "xla_blockwise" and choose(128, None) == "dense"
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:8])
    with kernels.compiling_for("tpu"):
        assert kernels.target_platform() == "tpu"
        # Several devices and no mesh for the kernel (an unsharded eval on a pod): XLA can run it, splash not.
        assert choose(4096, 512) == "xla_blockwise"
        with kernels.partitioned(mesh, ("data",)):
            assert choose(4096, 512) == choose(128, None) == "splash"
            assert choose(100, None) == "dense"  # shorter than one 128-key block: nothing to tile
            assert choose(4096, 512, "xla_blockwise") == "xla_blockwise"
    assert kernels.target_platform() == "cpu"  # the context is left behind
    with kernels.compiling_for("cuda"):
        assert choose(16384, 512, dtype=jnp.bfloat16, head_dim=64) == "cudnn"
        assert choose(4096, None, dtype=jnp.bfloat16, head_dim=128, segmented=True) == "cudnn"
        # Segments over a long row would be a dense [T, T] bias; float32 and odd head dims are not cuDNN's.
        assert choose(16384, 512, dtype=jnp.bfloat16, segmented=True) == "xla_blockwise"
        assert choose(16384, 512, dtype=jnp.float32) == "xla_blockwise"
        assert choose(16384, 512, dtype=jnp.bfloat16, head_dim=100) == "xla_blockwise"
        assert "float32" in kernels.cudnn_fallback_reason(16384, 64, jnp.float32, False)
    assert choose(4096, 512, "cudnn") == "xla_blockwise"  # cuDNN asked for on a CPU
    assert "GPUs only" in kernels.cudnn_fallback_reason(4096, 64, jnp.bfloat16, False)
    assert kernels.cross_attention_implementation("auto") == "xla_blockwise"
    assert kernels.cross_attention_implementation("splash") == "splash"
    with kernels.compiling_for("tpu"), kernels.partitioned(mesh, ("data",)):  # auto keeps the gather forms on TPU
        assert kernels.cross_attention_implementation("auto") == "xla_blockwise"


@pytest.mark.parametrize(
    "t, window, eos_rate, heads, kv_heads",
    [(300, 64, 0.02, 4, 2), (300, None, 0.02, 4, 1), (256, 32, 0.0, 2, 2), (130, None, 0.0, 2, 2)],
)
def test_cudnn_masks_equal_dense(t, window, eos_rate, heads, kv_heads):
    """The causal flag, left window and segment mask given to cuDNN select dense's keys (run on XLA here)."""
    q, k, v = _qkv(t, 2, t, t, heads, kv_heads, d=16)
    positions = positions_like(q[..., 0, 0])
    segments = _segments(t, 2, t, eos_rate) if eos_rate else None
    cotangent = jax.random.normal(jax.random.key(1), q.shape)
    mask = masks.local_causal_mask(positions, segments, window)
    want = _values_and_grads(lambda q, k, v: _autodiff_attend(q, k, v, mask), cotangent, q, k, v)
    got = _values_and_grads(
        lambda q, k, v: cudnn.self_attention(q, k, v, segments, window, implementation="xla"), cotangent, q, k, v
    )
    _assert_same(got, want)


def test_splash_pads_rows_and_keeps_bfloat16():
    """A row of 200 runs as 256 (two blocks of 128); padded keys stay invisible, the dtype is kept."""
    assert splash.padded_length(200) == 256 and splash.block_size(256) == 256 and splash.block_size(384) == 128
    assert splash.padded_length(512) == 512 and splash.block_size(16384) == 512
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(5, 1, 200, 200, 2, 2, d=16))
    positions = positions_like(q[..., 0, 0])
    segments = _segments(9, 1, 200, 0.05)
    got = splash.self_attention(q, k, v, segments, 48, interpret=True)
    want = dense.attend(q, k, v, masks.local_causal_mask(positions, segments, 48))
    assert got.dtype == jnp.bfloat16 and got.shape == q.shape
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2)


def test_splash_cross_attention_gives_zero_to_a_query_without_keys():
    """Own-patch: a patch no byte names (and ids out of range) gets 0, like the gather form."""
    q, k, v = _qkv(4, 1, 8, 130, 2, 2, d=16)
    key_patch = jnp.concatenate([jnp.zeros(60, jnp.int32), jnp.full(60, 2), jnp.full(10, -1)])[None]
    got = splash.cross_own_patch(q, k, v, key_patch, 2, interpret=True)
    want = dense.attend(q, k, v, masks.own_patch_mask(key_patch, 8, 2))
    np.testing.assert_allclose(got, want, atol=2e-6)
    assert not np.any(np.asarray(got)[0, 2:4]) and not np.any(np.asarray(got)[0, 6:8])  # patches 1 and 3


def test_splash_refuses_a_float32_precision_for_bfloat16_on_tpu():
    """Mosaic cannot build that matmul; the error names the setting instead of a kernel dump."""
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(5, 1, 128, 128, 2, 2, d=16))
    with jax.default_matmul_precision("highest"), pytest.raises(ValueError, match="jax_default_matmul_precision"):
        splash.self_attention(q, k, v, None, None, interpret=False)


def test_splash_runs_per_shard_inside_partitioned():
    """Under a mesh the kernel is a shard_map over batch and heads, with the same values and gradients."""
    auto = (jax.sharding.AxisType.Auto,) * 3  # as the training mesh (`bltjax.training.sharding.make_mesh`)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=auto, devices=jax.devices()[:8])
    q, k, v = _qkv(6, 4, 200, 200, 4, 2, d=16)
    positions = positions_like(q[..., 0, 0])
    segments = _segments(3, 4, 200, 0.03)
    cotangent = jax.random.normal(jax.random.key(1), q.shape)
    mask = masks.local_causal_mask(positions, segments, 40)
    want = _values_and_grads(lambda q, k, v: dense.attend(q, k, v, mask), cotangent, q, k, v)

    def sharded(q, k, v):
        with kernels.partitioned(mesh, ("data", "fsdp"), ("tensor",)):
            return kernels.self_attention(q, k, v, positions, segments, 40, implementation="splash")[0]

    assert "shard_map" in str(jax.make_jaxpr(sharded)(q, k, v))
    _assert_same(_values_and_grads(sharded, cotangent, q, k, v), want)


def _tiny_blt_loss_and_grads(attention: str):
    config = load_config("experiments/blt_tiny.py")
    config.model.attention = attention
    model = build_model(config)
    n, p = config.data.seq_len, config.data.max_patches
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 256, (2, n)).astype(np.int32)
    tokens[:, 0] = 1
    tokens[0, 50] = tokens[1, 90] = EOS_ID  # document boundaries: segment masks in every stack
    lengths = np.zeros((2, p), np.int32)
    for row in range(2):
        cuts = np.sort(rng.choice(np.arange(2, n), 29, replace=False))  # the first patch is the BOS alone
        lengths[row, :31] = np.diff(np.concatenate([[0, 1], cuts, [n + 1]]))
    targets = np.roll(tokens, -1, axis=1)
    params = model.init(jax.random.key(0), tokens, lengths)["params"]

    def loss(params):
        return jnp.mean(token_nll(model.apply({"params": params}, tokens, lengths), targets))

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.slow
def test_tiny_blt_with_splash_equals_dense():
    """Every attention of a tiny BLT (local windows, latent causal, both cross-attentions, documents)
    through splash in interpret mode: the loss and every parameter gradient of dense attention."""
    loss, grads = _tiny_blt_loss_and_grads("splash")
    want_loss, want_grads = _tiny_blt_loss_and_grads("dense")
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    flat, want_flat = jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)
    for (path, got), want in zip(flat, want_flat, strict=True):
        scale = float(jnp.max(jnp.abs(want))) + 1e-8
        assert float(jnp.max(jnp.abs(got - want))) <= 1e-4 * scale, jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def tpu_device():
    # Compiling only: no chip is opened, so libtpu's one-process-per-host lock need not hold
    # (other processes on this machine may be compiling for a TPU too).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # The persistent cache is for this host's CPU programs; a TPU executable cannot be loaded back here.
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    yield aot.tpu_devices(aot.parse_topology("v5p-8"))[0]
    jax.config.update("jax_enable_compilation_cache", cache)


def _compile_for_tpu(fn, device, *shapes):
    abstract = [jax.ShapeDtypeStruct(shape, dtype, sharding=SingleDeviceSharding(device)) for shape, dtype in shapes]
    # The training program's precision; the parity tests' "highest" is not a bfloat16 matmul on TPU.
    with kernels.compiling_for(device.platform), jax.default_matmul_precision("default"):
        return jax.jit(fn).lower(*abstract).compile()


def _grads_of(attention):
    def grads(q, k, v, *rest):
        return jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, *rest).astype(jnp.float32)), (0, 1, 2))(q, k, v)

    return grads


B, T, H, K, D = 2, 1024, 8, 4, 64
BF16, I32 = jnp.bfloat16, jnp.int32


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize(
    "name, attention, shapes",
    [
        (
            "local window 512, documents, GQA",
            lambda q, k, v, s: kernels.self_attention(q, k, v, positions_like(s), s, 512, implementation="splash")[0],
            [((B, T, H, D), BF16), ((B, T, K, D), BF16), ((B, T, K, D), BF16), ((B, T), I32)],
        ),
        (
            "latent causal, documents",
            lambda q, k, v, s: kernels.self_attention(q, k, v, positions_like(s), s, None, implementation="splash")[0],
            [((B, T, H, D), BF16), ((B, T, H, D), BF16), ((B, T, H, D), BF16), ((B, T), I32)],
        ),
        (
            "latent causal, no documents, a row of 1000 padded to 1024",
            lambda q, k, v: kernels.self_attention(
                q, k, v, positions_like(q[..., 0, 0]), None, None, implementation="splash"
            )[0],
            [((B, 1000, H, D), BF16), ((B, 1000, H, D), BF16), ((B, 1000, H, D), BF16)],
        ),
        (
            "encoder own-patch cross-attention",
            lambda q, k, v, pid: kernels.cross_attention(
                q, k, v, key_patch=pid, slots_per_patch=2, implementation="splash"
            ),
            [((B, 512, H, D), BF16), ((B, T, H, D), BF16), ((B, T, H, D), BF16), ((B, T), I32)],
        ),
        (
            "decoder cross-attention over its patch's slots",
            lambda q, k, v, dpid: kernels.cross_attention(
                q, k, v, gather_index=dpid[..., None] * 2 + jnp.arange(2), implementation="splash"
            ),
            [((B, T, H, D), BF16), ((B, 512, H, D), BF16), ((B, 512, H, D), BF16), ((B, T), I32)],
        ),
    ],
)
def test_every_splash_path_compiles_for_a_tpu(tpu_device, name, attention, shapes):
    """libtpu's compiler takes each kernel, forward and backward (three Mosaic kernels: out, dq, dk/dv)."""
    compiled = _compile_for_tpu(_grads_of(attention), tpu_device, *shapes)
    text = compiled.as_text()
    assert text.count('custom_call_target="tpu_custom_call"') >= 3, name
    assert "interpret" not in text.lower() or "tpu_custom_call" in text


@needs_libtpu
@pytest.mark.slow
def test_tiny_blt_train_step_compiles_for_a_tpu_slice_with_splash(tpu_device, monkeypatch):
    """The whole sharded train step (FSDP over 4 chips) with auto = splash on TPU: every kernel
    runs per shard (a Pallas call XLA had to partition would fail to compile)."""
    config = load_config("experiments/blt_tiny.py")
    config.data.seq_len, config.data.max_patches, config.data.batch_size = 512, 128, 8
    config.mesh.data, config.mesh.fsdp = 1, -1
    devices = aot.tpu_devices(aot.parse_topology("v5p-8"))
    traced = []
    run_splash = kernels._SELF_ATTENTION["splash"]
    monkeypatch.setitem(kernels._SELF_ATTENTION, "splash", lambda *args: traced.append(1) or run_splash(*args))
    with kernels.compiling_for("tpu"), jax.default_matmul_precision("default"):
        # The step enters `kernels.partitioned` itself (the activation-sharding context): auto is splash there.
        report = aot.compile_train_step(config, devices, target="v5p-8", backend="tpu")
    assert report.fits and report.peak_bytes > 0
    assert len(traced) >= 5  # encoder, latent x 2 and decoder x 2 self-attentions (forward and remat)
