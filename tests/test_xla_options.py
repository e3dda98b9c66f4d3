"""Per-platform XLA compiler options (`bltjax.runtime.xla_options`): on CPU, dots stay out of YNNPACK."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from bltjax.runtime import xla_options
from bltjax.training.step import jit_train_step

YNN_MARK = "__ynn_fusion"  # the fusion kind XLA:CPU gives a dot it hands to YNNPACK


def block_matmul(a, b):
    """The shape of one attention block's probabilities x values, batched over rows and heads."""
    return jnp.einsum("bqs,bsd->bqd", a, b)


def block_args():
    return jnp.ones((8, 128, 640), jnp.float32), jnp.ones((8, 640, 64), jnp.float32)


def compiled_text(jitted, *args) -> str:
    return jitted.lower(*args).compile().as_text()


@pytest.fixture(scope="module")
def ynn_by_default() -> None:
    """Skips where this XLA does not hand dots to YNNPACK at all (nothing to turn off)."""
    if YNN_MARK not in compiled_text(jax.jit(block_matmul), *block_args()):
        pytest.skip("this XLA:CPU compiles dots without YNNPACK by default; the option has nothing to change")


def test_cpu_options_keep_dots_out_of_ynnpack(ynn_by_default):
    options = xla_options.compiler_options(jax.devices()[:1])
    assert options == xla_options.CPU_OPTIONS
    text = compiled_text(xla_options.jit(block_matmul, jax.devices()[:1]), *block_args())
    assert YNN_MARK not in text
    assert " dot(" in text  # still one dot, now XLA's own


def test_jit_train_step_compiles_with_the_options(ynn_by_default):
    mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:1])
    replicated = NamedSharding(mesh, P())

    def step(state, batch):
        return state + 1.0, {"out": block_matmul(batch["a"], batch["b"])}

    a, b = block_args()
    text = compiled_text(jit_train_step(step, replicated, replicated), jnp.zeros(()), {"a": a, "b": b})
    assert YNN_MARK not in text


def test_no_options_off_cpu_or_when_xla_refuses_them(monkeypatch):
    tpu = types.SimpleNamespace(platform="tpu")
    assert xla_options.compiler_options([tpu]) == {}
    monkeypatch.setattr(xla_options, "CPU_OPTIONS", {"xla_cpu_option_that_does_not_exist": "1"})
    assert xla_options.compiler_options(jax.devices()[:1]) == {}
    # and a program jitted through the module still compiles and runs
    out = xla_options.jit(block_matmul, jax.devices()[:1])(*block_args())
    assert out.shape == (8, 128, 64)
