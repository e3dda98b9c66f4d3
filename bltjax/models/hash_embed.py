"""Hash n-gram embeddings (docs/architecture.md §4): bit-exact ids and the tables they index.

The reference hashes each window of n offset ids with a rolling polynomial in *wrapping
signed 64-bit* arithmetic, then takes a floor modulo. JAX runs with 64-bit integers disabled,
so the in-model version emulates the 64-bit ring with four 16-bit limbs held in uint32 words;
the numpy version (for the data pipeline and for tests) uses int64 directly. Both give the
same ids, which `tests/test_hash_embed.py` checks against the spec's test vectors.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bltjax.models.configs import HASH_PRIMES, round_up
from bltjax.models.layers import truncated_normal_init
from bltjax.models.partitioning import constrain

_MASK64 = (1 << 64) - 1


def _window_columns(tokens: np.ndarray, n: int) -> list[np.ndarray]:
    """The n columns of every position's window, oldest first, left-padded with BOE (0)."""
    padded = np.concatenate([np.zeros(tokens.shape[:-1] + (n - 1,), tokens.dtype), tokens], axis=-1)
    length = tokens.shape[-1]
    return [padded[..., j : j + length] for j in range(n)]


def hash_ids_numpy(tokens: np.ndarray, n: int, prime: int, vocab: int) -> np.ndarray:
    """Reference hash ids [..., N] in int64 numpy arithmetic (wraps silently, as required)."""
    tokens = np.asarray(tokens).astype(np.int64)
    total = np.zeros(tokens.shape, np.int64)
    power = 1
    with np.errstate(over="ignore"):
        for column in _window_columns(tokens, n):
            signed_power = np.int64(power - (1 << 64) if power >= 1 << 63 else power)
            total = total + column * signed_power
            power = (power * prime) & _MASK64
    return np.mod(total, vocab)


def all_hash_ids_numpy(tokens: np.ndarray, sizes: Sequence[int], functions: int, vocab: int) -> np.ndarray:
    """Ids for every table, [tables, ..., N]; tables are ordered function-major, then n (§4.2)."""
    return np.stack([hash_ids_numpy(tokens, n, HASH_PRIMES[f], vocab) for f in range(functions) for n in sizes])


# --- 64-bit wrapping arithmetic with 16-bit limbs in uint32 words (jit-friendly) -------------


def _limbs(value: int) -> list[int]:
    return [(value >> (16 * i)) & 0xFFFF for i in range(4)]


def _bits(limbs: list[jax.Array], start: int, width: int) -> jax.Array:
    """Bits [start, start + width) of the 64-bit number held in 16-bit limbs (width <= 16)."""
    limb, offset = divmod(start, 16)
    out = limbs[limb] >> offset
    if offset + width > 16:
        out = out | (limbs[limb + 1] << (16 - offset))
    return out & ((1 << width) - 1)


def hash_ids(tokens: jax.Array, n: int, prime: int, vocab: int) -> jax.Array:
    """Hash ids [..., N] (int32) computed inside jit without 64-bit types.

    S = sum_j window_j * p^j mod 2^64 is accumulated per 16-bit limb (window ids < 2^9 and
    limbs < 2^16 keep every partial sum below 2^29), carries are propagated once, and the
    floor modulo of the signed value is folded in chunks small enough for uint32.
    """
    if not 0 < vocab < 2**31:
        raise ValueError(f"hash_vocab: expected 0 < vocab < 2**31, got {vocab}")
    tokens = tokens.astype(jnp.uint32)
    padded = jnp.concatenate([jnp.zeros(tokens.shape[:-1] + (n - 1,), jnp.uint32), tokens], axis=-1)
    length = tokens.shape[-1]
    acc = [jnp.zeros(tokens.shape, jnp.uint32) for _ in range(4)]
    power = 1
    for j in range(n):
        column = padded[..., j : j + length]
        for i, limb in enumerate(_limbs(power)):
            if limb:
                acc[i] = acc[i] + column * jnp.uint32(limb)
        power = (power * prime) & _MASK64
    carry = jnp.zeros_like(acc[0])
    limbs = []
    for i in range(4):
        total = acc[i] + carry
        limbs.append(total & 0xFFFF)
        carry = total >> 16  # the carry out of the top limb is the wrap-around: dropped
    # Unsigned value modulo vocab, most significant chunk first: r <- (r * 2^w + chunk) mod V,
    # with w chosen so that r * 2^w stays below 2^32.
    chunk = max(1, min(16, 32 - int(vocab - 1).bit_length()))
    remainder = jnp.zeros_like(limbs[0])
    top = 64
    while top > 0:
        width = min(chunk, top)
        top -= width
        remainder = ((remainder << width) | _bits(limbs, top, width)) % jnp.uint32(vocab)
    # A negative signed value is the unsigned one minus 2^64: subtract 2^64 mod V, floor-wise.
    negative = (limbs[3] >> 15) == 1
    shift = jnp.uint32((1 << 64) % vocab)
    remainder = jnp.where(negative, (remainder + jnp.uint32(vocab) - shift) % jnp.uint32(vocab), remainder)
    return remainder.astype(jnp.int32)


