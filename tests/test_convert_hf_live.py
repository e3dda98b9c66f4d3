"""Live parity against `transformers` itself (runs when the `hf` extra is installed).

The committed fixtures pin a few cases; these tests build fresh random models with other
configs, in both directions: a transformers checkpoint imported into bltjax, and a bltjax
model exported and loaded by `BltForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import copy
import importlib.util
import pathlib
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("torch", reason="the hf extra (torch, transformers) is not installed")
pytest.importorskip("transformers", reason="the hf extra (torch, transformers) is not installed")

from bltjax import tokenizer  # noqa: E402
from bltjax.convert import hf  # noqa: E402
from bltjax.models.blt import BLT  # noqa: E402
from bltjax.models.byte_lm import ByteLM, next_byte_entropy  # noqa: E402
from bltjax.models.configs import BLTConfig, ByteLMConfig, TransformerConfig  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TEXTS = [
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
    "Wer reitet so spät durch Nacht und Wind? Es ist der Vater mit seinem Kind.",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
]


def _fixture_module():
    spec = importlib.util.spec_from_file_location("make_hf_blt_fixture", FIXTURES / "make_hf_blt_fixture.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _rows(n_tokens: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of real text (BOS first) and random patch lengths adding up to N (HF convention)."""
    rng = np.random.default_rng(seed)
    rows, lengths = [], []
    for text in TEXTS:
        ids = tokenizer.encode(text, eos=False)[:n_tokens]
        ids = np.pad(ids, (0, n_tokens - ids.size), constant_values=4 + ord(" "))
        rows.append(ids)
        row, left = [1], n_tokens - 1
        while left:
            step = int(min(left, rng.integers(1, 9)))
            row.append(step)
            left -= step
        lengths.append(row)
    width = max(len(r) for r in lengths)
    padded = np.zeros((len(lengths), width), np.int32)
    for i, r in enumerate(lengths):
        padded[i, : len(r)] = r
    return np.stack(rows).astype(np.int32), padded


def _compare_rowwise(model_logits_fn, hf_model, fixture, tokens, lengths):
    """bltjax on the whole batch (N + 1 convention: padding is inert) vs transformers row by row."""
    with_next = lengths.copy()
    with_next[np.arange(len(lengths)), (lengths > 0).sum(axis=1) - 1] += 1
    ours = np.asarray(model_logits_fn(tokens, with_next))
    for row in range(tokens.shape[0]):
        real = lengths[row][lengths[row] > 0][None]
        ref = fixture.hf_logits(hf_model, tokens[row : row + 1], real)
        err = np.max(np.abs(ours[row : row + 1] - ref)) / np.max(np.abs(ref))
        assert err <= 1e-4, f"row {row}: rel err {err:.2e}"


@pytest.mark.slow
def test_fresh_transformers_model_imports_with_parity(tmp_path):
    fixture = _fixture_module()
    config = copy.deepcopy(fixture.CONFIG)
    # Another shape than both fixtures: cross-attention in every local layer (transformers
    # re-pools at each encoder layer), no global projection (k * 24 = 48), full causal local
    # attention, one hash function, no patcher.
    config.update(
        cross_attn_k=2,
        local_attention_window_len=None,
        encoder_hash_byte_group_size=[3, 5],
        encoder_hash_byte_group_nb_functions=1,
        encoder_hash_byte_group_vocab=61,
        patch_in_forward=False,
    )
    config.pop("patcher_config")
    for name in ("encoder_config", "decoder_config"):
        config[name].update(
            hidden_size=24,
            num_attention_heads=3,
            num_key_value_heads=3,
            intermediate_size=64,
            cross_attn_all_layers=True,
            cross_attn_k=2,
            hidden_size_global=48,
        )
    config["global_config"].update(hidden_size=48, num_attention_heads=4, num_key_value_heads=1, intermediate_size=128)
    reference = fixture.build_hf_blt(config, seed=7)
    reference.save_pretrained(tmp_path / "ckpt")
    model, params = hf.load_hf_blt(tmp_path / "ckpt")
    assert model.config.encoder.window is None and model.config.cross_attn_all_layers_encoder
    tokens, lengths = _rows(40, seed=3)
    apply = jax.jit(lambda t, lengths: model.apply({"params": params}, t, lengths))
    _compare_rowwise(apply, reference, fixture, tokens, lengths)


@pytest.mark.slow
def test_bltjax_model_exports_to_transformers_with_parity(tmp_path):
    from transformers import BltForCausalLM

    fixture = _fixture_module()
    cfg = BLTConfig(
        encoder=TransformerConfig(32, 1, 4, window=16, rope_theta=30000.0),
        latent=TransformerConfig(96, 2, 4, n_kv_heads=2),
        decoder=TransformerConfig(32, 2, 2, window=16),
        cross_attn_k=2,
        hash_sizes=(3, 4),
        hash_vocab=97,
        repool_every_cross_attn_layer=True,
        document_mask=False,
    )
    model = BLT(cfg)
    tokens, lengths = _rows(48, seed=5)
    params = model.init(jax.random.key(3), tokens[:1], lengths[:1])["params"]
    params = jax.tree.map(lambda x: x * 1.5, params)  # norms away from 1: a swapped norm would show
    entropy = ByteLM(ByteLMConfig(TransformerConfig(32, 1, 2, window=12, rope_theta=10000.0), document_mask=False))
    entropy_params = entropy.init(jax.random.key(4), tokens[:1])["params"]
    out = hf.save_hf_blt(model, params, tmp_path / "export", entropy_model=(entropy, entropy_params), threshold=2.0)
    reference = BltForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    apply = jax.jit(lambda t, lengths: model.apply({"params": params}, t, lengths))
    _compare_rowwise(apply, reference, fixture, tokens, lengths)
    # The exported patcher is bltjax's entropy model.
    patcher_entropies, _ = fixture.hf_patcher(reference, tokens[:1], None)
    ours = next_byte_entropy(entropy.apply({"params": entropy_params}, tokens[:1]))
    np.testing.assert_allclose(np.asarray(ours), patcher_entropies, atol=1e-4)
