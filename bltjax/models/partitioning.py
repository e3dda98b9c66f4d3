"""Activation sharding: logical axis names on the model's big intermediate tensors.

Parameters carry logical axis names from their initialisers; activations get them here, with
`constrain(x, ("batch", "length", "act_embed"))` at stack boundaries and on the other large
tensors (hash-embedding sums, byte states, patch states, logits). Outside an
`activation_sharding` context `constrain` returns its input untouched, so single-device runs,
decoding and every caller that never opens the context compile exactly as before. Inside it,
the names are mapped through the caller's rules (`bltjax.training.sharding.LOGICAL_RULES`) onto
the mesh and applied as sharding constraints: without them the SPMD partitioner may replicate
the batch after a gather or scatter (patch pooling, cross-attention gathers, the hash lookup),
and every chip then holds every row of those activations.

A mesh axis that does not divide a dimension is dropped for that tensor (so a tiny batch on a
large mesh still compiles), and a mesh axis already used by an earlier dimension is not reused.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bltjax import kernels

_ACTIVE: contextvars.ContextVar[tuple[Mesh, dict[str, tuple[str, ...]]] | None] = contextvars.ContextVar(
    "bltjax_activation_sharding", default=None
)


def _axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Iterator[None]:
    """Within this context (while tracing), `constrain` shards activations over ``mesh`` by ``rules``."""
    table: dict[str, tuple[str, ...]] = {}
    for logical, entry in rules:
        table.setdefault(logical, _axes(entry))  # the first rule for a name wins, as in Flax
    token = _ACTIVE.set((mesh, table))
    try:
        # Pallas attention kernels cannot be split by XLA: they run per shard of the same axes.
        with kernels.partitioned(mesh, table.get("batch", ()), table.get("act_heads", ())):
            yield
    finally:
        _ACTIVE.reset(token)


def activation_spec(
    shape: Sequence[int], names: Sequence[str | None], mesh: Mesh, table: dict[str, tuple[str, ...]]
) -> P:
    """The mesh spec of an activation: per dimension, the longest prefix of its rule's axes that divides it."""
    if len(names) != len(shape):
        raise ValueError(f"activation sharding: {len(names)} logical names {tuple(names)} for shape {tuple(shape)}")
    used: set[str] = set()
    entries = []
    for size, name in zip(shape, names, strict=True):
        kept: list[str] = []
        for axis in table.get(name, ()) if name else ():
            if axis in used or size % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]):
                break
            kept.append(axis)
        used.update(kept)
        entries.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*entries)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``x`` constrained to the sharding its logical ``names`` map to; unchanged outside `activation_sharding`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, table = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, activation_spec(x.shape, names, mesh, table)))
