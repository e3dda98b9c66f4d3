"""Cached incremental decoding of a `ByteLM`: the entropy model and the byte-level baseline.

`prefill` runs the prompts (left-aligned, padded, lengths per row) in one pass and fills a
KV cache per layer (a ring of the window, or full); `step` feeds one byte per row at that
row's own position. Both are `ByteLM.apply` with ``method=ByteLM.prefill`` / ``ByteLM.step``:
the model's own layers over its own parameter tree, so the logits are those of `ByteLM.apply`
on the whole sequence (`tests/test_generate.py` checks it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bltjax.kernels.kv_cache import KVCache
from bltjax.models.byte_lm import NEWLINE_ID, ByteLM
from bltjax.models.configs import ByteLMConfig
from bltjax.models.layers import dtype_of, empty_kv_caches
from bltjax.tokenizer import EOS_ID


class ByteLMState(NamedTuple):
    """Per-row decoding state of a `ByteLM`."""

    position: jax.Array  # [B] int32: the position the next byte will take (= bytes processed)
    eos_before: jax.Array  # [B] int32: segment ends (EOS; + newlines with the reset) so far: the next byte's segment
    caches: tuple[KVCache, ...]


@dataclasses.dataclass(frozen=True)
class CachedByteLM:
    """Prefill / step functions of one `ByteLMConfig` for ``max_positions`` positions per row.

    Hashable (frozen, all fields hashable), so it can be a static argument of `jax.jit`.
    ``reset_on_newline``: a new attention segment after every newline byte, as the entropy pass's
    newline reset (docs/architecture.md §2.5).
    """

    config: ByteLMConfig
    max_positions: int
    reset_on_newline: bool = False

    def _ends(self, tokens: jax.Array) -> jax.Array:
        """Where a segment ends: EOS, and with the reset each newline (EOS only with document masks)."""
        if not self.reset_on_newline:
            return tokens == EOS_ID
        eos = tokens == EOS_ID if self.config.document_mask else jnp.zeros(tokens.shape, bool)
        return eos | (tokens == NEWLINE_ID)

    @property
    def _segmented(self) -> bool:
        return self.config.document_mask or self.reset_on_newline

    @property
    def model(self) -> ByteLM:
        """The model decoding runs: the same one, without remat (nothing is differentiated)."""
        return ByteLM(dataclasses.replace(self.config, remat="none"))

    def init_state(self, batch: int) -> ByteLMState:
        caches = empty_kv_caches(self.config.stack, batch, self.max_positions, dtype_of(self.config.dtype))
        zeros = jnp.zeros((batch,), jnp.int32)
        return ByteLMState(zeros, zeros, caches)

    def prefill(
        self, params: dict[str, Any], tokens_BT: jax.Array, lengths_B: jax.Array
    ) -> tuple[ByteLMState, jax.Array]:
        """Runs positions 0..len-1 of every row; returns the state and logits [B, T, V] of all positions.

        Positions at or after a row's length are padding: causal attention keeps them from
        affecting real positions, and their keys are not cached.
        """
        b, t = tokens_BT.shape
        valid = jnp.arange(t)[None, :] < lengths_B[:, None]
        caches = self.init_state(b).caches
        logits, caches = self.model.apply(
            {"params": params}, tokens_BT, valid, caches, self.reset_on_newline, method=ByteLM.prefill
        )
        eos_before = jnp.sum(self._ends(tokens_BT) & valid, axis=1, dtype=jnp.int32)
        return ByteLMState(lengths_B.astype(jnp.int32), eos_before, caches), logits

    def step(
        self, params: dict[str, Any], state: ByteLMState, token_B: jax.Array, active_B: jax.Array
    ) -> tuple[ByteLMState, jax.Array]:
        """Feeds one byte per row; inactive rows keep their state. Returns (state, logits [B, V])."""
        segment = state.eos_before if self._segmented else None
        logits, caches = self.model.apply(
            {"params": params}, token_B, state.position, segment, state.caches, active_B, method=ByteLM.step
        )
        advance = active_B.astype(jnp.int32)
        eos = (self._ends(token_B) & active_B).astype(jnp.int32)
        return ByteLMState(state.position + advance, state.eos_before + eos, caches), logits
