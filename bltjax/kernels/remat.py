"""Rematerialisation whose recomputation waits for the incoming gradient (the "block" remat policy).

`recompute_after_cotangent(fn)` is `jax.checkpoint` with two differences: the recomputation's
inputs are made data-dependent on the cotangent (`after`), so XLA cannot schedule it early, and
``fn`` may hand small results of its first run (a `record`) to its second run. The Flax side,
which applies this to a module, is `bltjax.models.remat`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax


def after(cotangent: jax.Array, x: jax.Array) -> jax.Array:
    """``x`` made data-dependent on ``cotangent`` (adds 0 * one element of it).

    XLA's CPU scheduler may run a recomputation as soon as its inputs exist, i.e. at the start
    of the backward pass, keeping every layer's recomputed activations alive at once (this is
    why `jax.checkpoint` alone does not bound memory there, and an optimization barrier does not
    survive to scheduling); anchoring the inputs to the incoming gradient makes each layer's
    recomputation wait for the layer above.
    """
    return x + (0.0 * cotangent.reshape(-1)[0]).astype(x.dtype)


def recompute_after_cotangent(fn: Callable[[Any, Any, Any], tuple[jax.Array, Any]]) -> Callable[[Any, Any], jax.Array]:
    """``(differentiable, fixed) -> y`` that keeps only its inputs and a record for the backward pass.

    ``fn(differentiable, fixed, replay) -> (y, record)``: ``differentiable`` is a pytree of float
    arrays (parameters, activations) that get gradients, ``fixed`` a pytree of arrays that get
    none (positions, segment ids, indices, masks). ``record`` is anything small worth keeping
    from the first run (e.g. attention outputs); the backward pass re-runs
    ``fn(anchored differentiable, fixed, replay=record)`` under `jax.vjp`.
    """

    @jax.custom_vjp
    def run(differentiable, fixed):
        return fn(differentiable, fixed, None)[0]

    def forward(differentiable, fixed):
        y, record = fn(differentiable, fixed, None)
        return y, (differentiable, fixed, record)

    def backward(residuals, d_y):
        differentiable, fixed, record = residuals
        anchored = jax.tree.map(functools.partial(after, d_y), differentiable)
        _, vjp = jax.vjp(lambda inputs: fn(inputs, fixed, record)[0], anchored)
        (d_differentiable,) = vjp(d_y)
        return d_differentiable, jax.tree.map(lambda _: None, fixed)

    run.defvjp(forward, backward)
    return run
