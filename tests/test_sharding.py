"""Activation sharding (bltjax.models.partitioning + the rules of bltjax.training.sharding).

On 8 fake CPU devices: the train step's activations carry the sharding the logical rules give
them (read from the lowered program's sharding constraints and from the compiled shardings of
the model's intermediates), and the loss, metrics and updated parameters equal those of the
same step without any constraint.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bltjax.config import load_config
from bltjax.models.factory import build_model
from bltjax.models.partitioning import activation_sharding, activation_spec, constrain
from bltjax.training import sharding
from bltjax.training.optimizer import learning_rate_schedule, make_optimizer
from bltjax.training.state import create_train_state
from bltjax.training.step import jit_train_step, make_eval_step, make_train_step

TINY = "experiments/blt_tiny.py"
ROWS, SEQ, PATCHES = 8, 128, 48  # k * PATCHES != SEQ: byte and slot tensors differ in shape


def _mesh(data: int, fsdp: int, tensor: int):
    config = load_config(TINY)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
    return sharding.make_mesh(config, jax.devices()[: data * fsdp * tensor])


def _table(rules) -> dict:
    return {name: sharding._mesh_axes(entry) for name, entry in rules}


# --- the rule table ----------------------------------------------------------------------------


def test_activation_spec_follows_the_rules_and_drops_what_does_not_divide():
    mesh = _mesh(2, 2, 2)
    table = _table(sharding.LOGICAL_RULES)
    assert activation_spec((8, 128, 64), ("batch", "length", "act_embed"), mesh, table) == P(
        ("data", "fsdp"), None, None
    )
    # 2 rows: only the first batch axis divides them; 1 row: none does.
    assert activation_spec((2, 128, 64), ("batch", "length", "act_embed"), mesh, table) == P("data", None, None)
    assert activation_spec((1, 128, 64), ("batch", "length", "act_embed"), mesh, table) == P(None, None, None)
    # Heads over tensor, unless tensor does not divide them.
    assert activation_spec((8, 16, 4, 32), ("batch", "length", "act_heads", None), mesh, table)[2] == "tensor"
    assert activation_spec((8, 16, 3, 32), ("batch", "length", "act_heads", None), mesh, table)[2] is None
    with pytest.raises(ValueError, match="logical names"):
        activation_spec((8, 128), ("batch", "length", "act_embed"), mesh, table)


def test_sequence_rules_split_rows_along_their_length():
    mesh = _mesh(2, 2, 2)
    rules = sharding.activation_rules("tensor")
    spec = activation_spec((8, 128, 64), ("batch", "length", "act_embed"), mesh, _table(rules))
    assert spec == P(("data", "fsdp"), "tensor", None)
    rules = sharding.activation_rules("fsdp")  # fsdp leaves the batch and splits the bytes
    spec = activation_spec((8, 128, 64), ("batch", "length", "act_embed"), mesh, _table(rules))
    assert spec == P("data", "fsdp", None)
    assert sharding.activation_rules(None) == sharding.LOGICAL_RULES
    with pytest.raises(sharding.MeshError, match="config.mesh.sequence"):
        sharding.activation_rules("rows")
    # Parameter rules are untouched by the switch.
    assert dict(rules)["embed"] == dict(sharding.LOGICAL_RULES)["embed"]


def test_constrain_is_a_no_op_outside_the_context():
    x = jnp.ones((8, 4))
    assert constrain(x, ("batch", "act_embed")) is x
    text = jax.jit(lambda a: constrain(a, ("batch", "act_embed")) * 2).lower(x).as_text()
    assert "sharding_constraint" not in text


# --- the train step ----------------------------------------------------------------------------


def _setup(data: int, fsdp: int, tensor: int, grad_accum: int = 1):
    config = load_config(TINY)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
    config.data.batch_size = ROWS
    config.train.grad_accum = grad_accum
    mesh = sharding.make_mesh(config, jax.devices()[: data * fsdp * tensor])
    config.model.hash_rows_multiple = sharding.hash_rows_multiple(mesh)
    model, optimizer = build_model(config), make_optimizer(config)
    return config, mesh, model, optimizer


def _batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 260, (ROWS, SEQ)).astype(np.int32)
    tokens[:, 50] = 2  # an EOS: document segments too
    lengths = np.zeros((ROWS, PATCHES), np.int32)
    lengths[:, 0] = 1
    lengths[:, 1:33] = 4  # 1 + 32 * 4 = SEQ + 1 (the training convention)
    return {
        "tokens": tokens,
        "patch_lengths": lengths,
        "targets": np.roll(tokens, -1, axis=1),
        "loss_mask": np.ones((ROWS, SEQ), bool),
    }


def _step(config, mesh, model, optimizer, rules=None):
    state, shardings = create_train_state(model, optimizer, config, mesh, jax.random.key(0))
    batch_sharding = sharding.batch_sharding(mesh)
    step = make_train_step(
        model,
        optimizer,
        learning_rate_schedule(config),
        model_type="blt",
        grad_accum=config.train.grad_accum,
        batch_sharding=batch_sharding,
        activation_rules=rules,
    )
    batch = jax.device_put(_batch(), batch_sharding)
    return jit_train_step(step, shardings, batch_sharding), state, batch


def _constraints(lowered) -> list[tuple[str, str]]:
    """(mesh axes, tensor type) of every sharding constraint in a lowered program."""
    pattern = re.compile(r"sdy\.sharding_constraint .*<@mesh, \[(.*)\]> : tensor<([^>]*)>")
    return [m.groups() for m in pattern.finditer(lowered.as_text())]


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh_shape, rules, byte_spec",
    [
        ((2, 4, 1), None, '{"data", "fsdp"}, {}, {}'),
        ((2, 2, 2), sharding.activation_rules("tensor"), '{"data", "fsdp"}, {"tensor"}, {}'),
    ],
    ids=["batch", "sequence"],
)
def test_train_step_activations_follow_the_rules(mesh_shape, rules, byte_spec):
    config, mesh, model, optimizer = _setup(*mesh_shape)
    step, state, batch = _step(config, mesh, model, optimizer, rules)
    constraints = _constraints(step.lower(state, batch))
    e_local, e_global = config.model.encoder.dim, config.model.latent.dim
    byte_states = [axes for axes, ty in constraints if ty == f"{ROWS}x{SEQ}x{e_local}xf32"]
    patch_states = [axes for axes, ty in constraints if ty == f"{ROWS}x{PATCHES}x{e_global}xf32"]
    logits = [axes for axes, ty in constraints if ty == f"{ROWS}x{SEQ}x260xf32"]
    hash_sums = [axes for axes, ty in constraints if ty.startswith(f"{len(config.model.hash_sizes)}x{ROWS}x{SEQ}x")]
    # Encoder and decoder byte states (forward and their gradients), latent boundaries, logits, hash ids.
    assert len(byte_states) >= 2 * (config.model.encoder.n_layers + config.model.decoder.n_layers)
    assert set(byte_states) == {byte_spec}
    assert patch_states and set(patch_states) == {'{"data", "fsdp"}, {}, {}'}
    assert logits and set(logits) == {byte_spec}
    assert hash_sums and all(axes.startswith('{}, {"data", "fsdp"}') for axes in hash_sums)


@pytest.mark.slow
def test_compiled_intermediates_are_split_over_the_batch_axes():
    """The model's intermediates, returned from a jitted forward, come out split 8 ways over the rows."""
    config, mesh, model, _ = _setup(2, 4, 1)
    batch = jax.device_put(_batch(), sharding.batch_sharding(mesh))
    params = model.init(jax.random.key(0), batch["tokens"], batch["patch_lengths"])["params"]

    def forward(p, tokens, lengths):
        with activation_sharding(mesh, sharding.LOGICAL_RULES):
            _, inter = model.apply({"params": p}, tokens, lengths, mutable=["intermediates"])
        return {name: value[0] for name, value in inter["intermediates"].items() if isinstance(value, tuple)}

    compiled = jax.jit(forward).lower(params, batch["tokens"], batch["patch_lengths"]).compile()
    inter = compiled.output_shardings
    for name in ("encoder_hidden", "encoder_patch_embeds", "global_output"):
        spec = inter[name].spec
        assert spec and spec[0] == ("data", "fsdp"), (name, spec)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh_shape, grad_accum, sequence",
    [((2, 4, 1), 1, None), ((2, 4, 1), 2, None), ((2, 2, 2), 1, "tensor")],
    ids=["batch", "batch-accum", "sequence"],
)
def test_loss_and_grads_equal_the_unconstrained_step(mesh_shape, grad_accum, sequence):
    config, mesh, model, optimizer = _setup(*mesh_shape, grad_accum)
    step, state, batch = _step(config, mesh, model, optimizer, sharding.activation_rules(sequence))
    # The same step with no constraint at all (no mesh given to make_train_step), run first: the
    # sharded step donates the state.
    plain = jax.jit(make_train_step(model, optimizer, learning_rate_schedule(config), model_type="blt",
                                    grad_accum=grad_accum))  # fmt: skip
    assert "sharding_constraint" not in plain.lower(state, batch).as_text()
    ref_state, ref_metrics = jax.device_get(plain(state, batch))
    new_state, metrics = step(state, batch)
    for name in ("loss", "grad_norm", "nats_sum", "n_targets"):
        np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=2e-5, err_msg=name)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
        new_state.params,
        ref_state.params,
    )


@pytest.mark.slow
def test_eval_step_places_activations_like_the_train_step():
    config, mesh, model, _ = _setup(2, 4, 1)
    batch_sharding = sharding.batch_sharding(mesh)
    batch = jax.device_put(_batch(), batch_sharding)
    params = model.init(jax.random.key(0), batch["tokens"], batch["patch_lengths"])["params"]
    sharded = jax.jit(make_eval_step(model, model_type="blt", batch_sharding=batch_sharding))
    plain = jax.jit(make_eval_step(model, model_type="blt"))
    assert any(axes.startswith('{"data", "fsdp"}') for axes, _ in _constraints(sharded.lower(params, batch)))
    assert not _constraints(plain.lower(params, batch))
    got, want = sharded(params, batch), plain(params, batch)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-5, err_msg=name)
