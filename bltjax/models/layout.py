"""The two parameter layouts of a model and the conversions between them.

Per-layer (``scan_layers=False``): layer i of a stack is the sub-tree ``layers_i`` (and
``cross_attention_i``). Stacked (``scan_layers=True``, `bltjax.models.scan`): one sub-tree
``layers`` (``cross_attention``) whose leaves carry a leading [n_layers] axis. The values are
the same model either way, so Hugging Face import / export, exported models and checkpoints of
one layout load into the other through `stack_layers` / `unstack_layers`.

The functions work on plain (unboxed) trees of arrays or of `jax.ShapeDtypeStruct`s, so that a
restore can plan the conversion before it reads anything.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from bltjax.models.configs import BLTConfig, ByteLMConfig


class LayoutError(ValueError):
    """A parameter tree that is in neither layout of the model; names the parameter."""


def stacked_groups(config: BLTConfig | ByteLMConfig) -> tuple[tuple[tuple[str, ...], str, int], ...]:
    """(path of the parent sub-tree, group name, n_layers) of every group a scanned model stacks."""
    if isinstance(config, ByteLMConfig):
        return (((("transformer",), "layers", config.stack.n_layers)),)
    groups = [
        (("local_encoder",), "layers", config.encoder.n_layers),
        (("latent", "transformer"), "layers", config.latent.n_layers),
        (("local_decoder",), "layers", config.decoder.n_layers),
    ]
    if config.cross_attn_all_layers_decoder:
        groups.append((("local_decoder",), "cross_attention", config.decoder.n_layers))
    return tuple(groups)


def with_scan(config: BLTConfig | ByteLMConfig, scan_layers: bool) -> BLTConfig | ByteLMConfig:
    """``config`` with ``scan_layers`` set (the same model in the other layout)."""
    return dataclasses.replace(config, scan_layers=scan_layers)


def is_stacked(params: dict, config: BLTConfig | ByteLMConfig) -> bool:
    """True if ``params`` is in the stacked layout, False if per-layer; LayoutError if neither."""
    parent_path, name, _ = stacked_groups(config)[0]
    parent = _subtree(params, parent_path)
    if name in parent:
        return True
    if f"{name}_0" in parent:
        return False
    where = "/".join(parent_path)
    raise LayoutError(f"parameters: {where} holds neither '{name}' (stacked) nor '{name}_0' (per layer)")


def stack_layers(params: dict, config: BLTConfig | ByteLMConfig) -> dict:
    """Per-layer ``layers_0 .. layers_{n-1}`` sub-trees -> one ``layers`` sub-tree of [n, ...] leaves."""
    out = _copy(params)
    for parent_path, name, n in stacked_groups(config):
        parent = _subtree(out, parent_path)
        missing = [f"{name}_{i}" for i in range(n) if f"{name}_{i}" not in parent]
        if missing:
            raise LayoutError(f"parameters: {'/'.join(parent_path + (missing[0],))} is missing ({n} layers expected)")
        layers = [parent.pop(f"{name}_{i}") for i in range(n)]
        parent[name] = jax.tree.map(_stack, *layers)
    return out


def unstack_layers(params: dict, config: BLTConfig | ByteLMConfig) -> dict:
    """One ``layers`` sub-tree of [n, ...] leaves -> per-layer ``layers_0 .. layers_{n-1}`` sub-trees."""
    out = _copy(params)
    for parent_path, name, n in stacked_groups(config):
        parent = _subtree(out, parent_path)
        if name not in parent:
            raise LayoutError(f"parameters: {'/'.join(parent_path + (name,))} is missing (stacked layout expected)")
        stacked = parent.pop(name)
        for path, leaf in jax.tree_util.tree_flatten_with_path(stacked)[0]:
            if leaf.shape[:1] != (n,):
                where = "/".join(parent_path + (name,) + tuple(str(k.key) for k in path))
                raise LayoutError(f"parameters: {where} has shape {list(leaf.shape)}, expected a leading axis of {n}")
        for i in range(n):
            parent[f"{name}_{i}"] = jax.tree.map(lambda x, i=i: _index(x, i), stacked)
    return out


def to_layout(params: dict, config: BLTConfig | ByteLMConfig) -> dict:
    """``params`` of either layout in the layout ``config.scan_layers`` asks for (unchanged if already)."""
    stacked = is_stacked(params, config)
    if stacked == config.scan_layers:
        return params
    return stack_layers(params, config) if config.scan_layers else unstack_layers(params, config)


def _stack(*leaves: Any) -> Any:
    first = leaves[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        sharding = _resharded(first.sharding, lambda spec: (None, *spec))
        return jax.ShapeDtypeStruct((len(leaves),) + tuple(first.shape), first.dtype, sharding=sharding)
    if isinstance(first, np.ndarray):
        return np.stack(leaves)
    return jnp.stack(leaves)


def _index(leaf: Any, i: int) -> Any:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        sharding = _resharded(leaf.sharding, lambda spec: tuple(spec)[1:])
        return jax.ShapeDtypeStruct(tuple(leaf.shape[1:]), leaf.dtype, sharding=sharding)
    return leaf[i]


def _resharded(sharding: Any, edit_spec: Any) -> Any:
    """A planned leaf's sharding with the layer axis added / removed (a named one keeps its other axes)."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*edit_spec(sharding.spec)))
    return sharding  # None, or one device: the same for every layer


def _copy(tree: Any) -> Any:
    """Fresh dicts all the way down (leaves shared), so conversions never mutate their input."""
    if isinstance(tree, dict) or hasattr(tree, "items") and not hasattr(tree, "shape"):
        return {k: _copy(v) for k, v in tree.items()}
    return tree


def _subtree(tree: dict, path: tuple[str, ...]) -> dict:
    for i, key in enumerate(path):
        if key not in tree:
            raise LayoutError(f"parameters: {'/'.join(path[: i + 1])} is missing")
        tree = tree[key]
    return tree
