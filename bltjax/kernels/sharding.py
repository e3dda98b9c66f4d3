"""Where a Pallas kernel runs on a mesh: a `shard_map` over the batch (and head) mesh axes.

XLA's SPMD partitioner cannot split a Pallas call: left alone it would gather every row of
q, k and v onto each device around the kernel. Inside `partitioned` (entered by the model's
activation-sharding context while the train step is traced) the kernel runs once per device
on that device's rows and heads instead. Outside it the kernel is called as is.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

_ACTIVE: contextvars.ContextVar[tuple[Mesh, tuple[str, ...], tuple[str, ...]] | None] = contextvars.ContextVar(
    "bltjax_kernel_partitioning", default=None
)


@contextlib.contextmanager
def partitioned(mesh: Mesh, batch_axes: Sequence[str] = (), head_axes: Sequence[str] = ()) -> Iterator[None]:
    """While tracing inside this context, Pallas kernels run per shard of ``mesh``.

    ``batch_axes`` split the batch and ``head_axes`` the attention heads (each only where its
    size divides the dimension, as for activations).
    """
    token = _ACTIVE.set((mesh, tuple(batch_axes), tuple(head_axes)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def is_partitioned() -> bool:
    """Whether tracing runs inside `partitioned` (Pallas kernels then know their mesh)."""
    return _ACTIVE.get() is not None


def _dividing(axes: tuple[str, ...], size: int, mesh: Mesh) -> tuple[str, ...]:
    """The longest prefix of ``axes`` whose product divides ``size``."""
    kept: list[str] = []
    for axis in axes:
        if size % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]):
            break
        kept.append(axis)
    return tuple(kept)


def _entry(axes: tuple[str, ...]) -> Any:
    return None if not axes else axes[0] if len(axes) == 1 else axes


def over_batch_and_heads(
    fn: Callable[..., jax.Array],
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segments: tuple[jax.Array, jax.Array] | None,
    *,
    batch_dim: int = 0,
    head_dim: int = 1,
) -> jax.Array:
    """``fn(q, k, v, segments)`` per device inside `partitioned`, else once; returns q-shaped output.

    q [B, H, ...], k / v [B, K, ...], segments (q [B, T], kv [B, S]) or None. Heads are split
    only when the head axes divide both H and K (grouped heads stay with their keys).
    """
    active = _ACTIVE.get()
    if active is None or active[0].size == 1:
        return fn(q, k, v, segments)
    mesh, batch_axes, head_axes = active
    batch = _dividing(batch_axes, q.shape[batch_dim], mesh)
    heads = _dividing(head_axes, math.gcd(q.shape[head_dim], k.shape[head_dim]), mesh)
    if not batch and not heads:
        return fn(q, k, v, segments)
    spec = [None] * q.ndim
    spec[batch_dim], spec[head_dim] = _entry(batch), _entry(heads)
    tensor_spec = P(*spec)
    if segments is None:
        mapped = jax.shard_map(
            lambda q, k, v: fn(q, k, v, None),
            mesh=mesh,
            in_specs=(tensor_spec,) * 3,
            out_specs=tensor_spec,
            check_vma=False,
        )
        return mapped(q, k, v)
    segment_spec = P(_entry(batch))
    mapped = jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(tensor_spec,) * 3 + ((segment_spec, segment_spec),),
        out_specs=tensor_spec,
        check_vma=False,
    )
    return mapped(q, k, v, segments)
