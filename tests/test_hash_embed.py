"""Hash n-gram ids: the test vectors of docs/architecture.md §4.3, bit-exact, in numpy and inside jit."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bltjax import tokenizer
from bltjax.convert import hf
from bltjax.models.blt import BLT
from bltjax.models.configs import HASH_PRIMES, BLTConfig, TransformerConfig
from bltjax.models.hash_embed import HashNgramEmbedding, all_hash_ids, all_hash_ids_numpy, hash_ids, hash_ids_numpy

HELLO = np.array([[1, 76, 105, 112, 112, 115, 48, 36, 123, 115, 118, 112, 104, 37]], np.int32)
SPEC_VECTORS = {
    3: [443987, 124875, 393970, 386145, 358223, 190185, 141703, 484917, 141967, 146186, 10172, 334275, 306354, 205291],
    4: [437197, 433869, 117936, 254402, 246577, 30240, 114083, 12253, 461502, 217488, 33292, 467104, 390141, 114099],
    5: [123201, 168913, 27892, 170862, 307328, 265602, 426354, 435293, 113380, 384029, 106114, 86218, 437928, 431048],
    6: [166353, 160907, 92310, 405250, 48218, 280239, 83968, 362502, 28514, 86291, 48991, 483472, 343264, 40427],
    7: [34117, 338221, 15158, 281878, 94816, 340137, 303839, 101668, 427355, 320433, 480561, 142061, 303606, 395081],
    8: [172383, 205585, 456240, 129346, 299568, 322649, 430431, 246559, 94549, 155186, 258407, 498251, 491201, 418709],
}
DEBUG_VECTORS = [  # sizes [4], V = 50002, functions f = 0, 1, 2
    [30497, 31489, 21044, 41306, 14147, 25724, 49417, 29745, 26774, 1826, 18666, 7516, 23917, 739],
    [28777, 29347, 31820, 16762, 41227, 32224, 27621, 48497, 29186, 39490, 15184, 26722, 6469, 40177],
    [401, 5855, 9166, 14246, 47107, 16918, 6755, 42229, 19818, 4528, 18126, 3858, 20087, 8103],
]


def test_hello_row_is_the_spec_row():
    assert tokenizer.encode("Hello, world!", eos=False).tolist() == HELLO[0].tolist()


@pytest.mark.parametrize("n", sorted(SPEC_VECTORS))
def test_spec_vectors_numpy_and_jit(n):
    assert hash_ids_numpy(HELLO, n, HASH_PRIMES[0], 500002)[0].tolist() == SPEC_VECTORS[n]
    in_jit = jax.jit(lambda t: hash_ids(t, n, HASH_PRIMES[0], 500002))(HELLO)
    assert np.asarray(in_jit)[0].tolist() == SPEC_VECTORS[n]


def test_hand_checked_overflow_value():
    # Window (1, 76, 105) wraps to -5680462896257304018; the floor modulo gives 393970, not the
    # unwrapped 314984 nor the paper's newest-first 140624.
    assert hash_ids_numpy(HELLO, 3, HASH_PRIMES[0], 500002)[0, 2] == 393970


def test_debug_config_vectors_three_functions():
    ids = all_hash_ids_numpy(HELLO, [4], 3, 50002)
    assert ids[:, 0].tolist() == DEBUG_VECTORS
    assert np.asarray(all_hash_ids(jnp.asarray(HELLO), [4], 3, 50002))[:, 0].tolist() == DEBUG_VECTORS


def test_windows_run_across_document_boundaries():
    row = np.array([[1, 101, 102, 2, 1, 103, 104]], np.int32)
    expected = [443987, 321004, 462190, 480789, 436103, 305474, 342174]
    assert hash_ids_numpy(row, 3, HASH_PRIMES[0], 500002)[0].tolist() == expected
    assert np.asarray(hash_ids(jnp.asarray(row), 3, HASH_PRIMES[0], 500002))[0].tolist() == expected


@pytest.mark.parametrize("vocab", [3, 1000, 50002, 500002, 2**24 + 7, 2**31 - 1])
def test_jit_emulation_matches_int64_for_every_prime(vocab):
    tokens = np.random.default_rng(vocab).integers(0, 260, (3, 64)).astype(np.int32)
    for f, prime in enumerate(HASH_PRIMES):
        for n in (1, 2, 5, 8):
            expected = hash_ids_numpy(tokens, n, prime, vocab)
            got = np.asarray(hash_ids(jnp.asarray(tokens), n, prime, vocab))
            np.testing.assert_array_equal(got, expected, err_msg=f"f={f} n={n} vocab={vocab}")


def test_embedding_sums_one_row_per_table():
    module = HashNgramEmbedding(num_tables=2, vocab=5, dim=3)
    ids = jnp.array([[[0, 4]], [[1, 1]]])  # [tables=2, B=1, N=2]
    params = module.init(jax.random.key(0), ids)
    tables = np.asarray(params["params"]["tables"].unbox())
    out = np.asarray(module.apply(params, ids))
    np.testing.assert_allclose(out[0, 0], tables[0, 0] + tables[1, 1], rtol=1e-6)
    np.testing.assert_allclose(out[0, 1], tables[0, 4] + tables[1, 1], rtol=1e-6)


def test_hash_table_gradient_is_the_scatter_add_of_autodiff():
    """The custom backward of the lookup (zero table made late) equals autodiff of jnp.take."""
    from bltjax.models.hash_embed import _lookup_sum

    tables = jax.random.normal(jax.random.key(0), (3, 50, 8))
    ids = jax.random.randint(jax.random.key(1), (3, 2, 40), 0, 50)  # repeated ids accumulate
    cotangent = jax.random.normal(jax.random.key(2), (2, 40, 8))

    def reference(tables):
        return jax.vmap(lambda table, i: jnp.take(table, i, axis=0))(tables, ids).sum(axis=0)

    want, want_vjp = jax.vjp(reference, tables)
    got, got_vjp = jax.vjp(lambda t: _lookup_sum(t, ids), tables)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(got_vjp)(cotangent)[0], want_vjp(cotangent)[0], rtol=1e-6, atol=1e-6)


def test_hash_table_init_does_not_depend_on_the_row_multiple():
    ids = jnp.array([[[0, 4, 6]], [[1, 1, 2]]])  # [tables=2, B=1, N=3]
    plain = HashNgramEmbedding(num_tables=2, vocab=7, dim=3)
    padded = HashNgramEmbedding(num_tables=2, vocab=7, dim=3, rows_multiple=4)
    tables = plain.init(jax.random.key(0), ids)["params"]["tables"]
    padded_tables = padded.init(jax.random.key(0), ids)["params"]["tables"]
    assert padded_tables.names == ("hash_tables", "hash_rows", "hash_embed")
    assert padded_tables.value.shape == (2, 8, 3)
    np.testing.assert_array_equal(padded_tables.value[:, :7], tables.value)
    assert not np.asarray(padded_tables.value[:, 7:]).any()
    np.testing.assert_array_equal(
        padded.apply({"params": {"tables": padded_tables}}, ids), plain.apply({"params": {"tables": tables}}, ids)
    )


@pytest.mark.slow
def test_padded_hash_tables_same_logits_and_export(tmp_path):
    """Tables padded to a row multiple (for the mesh) change no logit and export unpadded."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 260, (2, 40)).astype(np.int32)
    tokens[:, 0] = 1
    lengths = np.array([[1, 6, 9, 5, 8, 12, 0], [1, 4, 4, 4, 4, 4, 20]], np.int32)  # N + 1 = 41
    cfg = BLTConfig(
        encoder=TransformerConfig(32, 1, 4, window=8),
        latent=TransformerConfig(48, 2, 4),
        decoder=TransformerConfig(32, 2, 2, window=8),
        hash_sizes=(3, 4),
        hash_vocab=97,
        document_mask=False,
        repool_every_cross_attn_layer=True,
    )
    padded_cfg = dataclasses.replace(cfg, hash_rows_multiple=8)
    model, padded = BLT(cfg), BLT(padded_cfg)
    assert padded_cfg.hash_table_rows == 104
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens, lengths)["params"])
    leaves, tree = jax.tree.flatten(shapes)
    params = jax.tree.unflatten(tree, [jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype) for x in leaves])
    tables = np.asarray(params["local_encoder"]["hash_embedding"]["tables"])
    padded_params = jax.tree.map(lambda x: x, params)
    padded_params["local_encoder"]["hash_embedding"]["tables"] = jnp.pad(tables, [(0, 0), (0, 7), (0, 0)])
    shapes = nn.meta.unbox(jax.eval_shape(padded.init, jax.random.key(0), tokens, lengths)["params"])
    assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(lambda x: x.shape, padded_params)
    logits = jax.jit(model.apply)({"params": params}, tokens, lengths)
    np.testing.assert_array_equal(jax.jit(padded.apply)({"params": padded_params}, tokens, lengths), logits)

    state = hf.to_hf_state_dict(padded, padded_params)
    np.testing.assert_array_equal(state["model.encoder_hash_tok_embedding.weight"], tables.reshape(2 * 97, 32))
    assert hf.blt_config_to_hf(padded_cfg) == hf.blt_config_to_hf(cfg)  # not model semantics
    hf.save_hf_blt(padded, padded_params, tmp_path / "export")
    loaded, loaded_params = hf.load_hf_blt(tmp_path / "export", hash_rows_multiple=8)
    assert loaded.config.hash_rows_multiple == 8
    np.testing.assert_array_equal(
        loaded_params["local_encoder"]["hash_embedding"]["tables"],
        padded_params["local_encoder"]["hash_embedding"]["tables"],
    )
    np.testing.assert_allclose(jax.jit(loaded.apply)({"params": loaded_params}, tokens, lengths), logits, atol=1e-6)
    plain_loaded, plain_params = hf.load_hf_blt(tmp_path / "export")
    np.testing.assert_array_equal(plain_params["local_encoder"]["hash_embedding"]["tables"], tables)
