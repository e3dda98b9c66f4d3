"""The pure training and evaluation steps: ``train_step(state, batch) -> (state, metrics)``.

Loss (docs/architecture.md §11): per micro-batch, the mean next-byte NLL over its loss-mask targets, divided by
the number of micro-batches, so that the summed gradient is the mean of the micro-batch means
(the official definition). Gradient accumulation runs inside the step with `jax.lax.scan`, so a
step is one compiled program whatever the accumulation factor; gradients are accumulated in
float32 whatever the parameter dtype.

The micro-batch of index a takes rows a, a + A, a + 2A, ... of the global batch (a reshape to
[B/A, A] then a swap), so every device keeps contributing rows to every micro-batch instead of
the micro-batches walking across the devices.

Activations are sharded by the logical rules of `bltjax.training.sharding` (batch over data x
fsdp) whenever the step is built for a mesh of more than one device: the model's `constrain`
calls are no-ops elsewhere (`bltjax.models.partitioning`).

Metrics are sums (nats, counted targets, byte targets) rather than means, so that the host can
aggregate any number of steps exactly into bits-per-byte.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from bltjax.models.partitioning import activation_sharding
from bltjax.runtime import xla_options
from bltjax.training import sharding as sharding_rules
from bltjax.training.metrics import summarize_nll, token_nll
from bltjax.training.state import TrainState
from bltjax.training.token_metrics import summarize_token_nll

Batch = Mapping[str, jax.Array]
MODEL_INPUTS = {
    "blt": ("tokens", "patch_lengths"),
    "byte_lm": ("tokens",),
    "megabyte": ("tokens",),
    "token_lm": ("tokens",),
}
# Batch fields a model type needs besides its inputs, targets and loss mask: a token LM's bits per
# byte divide by the bytes its targets cover (bltjax/training/token_metrics.py).
LOSS_FIELDS = {"token_lm": ("target_bytes",)}


def batch_fields(model_type: str) -> tuple[str, ...]:
    """The batch fields a model type trains on."""
    return (*MODEL_INPUTS[model_type], "targets", "loss_mask", *LOSS_FIELDS.get(model_type, ()))


def _nll_stats(model: nn.Module, model_type: str, params: Any, batch: Batch) -> dict[str, jax.Array]:
    logits = model.apply({"params": params}, *(batch[name] for name in MODEL_INPUTS[model_type]))
    nll = token_nll(logits, batch["targets"])
    if "target_bytes" in batch:
        return summarize_token_nll(nll, batch["targets"], batch["loss_mask"], batch["target_bytes"])
    return summarize_nll(nll, batch["targets"], batch["loss_mask"])


def _split_micro(batch: Batch, accum: int, sharding: NamedSharding | None) -> Batch:
    """[B, ...] -> [A, B/A, ...] with micro-batch a = rows a::A (see module docstring)."""

    def split(x: jax.Array) -> jax.Array:
        rows = x.shape[0]
        x = x.reshape(rows // accum, accum, *x.shape[1:]).swapaxes(0, 1)
        if sharding is not None:
            spec = jax.sharding.PartitionSpec(None, *sharding.spec)
            x = jax.lax.with_sharding_constraint(x, NamedSharding(sharding.mesh, spec))
        return x

    return {name: split(value) for name, value in batch.items()}


def _activation_context(
    batch_sharding: NamedSharding | None, rules: Sequence[tuple[str, Any]] | None
) -> Callable[[], contextlib.AbstractContextManager]:
    """The model's activation-sharding context on the batch's mesh; nothing on one device or without a mesh."""
    if batch_sharding is None or batch_sharding.mesh.size == 1:
        return contextlib.nullcontext
    rules = sharding_rules.LOGICAL_RULES if rules is None else rules
    return lambda: activation_sharding(batch_sharding.mesh, rules)


def make_train_step(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    model_type: str,
    grad_accum: int = 1,
    batch_sharding: NamedSharding | None = None,
    activation_rules: Sequence[tuple[str, Any]] | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The un-jitted pure step; `jit_train_step` adds shardings and donation.

    ``activation_rules`` (default `sharding.LOGICAL_RULES`; `sharding.activation_rules` for
    sequence sharding) place the model's activations on ``batch_sharding``'s mesh.
    """
    fields = batch_fields(model_type)
    context = _activation_context(batch_sharding, activation_rules)

    def micro_grads(params: Any, micro: Batch) -> tuple[Any, dict[str, jax.Array]]:
        def loss_fn(p: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
            stats = _nll_stats(model, model_type, p, micro)
            loss = stats["nats_sum"] / (stats["n_targets"] + 1e-6) / grad_accum
            return loss, stats

        # The backward pass (custom VJPs, rematerialised blocks) is traced inside the context too.
        with context():
            (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return jax.tree.map(lambda g: g.astype(jnp.float32), grads), stats

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        batch = {name: batch[name] for name in fields}
        if grad_accum == 1:
            grads, stats = micro_grads(state.params, batch)
        else:
            micro = _split_micro(batch, grad_accum, batch_sharding)
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)

            def body(carry, one):
                grads_sum, stats_sum = carry
                grads, stats = micro_grads(state.params, one)
                return (jax.tree.map(jnp.add, grads_sum, grads), jax.tree.map(jnp.add, stats_sum, stats)), None

            first_stats = jax.eval_shape(lambda: micro_grads(state.params, jax.tree.map(lambda x: x[0], micro))[1])
            stats_zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first_stats)
            (grads, stats), _ = jax.lax.scan(body, (zeros, stats_zero), micro)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(stats)
        metrics["loss"] = stats["nats_sum"] / (stats["n_targets"] + 1e-6)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["learning_rate"] = schedule(state.step)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def train_step_of_config(
    config: Any,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    batch_sharding: NamedSharding,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """`make_train_step` with what an experiment config sets: the one step `bltjax.train` runs
    and `bltjax.compile` compiles, so the two cannot drift apart."""
    return make_train_step(
        model,
        optimizer,
        schedule,
        model_type=config.model_type,
        grad_accum=config.train.grad_accum,
        batch_sharding=batch_sharding,
        activation_rules=sharding_rules.activation_rules(config.mesh.get("sequence")),
    )


def jit_train_step(step_fn: Callable, state_shardings: Any, batch_sharding: NamedSharding) -> Callable:
    """Explicit in/out shardings; the old state is donated (its buffers become the new state's).

    Compiled with `xla_options.compiler_options` for the mesh's devices (on CPU: attention's
    small batched dots through XLA's own kernels, about 20% off the reference step).
    """
    return xla_options.jit(
        step_fn,
        batch_sharding.mesh.devices.flat,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )


def jit_eval_step(eval_fn: Callable, param_shardings: Any, batch_sharding: NamedSharding) -> Callable:
    """The eval step's jit: parameters and batch as placed, with the train step's compiler options."""
    return xla_options.jit(eval_fn, batch_sharding.mesh.devices.flat, in_shardings=(param_shardings, batch_sharding))


def make_eval_step(
    model: nn.Module,
    *,
    model_type: str,
    batch_sharding: NamedSharding | None = None,
    activation_rules: Sequence[tuple[str, Any]] | None = None,
) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """``eval_step(params, batch) -> summed NLL statistics`` (no gradients); activations placed as in training."""
    fields = batch_fields(model_type)
    context = _activation_context(batch_sharding, activation_rules)

    def eval_step(params: Any, batch: Batch) -> dict[str, jax.Array]:
        with context():
            return _nll_stats(model, model_type, params, {name: batch[name] for name in fields})

    return eval_step