def all_hash_ids(tokens: jax.Array, sizes: Sequence[int], functions: int, vocab: int) -> jax.Array:
    """`all_hash_ids_numpy` inside jit: [tables, ..., N] int32."""
    if not functions or not sizes:
        return jnp.zeros((0,) + tokens.shape, jnp.int32)
    return jnp.stack([hash_ids(tokens, n, HASH_PRIMES[f], vocab) for f in range(functions) for n in sizes])


def _lookup_sum(tables_TVE: jax.Array, ids_TBN: jax.Array) -> jax.Array:
    """sum_t tables[t, ids[t]]: [B, N, E].

    The gradient is the usual scatter-add, written out so that its zero-filled table is made
    only once the gradient arrives: left to autodiff, XLA created that [tables, rows, width]
    buffer (176 MB for 6 x 30000 x 256) at the start of the forward pass and kept it to the end.
    """
    return _lookup_sum_typed((tables_TVE.shape, tables_TVE.dtype), tables_TVE, ids_TBN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lookup_sum_typed(table_type, tables_TVE, ids_TBN):
    return jax.vmap(lambda table, ids: jnp.take(table, ids, axis=0))(tables_TVE, ids_TBN).sum(axis=0)


def _lookup_sum_fwd(table_type, tables_TVE, ids_TBN):
    return _lookup_sum_typed(table_type, tables_TVE, ids_TBN), ids_TBN


def _lookup_sum_bwd(table_type, ids_TBN, d_out_BNE):
    shape, dtype = table_type
    anchor = (0.0 * d_out_BNE.reshape(-1)[0]).astype(dtype)  # no zero table before the gradient exists
    zeros = jnp.zeros(shape, dtype) + anchor
    d_tables = jax.vmap(lambda zero, ids: zero.at[ids].add(d_out_BNE.astype(dtype)))(zeros, ids_TBN)
    return d_tables, None


_lookup_sum_typed.defvjp(_lookup_sum_fwd, _lookup_sum_bwd)


class HashNgramEmbedding(nn.Module):
    """Sum of one row per hash table: E[t, hash_id_t(i)] over the tables t (docs/architecture.md §4.2).

    Tables are stored as one [tables, rows, width] parameter so that their rows can be sharded
    together; they are free in FLOPs but dominate the parameter count at scale. ``rows`` is
    ``vocab`` rounded up to ``rows_multiple`` so that the row axis divides the mesh; the extra
    rows are zeros that no id reaches (ids are < vocab).
    """

    num_tables: int
    vocab: int
    dim: int
    param_dtype: jnp.dtype = jnp.float32
    rows_multiple: int = 1

    @nn.compact
    def __call__(self, hash_ids_TBN: jax.Array) -> jax.Array:
        tables = self.param(
            "tables",
            nn.with_logical_partitioning(self._init, ("hash_tables", "hash_rows", "hash_embed")),
            (self.num_tables, round_up(self.vocab, self.rows_multiple), self.dim),
            self.param_dtype,
        )
        summed = _lookup_sum(tables, hash_ids_TBN)
        return constrain(summed, ("batch", "length", "act_embed")) if summed.ndim == 3 else summed

    def _init(self, key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        """Draws the [tables, vocab, dim] weights, then zero-pads the rows: the same start on any mesh."""
        tables, rows, dim = shape
        real = truncated_normal_init(self.dim**-0.5)(key, (tables, self.vocab, dim), dtype)
        return jnp.pad(real, [(0, 0), (0, rows - self.vocab), (0, 0)])
