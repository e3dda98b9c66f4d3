"""Activation rematerialisation as named policies, applied by a stack to its module classes.

``rematerialise(TransformerBlock, policy)`` returns the class to instantiate, the way
``nn.remat(Block, policy=...)`` does; parameters (names, shapes) and values are the same
under every policy, only what the backward pass keeps or recomputes changes:

* ``"none"``: autodiff keeps what it needs;
* ``"full"``: `nn.remat` saving nothing (``jax.checkpoint_policies.nothing_saveable``);
* ``"save_dots"``: `nn.remat` keeping the matmul outputs without batch dimensions
  (``dots_with_no_batch_dims_saveable``), what TPUs usually want;
* ``"block"``: keep only the module's inputs and the attention records, recompute the rest once
  the module's output gradient exists (`anchored_remat`).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from bltjax.kernels.remat import recompute_after_cotangent
from bltjax.models.configs import REMAT_POLICIES

# The Flax collection in which a self-attention records what its kernel can replay (the
# attention output and log-sum-exp) during the first run of an `anchored_remat` module.
ATTENTION_RECORD = "attention_record"

_CHECKPOINT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@functools.cache
def rematerialise(module_class: type[nn.Module], policy: str) -> type[nn.Module]:
    """``module_class`` under the remat ``policy`` (one of `REMAT_POLICIES`); same constructor."""
    if policy == "none":
        return module_class
    if policy == "block":
        return anchored_remat(module_class)
    if policy in _CHECKPOINT_POLICIES:
        return nn.remat(module_class, policy=_CHECKPOINT_POLICIES[policy])
    raise ValueError(f"model.remat: expected one of {REMAT_POLICIES}, got {policy!r}")


def anchored_remat(module_class: type[nn.Module]) -> type[nn.Module]:
    """A subclass of ``module_class`` whose ``__call__`` is recomputed in the backward pass.

    On XLA:CPU plain `jax.checkpoint` lets the scheduler hoist every layer's recomputation to
    the start of the backward pass, so memory is not bounded; here the recomputation's inputs
    are anchored to the output's cotangent (`bltjax.kernels.remat`), and attention kernels
    replay what they recorded in the first run instead of recomputing their scores.

    Float inputs (and the parameters) get gradients; integer and boolean inputs (positions,
    segment ids, indices, masks) get none. Static settings belong in module attributes.
    """

    def __call__(self, *args, **kwargs):
        if self.is_initializing():
            return module_class.__call__(self, *args, **kwargs)
        # The same module, unbound (parent=None), applied to this scope's parameters in the custom VJP.
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(module_class) if f.init}
        plain = module_class(**{k: v for k, v in fields.items() if k not in ("parent", "name")}, parent=None)
        leaves, tree = jax.tree.flatten((args, kwargs))
        is_float = [jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in leaves]

        def run(differentiable, fixed, replay):
            params, floats = differentiable
            floats, fixed = iter(floats), iter(fixed)
            call_args, call_kwargs = jax.tree.unflatten(tree, [next(floats if f else fixed) for f in is_float])
            if replay is None:
                y, variables = plain.apply({"params": params}, *call_args, mutable=[ATTENTION_RECORD], **call_kwargs)
                return y, variables.get(ATTENTION_RECORD, {})
            return plain.apply({"params": params, ATTENTION_RECORD: replay}, *call_args, **call_kwargs), replay

        floats = [x for x, f in zip(leaves, is_float, strict=True) if f]
        fixed = [x for x, f in zip(leaves, is_float, strict=True) if not f]
        return recompute_after_cotangent(run)((self.variables["params"], floats), fixed)

    return type(f"Anchored{module_class.__name__}", (module_class,), {"__call__": __call__})
