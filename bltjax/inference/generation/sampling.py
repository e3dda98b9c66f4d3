"""Next-byte choice: greedy, temperature and nucleus (top-p) sampling, inside jit.

Temperature and top-p are traced values, so changing them does not recompile; temperature 0
is greedy (argmax). The key of step i is ``fold_in(key, i)``, so a seed fixes the whole
generation, and the cached and the full-recompute generators draw the same numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def nucleus_logits(logits_BV: jax.Array, top_p: jax.Array) -> jax.Array:
    """Logits with everything outside the top-p nucleus set to -inf (the most likely id always stays).

    The nucleus is the smallest set of most likely ids whose probabilities add up to >= top_p:
    an id is kept when the probability mass strictly before it (in descending order) is < top_p.
    """
    probs = jax.nn.softmax(logits_BV.astype(jnp.float32), axis=-1)
    order = jnp.argsort(-probs, axis=-1)
    sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = (mass_before < top_p) | (jnp.arange(probs.shape[-1]) == 0)
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(probs.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits_BV, -jnp.inf)


def choose_next(logits_BV: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """int32 [B]: argmax when temperature == 0, else a draw from softmax(logits / T) within the top-p nucleus."""
    logits = logits_BV.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    sampled = jax.random.categorical(key, nucleus_logits(scaled, top_p), axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)
