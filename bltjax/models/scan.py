"""Scanned layers: n layers of one kind with parameters stacked on a leading axis, run by `lax.scan`.

An unrolled Python loop hands XLA one copy of the block per layer, so compile time grows with
depth; a scan hands it one body (MaxText scans its layers for this reason). The parameters of a
scanned group live in one sub-tree whose leaves are [n_layers, ...] (logical axis ``"layers"``),
`bltjax.models.layout` converts them to and from the per-layer ``layers_0 .. layers_{n-1}``.

Layers are applied functionally (``layer.apply({'params': params_i}, ...)``) inside the scan
rather than through `nn.scan`, so that the stacked initialisation can be, layer by layer, the
per-layer one: layer i of the stack is ``layers[i].init(fold_in(key, i))``, including the
depth-dependent standard deviations of ``init_std_factor`` (docs/architecture.md §12).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bltjax.models.configs import REMAT_POLICIES

# Logical name of the stacked axis; it has no sharding rule, so every chip holds every layer's shards.
LAYER_AXIS = "layers"

# Under a scan "block" and "full" both save only each layer's input (the scan carry): the
# backward pass of a while loop runs one iteration at a time, so a layer's recomputation cannot
# be hoisted ahead of its output gradient, which is what `anchored_remat` enforces for unrolled
# layers on XLA:CPU.
_SCAN_CHECKPOINT_POLICIES = {
    "block": jax.checkpoint_policies.nothing_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def stacked_parameters(
    module: nn.Module,
    name: str,
    layers: Sequence[nn.Module],
    group_keys: Sequence[Hashable],
    example_args: Callable[[], tuple],
) -> Any:
    """Declares (at init) and returns ``module``'s parameter sub-tree ``name``: the layers' trees stacked.

    ``layers`` are unbound (``parent=None``) modules, one per layer; layers with equal
    ``group_keys`` differ in nothing but their index, so each group is initialised by one
    vmapped ``init``. ``example_args()`` are inputs that `init` runs the layer on.
    """
    if len(layers) != len(group_keys):
        raise ValueError(f"{name}: {len(layers)} layers but {len(group_keys)} group keys")

    def init() -> Any:
        key = module.make_rng("params")
        groups: dict[Hashable, list[int]] = {}
        for index, group in enumerate(group_keys):
            groups.setdefault(group, []).append(index)
        parts, order = [], []
        for indices in groups.values():
            layer = layers[indices[0]]
            keys = jnp.stack([jax.random.fold_in(key, i) for i in indices])
            parts.append(jax.vmap(lambda k, layer=layer: layer.init(k, *example_args())["params"])(keys))
            order.extend(indices)
        stacked = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *[nn.meta.unbox(p) for p in parts])
        if order != sorted(order):  # groups of layers that are not contiguous: back to layer order
            permutation = jnp.asarray([order.index(i) for i in range(len(layers))])
            stacked = jax.tree.map(lambda x: x[permutation], stacked)
        # vmap stacked the values but not the axis names: the boxes get the "layers" axis in front.
        return nn.meta.add_axis(nn.meta.replace_boxed(parts[0], stacked), 0, {nn.PARTITION_NAME: LAYER_AXIS})

    return module.variable("params", name, init).value


def scan_stacked(
    body: Callable[[jax.Array, Any], jax.Array],
    carry: jax.Array,
    stacked: Any,
    remat: str,
) -> jax.Array:
    """``carry = body(carry, layer_i)`` for every layer slice of ``stacked``, as one `lax.scan`.

    ``remat`` (one of REMAT_POLICIES) wraps the body in `jax.checkpoint`: every policy but
    "none" keeps the carry, i.e. each layer's input; "save_dots" also the matmul outputs.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"model.remat: expected one of {REMAT_POLICIES}, got {remat!r}")

    def step(x: jax.Array, layer: Any) -> tuple[jax.Array, None]:
        return body(x, layer).astype(x.dtype), None

    if remat != "none":
        # prevent_cse=False: a scan body cannot be CSE'd across iterations anyway, and the
        # optimisation barriers prevent_cse adds would only slow the loop (jax.checkpoint's docs).
        step = jax.checkpoint(step, policy=_SCAN_CHECKPOINT_POLICIES[remat], prevent_cse=False)
    carry, _ = jax.lax.scan(step, carry, stacked)
    return carry


def layer_slice(stacked: Any, index: int) -> Any:
    """Layer ``index``'s parameters from a stacked sub-tree."""
    return jax.tree.map(lambda x: x[index], stacked)
