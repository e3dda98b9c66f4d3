"""Cached incremental decoding of a `ByteLM`: the entropy model and the byte-level baseline.

`prefill` runs the prompts (left-aligned, padded, lengths per row) in one pass and fills a
KV cache per layer (a ring of the window, or full); `step` feeds one byte per row at that
row's own position. Both read the `ByteLM` parameter tree unchanged. The logits are those of
`ByteLM.apply` on the whole sequence; `tests/test_generate.py` checks it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bltjax.inference.generation import stacks
from bltjax.inference.generation.cache import KVCache
from bltjax.models.configs import ByteLMConfig
from bltjax.models.layers import dtype_of, eos_segment_ids
from bltjax.tokenizer import EOS_ID


class ByteLMState(NamedTuple):
    """Per-row decoding state of a `ByteLM`."""

    position: jax.Array  # [B] int32: the position the next byte will take (= bytes processed)
    eos_before: jax.Array  # [B] int32: EOS tokens processed so far (the next byte's segment)
    caches: tuple[KVCache, ...]


@dataclasses.dataclass(frozen=True)
class CachedByteLM:
    """Prefill / step functions of one `ByteLMConfig` for ``max_positions`` positions per row."""

    config: ByteLMConfig
    max_positions: int

    @property
    def dtype(self) -> jnp.dtype:
        return dtype_of(self.config.dtype)

    def init_state(self, params: dict[str, Any], batch: int) -> ByteLMState:
        caches = stacks.empty_stack_caches(
            params["transformer"], self.config.stack, batch, self.max_positions, self.dtype
        )
        zeros = jnp.zeros((batch,), jnp.int32)
        return ByteLMState(zeros, zeros, caches)

    def _logits(self, params: dict[str, Any], x: jax.Array) -> jax.Array:
        stack = self.config.stack
        x = stacks.rms_norm(x, params["final_norm"]["scale"], stack.norm_eps, self.dtype)
        return stacks.linear(x, params["output"]["kernel"], self.dtype).astype(jnp.float32)

    def prefill(
        self, params: dict[str, Any], tokens_BT: jax.Array, lengths_B: jax.Array
    ) -> tuple[ByteLMState, jax.Array]:
        """Runs positions 0..len-1 of every row; returns the state and logits [B, T, V] of all positions.

        Positions at or after a row's length are padding: causal attention keeps them from
        affecting real positions, and their keys are not cached.
        """
        b, t = tokens_BT.shape
        valid = jnp.arange(t)[None, :] < lengths_B[:, None]
        is_eos = (tokens_BT == EOS_ID) & valid
        segments = eos_segment_ids(is_eos) if self.config.document_mask else None
        x = jnp.take(params["embedding"], tokens_BT, axis=0).astype(self.dtype)
        state = self.init_state(params, b)
        x, caches = stacks.stack_prefill(
            params["transformer"], self.config.stack, x, segments, valid, state.caches, self.dtype
        )
        eos_before = jnp.sum(is_eos, axis=1, dtype=jnp.int32)
        return ByteLMState(lengths_B.astype(jnp.int32), eos_before, caches), self._logits(params, x)

    def step(
        self, params: dict[str, Any], state: ByteLMState, token_B: jax.Array, active_B: jax.Array
    ) -> tuple[ByteLMState, jax.Array]:
        """Feeds one byte per row; inactive rows keep their state. Returns (state, logits [B, V])."""
        x = jnp.take(params["embedding"], token_B, axis=0).astype(self.dtype)
        segment = state.eos_before if self.config.document_mask else None
        x, caches = stacks.stack_step(
            params["transformer"], self.config.stack, x, state.position, segment, state.caches, active_B, self.dtype
        )
        advance = active_B.astype(jnp.int32)
        eos = ((token_B == EOS_ID) & active_B).astype(jnp.int32)
        return ByteLMState(state.position + advance, state.eos_before + eos, caches), self._logits(params, x)
