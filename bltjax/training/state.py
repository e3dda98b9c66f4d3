"""The training state (step, parameters, optimizer state) and its sharded creation.

Creation never materialises a full-size copy on the host: `jax.eval_shape` gives the abstract
state (with the modules' logical axis names), `sharding.placements` turns those names into
mesh shardings, and the initialiser runs under `jax.jit(..., out_shardings=...)` so each device
computes only its own shard (docs/architecture.md §12 init, bit-identical for any mesh).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from bltjax.models.factory import example_inputs
from bltjax.training import sharding


@flax.struct.dataclass
class TrainState:
    """A pure pytree: everything a checkpoint needs to continue training bit for bit."""

    step: jax.Array
    params: Any
    opt_state: Any


def _init_fn(model: nn.Module, optimizer: optax.GradientTransformation, config: ml_collections.ConfigDict):
    inputs = example_inputs(config)

    def init(rng: jax.Array) -> TrainState:
        params = model.init(rng, *inputs)["params"]
        # The boxes carry the logical axis names; the optimizer state mirrors the params.
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

    return init


def abstract_state(model: nn.Module, optimizer: optax.GradientTransformation, config: ml_collections.ConfigDict):
    """The boxed abstract state (ShapeDtypeStructs carrying logical axis names)."""
    return jax.eval_shape(_init_fn(model, optimizer, config), jax.random.key(0))


def state_placements(abstract: Any, mesh: Mesh) -> Any:
    """Placements of every leaf of the state: params and Adam moments share their layout."""
    return sharding.placements(abstract, mesh)


def state_shardings(abstract: Any, mesh: Mesh) -> Any:
    return sharding.shardings_of(state_placements(abstract, mesh), mesh)


def create_train_state(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    rng: jax.Array,
) -> tuple[TrainState, Any]:
    """(sharded initial state, its shardings). Parameters are unboxed plain arrays."""
    abstract = abstract_state(model, optimizer, config)
    shardings = state_shardings(abstract, mesh)
    init = _init_fn(model, optimizer, config)
    state = sharding.sharded_init(lambda key: nn.meta.unbox(init(key)), shardings, rng)
    return state, shardings


def restore_target(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with the target shardings: what orbax restores (and reshards) into."""
    plain = nn.meta.unbox(abstract)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), plain, shardings)


def parameter_count(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
