"""The projection every `Linear` runs: a tensordot with a hand-written backward pass."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def contract(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
    """``tensordot(x, kernel, n_in)`` whose backward pass is two explicit contractions (same values).

    Autodiff's transpose of the forward dot let XLA's CPU backend fuse the activation's
    derivative into a transposed copy of the output gradient ([T, F] -> [F, T], strided writes)
    for the weight gradient; the explicit contractions avoid that copy (docs/design.md,
    "Attention paths").
    """
    return jnp.tensordot(x, kernel, axes=n_in)


def _contract_fwd(x, kernel, n_in):
    return jnp.tensordot(x, kernel, axes=n_in), (x, kernel)


def _contract_bwd(n_in, residuals, d_y):
    x, kernel = residuals
    n_batch = x.ndim - n_in
    d_x = jnp.tensordot(d_y, kernel, axes=(tuple(range(n_batch, d_y.ndim)), tuple(range(n_in, kernel.ndim))))
    d_kernel = jnp.tensordot(x, d_y, axes=(tuple(range(n_batch)), tuple(range(n_batch))))
    return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype)


contract.defvjp(_contract_fwd, _contract_bwd)
