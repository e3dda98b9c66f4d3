"""Scanned layers (bltjax.models.scan) and the two parameter layouts (bltjax.models.layout).

A model with ``scan_layers`` is the same function as without: with converted parameters it
gives the same logits and gradients, under every remat policy; its stacked initialisation is
the per-layer one, layer by layer; it decodes through the same KV-cache methods; and per-layer
parameters (exported models, Hugging Face folders) load into it and back.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bltjax import checkpoints
from bltjax.config import ConfigError, base_byte_lm_config, load_config, model_config, paper_blt_config
from bltjax.convert import hf
from bltjax.inference.generation import IncrementalRule, generate
from bltjax.models import layout, scan
from bltjax.models.blt import BLT
from bltjax.models.byte_lm import ByteLM
from bltjax.models.configs import BLTConfig, TransformerConfig
from bltjax.models.layers import Transformer, TransformerBlock, block_example_args, empty_kv_caches

TOKENS = np.array([[1, 5, 6, 7, 2, 9, 10, 11, 12, 13, 14, 15], [1, 40, 41, 2, 43, 44, 45, 46, 47, 2, 49, 50]], np.int32)
LENGTHS = np.array([[1, 3, 4, 5, 0], [1, 2, 2, 5, 3]], np.int32)


def _blt_config(**overrides) -> BLTConfig:
    return BLTConfig(
        encoder=TransformerConfig(32, 2, 4, window=6),
        latent=TransformerConfig(48, 3, 4, n_kv_heads=2),
        decoder=TransformerConfig(32, 3, 4, window=6),
        hash_sizes=(3, 4),
        hash_vocab=50,
        init_std_factor="current_depth",
        **overrides,
    )


def _max_abs(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_stacked_init_is_the_per_layer_init_layer_by_layer():
    """Layer i of the stack is ``layers[i].init(fold_in(key, i))``, depth-dependent std included."""
    cfg = TransformerConfig(64, 4, 4)
    layers = [TransformerBlock(cfg, i, "current_depth", parent=None) for i in range(cfg.n_layers)]
    factors = [np.sqrt(2 * (i + 1)) for i in range(cfg.n_layers)]

    class Holder(nn.Module):
        @nn.compact
        def __call__(self):
            return scan.stacked_parameters(
                self, "layers", layers, factors, lambda: block_example_args(cfg, jnp.float32)
            )

    variables = Holder().init({"params": jax.random.key(3)})
    boxed = variables["params"]["layers"]["attention"]["query"]["kernel"]
    assert boxed.names == ("layers", "embed", "heads", "head_dim")
    stacked = nn.meta.unbox(variables["params"]["layers"])
    key = Holder().bind({}, rngs={"params": jax.random.key(3)}).make_rng("params")
    for i, layer in enumerate(layers):
        per_layer = nn.meta.unbox(layer.init(jax.random.fold_in(key, i), *block_example_args(cfg, jnp.float32)))
        np.testing.assert_array_equal(
            np.asarray(stacked["ffn"]["up"]["kernel"][i]), np.asarray(per_layer["params"]["ffn"]["up"]["kernel"])
        )
        assert _max_abs(scan.layer_slice(stacked, i), per_layer["params"]) == 0.0
    stds = [float(jnp.std(stacked["attention"]["out"]["kernel"][i])) for i in range(cfg.n_layers)]
    ratios = np.array(stds) / stds[0]
    np.testing.assert_allclose(ratios, factors[0] / np.array(factors), rtol=0.1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "all_decoder_layers, remat",
    [(True, "none"), (True, "block"), (False, "save_dots"), (False, "full")],
)
def test_scanned_blt_equals_unscanned_in_logits_and_gradients(all_decoder_layers, remat):
    cfg = _blt_config(cross_attn_all_layers_decoder=all_decoder_layers, remat=remat)
    scanned_cfg = layout.with_scan(cfg, True)
    model, scanned = BLT(cfg), BLT(scanned_cfg)
    params = nn.meta.unbox(model.init(jax.random.key(0), TOKENS, LENGTHS)["params"])
    stacked = layout.stack_layers(params, cfg)
    abstract = nn.meta.unbox(jax.eval_shape(lambda: scanned.init(jax.random.key(0), TOKENS, LENGTHS))["params"])
    assert jax.tree.structure(abstract) == jax.tree.structure(stacked)
    assert [a.shape for a in jax.tree.leaves(abstract)] == [a.shape for a in jax.tree.leaves(stacked)]
    assert stacked["latent"]["transformer"]["layers"]["ffn"]["up"]["kernel"].shape[0] == 3

    def loss(p, m):
        return jnp.mean(jax.nn.log_softmax(m.apply({"params": p}, TOKENS, LENGTHS))[..., 7])

    np.testing.assert_allclose(
        scanned.apply({"params": stacked}, TOKENS, LENGTHS), model.apply({"params": params}, TOKENS, LENGTHS), atol=1e-5
    )
    grads = jax.grad(loss)(params, model)
    scanned_grads = layout.unstack_layers(jax.grad(loss)(stacked, scanned), cfg)
    assert jax.tree.structure(grads) == jax.tree.structure(scanned_grads)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads))
    assert _max_abs(grads, scanned_grads) <= 1e-5 * scale


def test_layout_conversion_round_trips_and_names_what_is_wrong():
    cfg = _blt_config()
    params = nn.meta.unbox(BLT(cfg).init(jax.random.key(0), TOKENS, LENGTHS)["params"])
    stacked = layout.stack_layers(params, cfg)
    assert "layers_0" in params["local_decoder"] and "layers_0" not in stacked["local_decoder"]
    assert stacked["local_decoder"]["cross_attention"]["query"]["kernel"].shape[0] == 3
    assert layout.is_stacked(stacked, cfg) and not layout.is_stacked(params, cfg)
    assert _max_abs(layout.unstack_layers(stacked, cfg), params) == 0.0
    assert layout.to_layout(params, layout.with_scan(cfg, True)).keys() == stacked.keys()
    assert layout.to_layout(stacked, cfg)["latent"]["transformer"].keys() == params["latent"]["transformer"].keys()
    broken = layout.unstack_layers(stacked, cfg)
    del broken["latent"]["transformer"]["layers_2"]
    with pytest.raises(layout.LayoutError, match="latent/transformer/layers_2 is missing"):
        layout.stack_layers(broken, cfg)
    with pytest.raises(layout.LayoutError, match="neither 'layers'"):
        layout.is_stacked({"local_encoder": {}}, cfg)


def test_scan_layers_is_on_for_paper_configs_only_and_validated():
    assert model_config(paper_blt_config("1b")).scan_layers
    assert model_config(load_config("experiments/blt_1b.py:v5p-128")).scan_layers
    assert not model_config(load_config("experiments/blt_tiny.py")).scan_layers
    assert not model_config(base_byte_lm_config()).scan_layers
    config = paper_blt_config("400m")
    config.model.cross_attn_all_layers_encoder = True
    with pytest.raises(ConfigError, match="config.model.cross_attn_all_layers_encoder: expected False with scan"):
        model_config(config)
    config = base_byte_lm_config()
    config.model.scan_layers = None
    with pytest.raises(ConfigError, match="config.model.scan_layers: expected True or False"):
        model_config(config)


def test_scanned_stack_decodes_like_its_training_forward():
    """Prefill, then `step` through a ring cache of 5 slots, of a scanned stack == its training forward."""
    cfg = TransformerConfig(32, 3, 4, n_kv_heads=2, window=5)
    stack = Transformer(cfg, "current_depth", scan=True)
    b, n, prompt = 2, 11, 4
    x = np.random.default_rng(0).standard_normal((b, n, cfg.dim)).astype(np.float32)
    positions = np.broadcast_to(np.arange(n, dtype=np.int32), (b, n))
    segments = np.array([[0] * 6 + [1] * 5, [0] * 11], np.int32)
    params = nn.meta.unbox(stack.init(jax.random.key(0), x, positions, segments)["params"])
    assert params["layers"]["ffn"]["up"]["kernel"].shape[0] == 3
    expected = np.asarray(stack.apply({"params": params}, x, positions, segments))
    caches = empty_kv_caches(cfg, b, n, jnp.float32)
    valid = np.ones((b, prompt), bool)
    args = x[:, :prompt], positions[:, :prompt], segments[:, :prompt], caches, valid
    out, caches = stack.apply({"params": params}, *args, method=Transformer.prefill)
    np.testing.assert_allclose(out, expected[:, :prompt], atol=1e-5)
    for t in range(prompt, n):
        step = x[:, t], positions[:, t], segments[:, t], caches, np.ones((b,), bool)
        out, caches = stack.apply({"params": params}, *step, method=Transformer.step)
        np.testing.assert_allclose(out, expected[:, t], atol=1e-5, err_msg=f"position {t}")


@pytest.mark.slow
def test_per_layer_model_folder_restores_into_a_scanned_model_and_back(tmp_path):
    config = load_config("experiments/blt_tiny.py")
    config.data.seq_len, config.data.max_patches = 12, 5
    config.model.latent.n_layers = 2
    _, model, params = _saved(config, tmp_path / "per_layer")
    logits = model.apply({"params": params}, TOKENS, LENGTHS)

    scanned_config, scanned, stacked = checkpoints.load_model(tmp_path / "per_layer", scan_layers=True)
    assert scanned_config.model.scan_layers and scanned.config.scan_layers
    assert layout.is_stacked(stacked, scanned.config)
    np.testing.assert_allclose(scanned.apply({"params": stacked}, TOKENS, LENGTHS), logits, atol=1e-5)

    checkpoints.save_model(tmp_path / "stacked", scanned_config, stacked)
    _, unrolled, back = checkpoints.load_model(tmp_path / "stacked", scan_layers=False)
    assert not unrolled.config.scan_layers
    assert _max_abs(back, params) == 0.0
    _, _, as_saved = checkpoints.load_model(tmp_path / "stacked")
    assert _max_abs(as_saved, stacked) == 0.0


def test_a_parameter_of_neither_layout_is_named(tmp_path):
    config = load_config("experiments/blt_tiny.py")
    config.data.seq_len, config.data.max_patches = 12, 5
    config.model.latent.n_layers = 2
    _saved(config, tmp_path / "model")
    config.model.latent.n_layers = 3  # a third layer the folder does not have, in either layout
    target = checkpoints.abstract_params(BLT(model_config(config)), config)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
        nn.meta.unbox(target),
    )
    record = layout.with_scan(model_config(config), True)
    stacked_target = layout.to_layout(target, record)
    with pytest.raises(checkpoints.CheckpointError, match="latent/transformer/layers"):
        checkpoints.restore_params(tmp_path / "model" / "params", stacked_target, "config", model_config=record)


def _saved(config, directory):
    model = BLT(model_config(config))
    params = nn.meta.unbox(model.init(jax.random.key(0), TOKENS, LENGTHS)["params"])
    checkpoints.save_model(directory, config, params)
    return config, model, params


def test_byte_lm_scanned_from_hugging_face_equals_per_layer(fixtures_dir):
    path = fixtures_dir / "hf_blt_tiny_b"
    model, params, threshold = hf.load_hf_entropy_model(path)
    scanned, stacked, scanned_threshold = hf.load_hf_entropy_model(path, scan_layers=True)
    assert isinstance(scanned, ByteLM) and scanned.config == dataclasses.replace(model.config, scan_layers=True)
    assert threshold == scanned_threshold and "layers" in stacked["transformer"]
    np.testing.assert_allclose(
        scanned.apply({"params": stacked}, TOKENS), model.apply({"params": params}, TOKENS), atol=1e-5, rtol=1e-5
    )
    exported = hf.to_hf_state_dict(scanned, stacked)
    assert exported.keys() == hf.to_hf_state_dict(model, params).keys()


@pytest.mark.slow
def test_hugging_face_import_into_scanned_layout_matches_fixture_and_exports_back(fixtures_dir, tmp_path):
    path = fixtures_dir / "hf_blt_tiny_b"
    model, stacked = hf.load_hf_blt(path, scan_layers=True)
    assert model.config.scan_layers and layout.is_stacked(stacked, model.config)
    inputs = np.load(path / "inputs.npz", allow_pickle=False)
    expected = np.load(path / "expected.npz", allow_pickle=False)
    forward = jax.jit(lambda p, t, lengths: model.apply({"params": p}, t, lengths))
    cases = sorted({key.split("_")[0] for key in inputs.files})
    for case in cases:
        tokens = inputs[f"{case}_tokens"].astype(np.int32)
        lengths = inputs[f"{case}_patch_lengths"].astype(np.int32)
        ref = expected[f"{case}_logits"]
        keep = np.ones(tokens.shape, bool)
        keep[(lengths == 0).any(axis=1), -1] = False  # transformers' padding-patch quirk (test_convert_hf)
        err = np.max(np.abs(np.asarray(forward(stacked, tokens, lengths)) - ref)[keep]) / np.max(np.abs(ref))
        assert err <= 1e-4, f"{case}: logits rel err {err:.2e}"

    entropy = hf.load_hf_entropy_model(path, scan_layers=True)
    out = hf.save_hf_blt(model, stacked, tmp_path / "export", entropy_model=entropy[:2], threshold=entropy[2])
    per_layer_model, per_layer = hf.load_hf_blt(out)
    _, original = hf.load_hf_blt(path)
    assert not per_layer_model.config.scan_layers
    jax.tree.map(np.testing.assert_array_equal, per_layer, original)


@pytest.mark.slow
def test_scanned_blt_generates_what_the_per_layer_blt_generates(fixtures_dir):
    path = fixtures_dir / "hf_blt_tiny_b"
    rule = IncrementalRule(mode="space")
    outputs = []
    for scan_layers in (False, True):
        model, params = hf.load_hf_blt(path, scan_layers=scan_layers)
        outputs.append(generate(model, params, rule, ["Hello, wor"], max_bytes=16, return_logits=True)[0])
    assert outputs[0].token_ids == outputs[1].token_ids
    assert outputs[0].patch_lengths == outputs[1].patch_lengths
    np.testing.assert_allclose(outputs[0].logits, outputs[1].logits, atol=1e-5)


def test_stacked_init_keeps_layer_order_when_groups_interleave():
    cfg = TransformerConfig(32, 4, 4)
    layers = [TransformerBlock(cfg, i, parent=None) for i in range(cfg.n_layers)]
    example = lambda: block_example_args(cfg, jnp.float32)  # noqa: E731

    class Holder(nn.Module):
        @nn.compact
        def __call__(self):
            return scan.stacked_parameters(self, "layers", layers, ["a", "b", "a", "b"], example)

    stacked = nn.meta.unbox(Holder().init({"params": jax.random.key(5)})["params"]["layers"])
    key = Holder().bind({}, rngs={"params": jax.random.key(5)}).make_rng("params")
    for i, layer in enumerate(layers):
        assert _max_abs(scan.layer_slice(stacked, i), layer.init(jax.random.fold_in(key, i), *example())["params"]) == 0
