"""Cached incremental BLT decoding with incremental patching (docs/architecture.md §16.3).

State per row (all fixed-size buffers, so a step compiles once):

* the entropy model's KV caches and the last entropy H_{t-1} (entropy mode only);
* the local encoder's self-attention caches (rings of its window);
* for every encoder cross-attention layer, the cross-attention keys/values of every byte seen
  so far and each byte's patch id: closing patch j attends to the bytes of patches
  j - W + 1 .. j (W = ``cross_attn_window_encoder``; 1 = the open patch only);
* the running pool (max / min / sum) of the open patch's byte states at the layers that pool;
* the global model's caches, one entry per closed patch;
* the decoder cross-attention keys/values of the k slots of every closed patch (the key/value
  norm and projections are applied once, when the patch closes);
* the local decoder's self-attention caches;
* the token history (hash n-grams read the last n - 1 ids; space patching the last two) and the
  patch-start bits decided so far.

Per byte u_t (`CachedBLT.step`): hash ids and encoder step; entropy step; boundary decision for
t + 1 with the training rule (`IncrementalRule`); if t + 1 starts a patch, the open patch closes:
cross-attention of its k pooled slots over its bytes, **one** global step at patch position j,
and its k decoder slots are cached (under `lax.cond`, so no global work happens on bytes that
close nothing; in a batch, rows that close nothing are masked out of the writes, which happen
outside the conditional so that no cache is copied). Then the decoder
step reads the slots of dpid(t) = (closed patches) - 1, the patch before the one holding t + 1.

`CachedBLT.prefill` does the same for a whole prompt at once with the training arithmetic and
include_next_token patching, and fills every buffer.

Every layer is the model's own: the stacks (`LocalEncoder`, `LatentTransformer`,
`LocalDecoder`) are bound to their parameter sub-trees and driven through their blocks'
KV-cache methods (`TransformerBlock.prefill` / `step` / `step_deferred`) and their
cross-attentions' `keys_values` / `attend_cached`; this module only keeps the state and
decides when each stack advances.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bltjax.inference.generation.byte_lm import ByteLMState, CachedByteLM
from bltjax.kernels.kv_cache import KVCache, heads_major, put_heads_major, put_rows, write_step
from bltjax.models.byte_lm import next_byte_entropy
from bltjax.models.configs import BLTConfig, ByteLMConfig
from bltjax.models.hash_embed import all_hash_ids
from bltjax.models.latent import LatentTransformer
from bltjax.models.layers import cross_attention_residual, dtype_of, empty_kv_caches, eos_segment_ids
from bltjax.models.layout import unstack_layers
from bltjax.models.local_decoder import LocalDecoder, decoder_cross_layers
from bltjax.models.local_encoder import LocalEncoder, encoder_cross_layers, encoder_pooling_layers, pool_patches
from bltjax.patching.incremental import IncrementalRule
from bltjax.tokenizer import EOS_ID

Params = dict[str, Any]
# Patches per chunk of the scans over closed patches only (`cache.attend_used_prefix`): the
# global model's attention and the windowed decoder cross-attention.
SLOT_CHUNK_PATCHES = 32


class BLTState(NamedTuple):
    """Per-row incremental state of a BLT (shapes: B rows, N positions, P patches)."""

    position: jax.Array  # [B] int32: the position the next byte takes (= bytes processed)
    rule_values: jax.Array  # [4] float32: the patching rule's numbers (`IncrementalRule.values`)
    tokens: jax.Array  # [B, N] int32 processed ids
    starts: jax.Array  # [B, N + 1] bool: does position p start a patch (decided up to position + 1)
    eos_before: jax.Array  # [B] int32 EOS ids processed (document segment of the next byte)
    entropy: ByteLMState | None  # entropy model state (entropy mode)
    last_entropy: jax.Array  # [B] float32 H_{position - 1}
    encoder_caches: tuple[KVCache, ...]
    cross_keys: tuple[jax.Array, ...]  # per encoder cross-attention layer: [B, K, N, D] (heads-major)
    cross_values: tuple[jax.Array, ...]
    byte_patch: jax.Array  # [B, N] int32 patch id of each processed byte, -1 elsewhere
    pooled: tuple[jax.Array, ...]  # per pooling layer: [B, E] running max / min / sum of the open patch
    open_length: jax.Array  # [B] int32 bytes in the open patch
    open_has_eos: jax.Array  # [B] bool
    closed: jax.Array  # [B] int32 closed patches (= global steps taken)
    eos_patches: jax.Array  # [B] int32 closed patches holding an EOS (segment of the next patch)
    global_caches: tuple[KVCache, ...]
    slot_keys: tuple[jax.Array, ...]  # per decoder cross-attention layer: [B, K, P * k, D]
    slot_values: tuple[jax.Array, ...]
    decoder_caches: tuple[KVCache, ...]


def patch_capacity(max_positions: int) -> int:
    """Patch slots that can never overflow (every byte closing a patch, + the open one), rounded
    up to whole chunks of the windowed decoder cross-attention scan."""
    needed = max_positions + 1
    return needed if needed <= SLOT_CHUNK_PATCHES else -(-needed // SLOT_CHUNK_PATCHES) * SLOT_CHUNK_PATCHES


@dataclasses.dataclass(frozen=True)
class CachedBLT:
    """Prefill / step of one BLT (+ entropy model) for ``max_positions`` bytes per row.

    Hashable (frozen, all fields hashable), so it can be a static argument of `jax.jit`.
    """

    config: BLTConfig
    rule: IncrementalRule
    entropy_config: ByteLMConfig | None
    max_positions: int  # N: bytes per row (prompt with BOS + generated)
    max_patches: int  # P: patch slots of the global / decoder caches (>= N + 1 is always enough);
    # a multiple of SLOT_CHUNK_PATCHES when larger than it (`patch_capacity` rounds up)

    def __post_init__(self) -> None:
        if self.max_patches % min(SLOT_CHUNK_PATCHES, self.max_patches):
            raise ValueError(f"max_patches: expected a multiple of {SLOT_CHUNK_PATCHES}, got {self.max_patches}")
        if self.rule.needs_entropy and self.entropy_config is None:
            raise ValueError(
                "config.patching.mode is 'entropy': generation needs the entropy model (entropy_model=...)"
            )
        if self.config.decoder.dim != self.config.encoder.dim:
            raise ValueError("config.model.decoder.dim must equal config.model.encoder.dim (docs/architecture.md §8.1)")

    # --- static structure -------------------------------------------------------------------

    @property
    def dtype(self) -> jnp.dtype:
        return dtype_of(self.config.dtype)

    @property
    def encoder_cross_layers(self) -> tuple[int, ...]:
        return encoder_cross_layers(self.config)

    @property
    def pooling_layers(self) -> tuple[int, ...]:
        """Encoder cross-attention layers at which patch queries are (re-)initialised by pooling."""
        return encoder_pooling_layers(self.config)

    @property
    def decoder_cross_layers(self) -> tuple[int, ...]:
        return decoder_cross_layers(self.config)

    def _cross_residual(self, x: jax.Array, attended: jax.Array) -> jax.Array:
        return cross_attention_residual(x, attended, self.config.double_cross_attn_residual)

    @property
    def slot_chunk(self) -> int:
        """Decoder slots scanned per step of the windowed cross-attention (divides the slot buffer)."""
        return min(SLOT_CHUNK_PATCHES, self.max_patches) * self.config.cross_attn_k

    @property
    def entropy_model(self) -> CachedByteLM | None:
        if not self.rule.needs_entropy:
            return None
        return CachedByteLM(self.entropy_config, self.max_positions, self.rule.entropy_reset_on_newline)

    def _stacks(self, params: Params) -> tuple[LocalEncoder, LatentTransformer, LocalDecoder]:
        """The BLT's three stacks bound to their parameter sub-trees, as inside `BLT.apply`.

        Decoding runs these modules' own layers (blocks through their KV-cache methods,
        cross-attentions over cached keys); nothing is differentiated, so remat is off. Bind
        anew in every traced function (a `lax.cond` branch is one): a bound module belongs to
        the trace that bound it.
        """
        cfg = dataclasses.replace(self.config, remat="none", scan_layers=False)
        if self.config.scan_layers:  # decoding drives layer i itself: each layer's slice of the stacked parameters
            params = unstack_layers(params, self.config)
        return (
            LocalEncoder(cfg).bind({"params": params["local_encoder"]}),
            LatentTransformer(cfg).bind({"params": params["latent"]}),
            LocalDecoder(cfg).bind({"params": params["local_decoder"]}),
        )

    # --- pooling of the open patch ----------------------------------------------------------

    def _pool_open(self, source_BTE: jax.Array, in_open_BT: jax.Array) -> jax.Array:
        """The running pool of the open patch from a prefill: max / min / sum over its bytes."""
        mode = self.config.pooling
        mask = in_open_BT[..., None]
        if mode == "max":
            return jnp.where(mask, source_BTE, -jnp.inf).max(axis=1)
        if mode == "min":
            return jnp.where(mask, source_BTE, jnp.inf).min(axis=1)
        return jnp.where(mask, source_BTE, 0.0).sum(axis=1)

    def _pool_add(self, running_BE: jax.Array, source_BE: jax.Array, first_B: jax.Array) -> jax.Array:
        mode = self.config.pooling
        if mode == "max":
            combined = jnp.maximum(running_BE, source_BE)
        elif mode == "min":
            combined = jnp.minimum(running_BE, source_BE)
        else:
            combined = running_BE + source_BE
        return jnp.where(first_B[:, None], source_BE, combined)

    def _pool_result(self, running_BE: jax.Array, count_B: jax.Array) -> jax.Array:
        if self.config.pooling == "avg":
            return running_BE / jnp.maximum(count_B, 1)[:, None].astype(running_BE.dtype)
        return running_BE

    # --- prefill ----------------------------------------------------------------------------

    def prefill(
        self,
        params: Params,
        entropy_params: Params | None,
        tokens_BT: jax.Array,
        lengths_B: jax.Array,
        rule_values: jax.Array,
    ) -> tuple[BLTState, jax.Array]:
        """Runs the prompts (left-aligned, ``lengths_B`` real ids each, BOS first) in one pass.

        ``rule_values`` are the numbers of the patching rule (`IncrementalRule.values`); ``self.rule``
        only fixes its structure (`IncrementalRule.static_part`).

        Returns the state after the last prompt byte and the logits [B, T, V] of every prompt
        position (those at or after a row's length are padding). Patching is that of training
        with include_next_token: the decision for position len (the next byte) is made here.
        """
        cfg, rule, dtype = self.config, self.rule, self.dtype
        b, t = tokens_BT.shape
        n, n_patches, k = self.max_positions, self.max_patches, cfg.cross_attn_k
        if t > n:
            raise ValueError(f"prompt width {t} exceeds max_positions {n}")
        rows = jnp.arange(b)
        lengths_B = lengths_B.astype(jnp.int32)
        positions = jnp.arange(t, dtype=jnp.int32)
        valid = positions[None, :] < lengths_B[:, None]
        is_eos = (tokens_BT == EOS_ID) & valid

        # Entropies and the patch starts of positions 0..T (position len = the next byte).
        entropy_state, h_prev, h_prev2, last_entropy = None, None, None, jnp.zeros((b,), jnp.float32)
        if rule.needs_entropy:
            entropy_state, entropy_logits = self.entropy_model.prefill(entropy_params, tokens_BT, lengths_B)
            entropies = next_byte_entropy(entropy_logits)
            h_prev = jnp.concatenate([jnp.zeros((b, 1)), entropies], axis=1)
            h_prev2 = jnp.concatenate([jnp.zeros((b, 2)), entropies[:, : t - 1]], axis=1)
            last_entropy = entropies[rows, lengths_B - 1]
        token_prev = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), tokens_BT], axis=1)
        token_prev2 = jnp.concatenate([jnp.zeros((b, 2), jnp.int32), tokens_BT[:, : t - 1]], axis=1)
        start_positions = jnp.arange(t + 1, dtype=jnp.int32)[None, :]
        rule_values = jnp.asarray(rule_values, jnp.float32)
        starts = rule.natural_starts(rule_values, start_positions, h_prev, h_prev2, token_prev, token_prev2)
        starts = jnp.broadcast_to(starts, (b, t + 1))
        starts = rule.split_row(rule_values, starts, start_positions)
        starts = starts & (start_positions <= lengths_B[:, None])
        # starts_upto[p] = starts among positions 1..p; pid(i) = starts_upto[i], dpid(i) = starts_upto[i + 1] - 1.
        starts_upto = jnp.concatenate(
            [jnp.zeros((b, 1), jnp.int32), jnp.cumsum(starts[:, 1:].astype(jnp.int32), axis=1)], axis=1
        )
        columns = t + 2  # patch columns of the prompt pass: at most len + 1 patches, plus a dump column
        pid = jnp.where(valid, starts_upto[:, :t], columns - 1)
        dpid = starts_upto[:, 1:] - 1
        closed = starts_upto[rows, lengths_B]
        open_index = starts_upto[rows, lengths_B - 1]
        last_start = jnp.max(jnp.where(starts[:, :t] & valid, positions[None, :], 0), axis=1)
        open_length = jnp.where(closed > open_index, 0, lengths_B - last_start)
        in_open = (pid == open_index[:, None]) & valid & (open_length > 0)[:, None]

        # Local encoder: byte states, cross-attention keys, the slots of every prompt patch.
        encoder, latent, decoder = self._stacks(params)
        stack = cfg.encoder
        token_segments = eos_segment_ids(is_eos) if cfg.document_mask else None
        token_positions = jnp.broadcast_to(positions, (b, t))
        embeddings = encoder.embed(
            tokens_BT, all_hash_ids(tokens_BT, cfg.hash_sizes, cfg.hash_functions, cfg.hash_vocab)
        )
        slot_patch = jnp.arange(columns * k, dtype=jnp.int32) // k
        window = cfg.cross_attn_window_encoder
        cross_mask = (
            (pid[:, None, :] <= slot_patch[None, :, None])
            & (slot_patch[None, :, None] < pid[:, None, :] + window)
            & valid[:, None, :]
        )
        encoder_caches = empty_kv_caches(stack, b, n, dtype)
        x, slots, filled, cross_keys, cross_values, pooled = embeddings, None, [], [], [], []
        for i, layer in enumerate(encoder.layers):
            x, cache = layer.prefill(x, token_positions, token_segments, encoder_caches[i], valid)
            filled.append(cache)
            if i not in self.encoder_cross_layers:
                continue
            cross = encoder.cross_attention[i]
            if i in self.pooling_layers:
                source = embeddings if cfg.patch_query_init == "embedding" else x
                pooled.append(self._pool_open(source, in_open))
                slots = encoder.patch_queries(pool_patches(source, pid, columns, cfg.pooling))
            keys, values = (heads_major(a) for a in cross.keys_values(x))
            cross_keys.append(_into(n, keys, valid))
            cross_values.append(_into(n, values, valid))
            slots = self._cross_residual(slots, cross.attend_cached(slots, keys, values, cross_mask))
        byte_states = x

        # Global model over the closed patches (the open one runs when it closes).
        patch_valid = jnp.arange(columns)[None, :] < closed[:, None]
        patch_has_eos = jnp.zeros((b, columns), bool).at[rows[:, None], pid].max(is_eos)
        patch_segments = eos_segment_ids(patch_has_eos) if cfg.document_mask else None
        patch_positions = jnp.broadcast_to(jnp.arange(columns, dtype=jnp.int32), (b, columns))
        vectors = latent.project_in(slots.reshape(b, columns, k * stack.dim))
        global_caches = empty_kv_caches(cfg.latent, b, n_patches, dtype)
        global_out, global_caches = latent.transformer.prefill(
            vectors, patch_positions, patch_segments, global_caches, patch_valid
        )

        # Local decoder: slots of the closed patches, then the bytes.
        dec = cfg.decoder
        decoder_slots = decoder.patch_slots(global_out).reshape(b, columns * k, dec.dim)
        slot_valid = jnp.repeat(patch_valid, k, axis=1)
        window = cfg.cross_attn_window_decoder
        read_mask = (slot_patch[None, None, :] <= dpid[:, :, None]) & (
            dpid[:, :, None] < slot_patch[None, None, :] + window
        )
        decoder_caches = empty_kv_caches(dec, b, n, dtype)
        x, slot_keys, slot_values, filled_dec = byte_states, [], [], []
        for i, layer in enumerate(decoder.layers):
            if i in self.decoder_cross_layers:
                cross = decoder.cross_attention[i]
                keys, values = (heads_major(a) for a in cross.keys_values(decoder_slots))
                slot_keys.append(_into(n_patches * k, keys, slot_valid))
                slot_values.append(_into(n_patches * k, values, slot_valid))
                x = self._cross_residual(x, cross.attend_cached(x, keys, values, read_mask))
            x, cache = layer.prefill(x, token_positions, token_segments, decoder_caches[i], valid)
            filled_dec.append(cache)
        logits = decoder.logits(x)

        tokens = jnp.zeros((b, n), jnp.int32).at[:, :t].set(jnp.where(valid, tokens_BT, 0))
        state = BLTState(
            position=lengths_B,
            rule_values=rule_values,
            tokens=tokens,
            starts=jnp.zeros((b, n + 1), bool).at[:, : t + 1].set(starts),
            eos_before=jnp.sum(is_eos, axis=1, dtype=jnp.int32),
            entropy=entropy_state,
            last_entropy=last_entropy,
            encoder_caches=tuple(filled),
            cross_keys=tuple(cross_keys),
            cross_values=tuple(cross_values),
            byte_patch=jnp.full((b, n), -1, jnp.int32).at[:, :t].set(jnp.where(valid, pid, -1)),
            pooled=tuple(pooled),
            open_length=open_length,
            open_has_eos=patch_has_eos[rows, open_index] & (open_length > 0),
            closed=closed,
            eos_patches=jnp.sum(patch_has_eos & patch_valid, axis=1, dtype=jnp.int32),
            global_caches=global_caches,
            slot_keys=tuple(slot_keys),
            slot_values=tuple(slot_values),
            decoder_caches=tuple(filled_dec),
        )
        return state, logits

    # --- one byte ---------------------------------------------------------------------------

    def step(
        self,
        params: Params,
        entropy_params: Params | None,
        state: BLTState,
        token_B: jax.Array,
        active_B: jax.Array,
    ) -> tuple[BLTState, jax.Array]:
        """Feeds byte u_t (one per row, at the row's position t); returns (state, logits [B, V] for t + 1).

        Rows with ``active_B`` False keep their state unchanged (finished rows of a batch).
        """
        cfg, rule = self.config, self.rule
        b = token_B.shape[0]
        rows = jnp.arange(b)
        t = state.position
        token_B = token_B.astype(jnp.int32)
        tokens = put_rows(state.tokens, t, token_B, active_B)
        is_eos = (token_B == EOS_ID) & active_B
        segment = state.eos_before if cfg.document_mask else None

        entropy_state, entropy = state.entropy, state.last_entropy
        if rule.needs_entropy:
            entropy_state, entropy_logits = self.entropy_model.step(entropy_params, state.entropy, token_B, active_B)
            entropy = next_byte_entropy(entropy_logits)

        # Local encoder at position t.
        encoder, _, decoder = self._stacks(params)
        history = max(cfg.hash_sizes) if cfg.num_hash_tables else 1
        window_index = t[:, None] - (history - 1) + jnp.arange(history)
        window_ids = jnp.where(window_index >= 0, tokens[rows[:, None], jnp.maximum(window_index, 0)], 0)
        hash_ids = all_hash_ids(window_ids, cfg.hash_sizes, cfg.hash_functions, cfg.hash_vocab)[:, :, -1]
        embedding = encoder.embed(token_B, hash_ids)
        first_byte = state.open_length == 0
        x = embedding
        encoder_caches, cross_keys, cross_values, pooled = [], list(state.cross_keys), list(state.cross_values), []
        for i, layer in enumerate(encoder.layers):
            x, layer_cache = layer.step(x, t, segment, state.encoder_caches[i], active_B)
            encoder_caches.append(layer_cache)
            if i not in self.encoder_cross_layers:
                continue
            c = self.encoder_cross_layers.index(i)
            keys, values = encoder.cross_attention[i].keys_values(x)
            cross_keys[c] = put_heads_major(cross_keys[c], t, keys, active_B)
            cross_values[c] = put_heads_major(cross_values[c], t, values, active_B)
            if i in self.pooling_layers:
                source = embedding if cfg.patch_query_init == "embedding" else x
                running = state.pooled[len(pooled)]
                pooled.append(jnp.where(active_B[:, None], self._pool_add(running, source, first_byte), running))
        byte_states = x

        # Does byte t + 1 start a patch?
        previous_token = tokens[rows, jnp.maximum(t - 1, 0)]
        values = state.rule_values
        close = rule.natural_starts(values, t + 1, entropy, state.last_entropy, token_B, previous_token)
        close = (close | rule.split_long(values, state.open_length + 1)) & active_B

        state = state._replace(
            tokens=tokens,
            starts=put_rows(state.starts, t + 1, close, active_B),
            entropy=entropy_state,
            last_entropy=jnp.where(active_B, entropy, state.last_entropy),
            encoder_caches=tuple(encoder_caches),
            cross_keys=tuple(cross_keys),
            cross_values=tuple(cross_values),
            byte_patch=put_rows(state.byte_patch, t, state.closed, active_B),
            pooled=tuple(pooled),
            open_has_eos=state.open_has_eos | is_eos,
        )
        state = self._close_patch(params, state, close)

        # Local decoder at position t: reads the slots of dpid(t) = closed - 1.
        k = cfg.cross_attn_k
        read_patch = state.closed - 1
        window = cfg.cross_attn_window_decoder
        x = byte_states
        decoder_caches = []
        for i, layer in enumerate(decoder.layers):
            if i in self.decoder_cross_layers:
                c = self.decoder_cross_layers.index(i)
                keys, values = state.slot_keys[c], state.slot_values[c]
                cross = decoder.cross_attention[i]
                if window == 1:
                    index = read_patch[:, None] * k + jnp.arange(k)
                    keys = jnp.take_along_axis(keys, index[:, None, :, None], axis=2)
                    values = jnp.take_along_axis(values, index[:, None, :, None], axis=2)
                    attended = cross.attend_cached(x[:, None], keys, values, jnp.ones((b, 1, k), bool))[:, 0]
                    x = self._cross_residual(x, attended)
                else:
                    # W patches back: only the closed patches' slots can be visible, so only the
                    # written prefix of the buffer is scanned (its size, not P * k, sets the cost).
                    def allowed(slot, read_patch=read_patch):
                        slot_patch = slot[None, :] // k
                        return (slot_patch <= read_patch[:, None]) & (read_patch[:, None] < slot_patch + window)

                    used = jnp.max(state.closed) * k
                    attended = cross.attend_cached(
                        x[:, None], keys, values, allowed=allowed, used=used, chunk=self.slot_chunk
                    )
                    x = self._cross_residual(x, attended[:, 0])
            x, layer_cache = layer.step(x, t, segment, state.decoder_caches[i], active_B)
            decoder_caches.append(layer_cache)
        logits = decoder.logits(x)

        advance = active_B.astype(jnp.int32)
        state = state._replace(
            position=t + advance,
            eos_before=state.eos_before + is_eos.astype(jnp.int32),
            open_length=jnp.where(active_B, jnp.where(close, 0, state.open_length + 1), state.open_length),
            decoder_caches=tuple(decoder_caches),
        )
        return state, logits

    def _close_patch(self, params: Params, state: BLTState, close_B: jax.Array) -> BLTState:
        """Closes the open patch of the rows in ``close_B``: encoder slots, one global step, decoder slots.

        The model runs under `lax.cond` (no global work when no row closes a patch), and the
        branch returns only the few new keys and values; they are written into the caches
        outside it with masked updates, so no large buffer passes through the conditional
        (XLA would copy it on every byte).
        """
        new = jax.eval_shape(lambda s: self._new_patch_entries(params, s), state)
        global_kv, slot_keys, slot_values = jax.lax.cond(
            jnp.any(close_B),
            lambda s: self._new_patch_entries(params, s),
            lambda s: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), new),
            state,
        )
        cfg, k = self.config, self.config.cross_attn_k
        patch = state.closed  # index of the patch that closes
        segment = state.eos_patches if cfg.document_mask else jnp.zeros_like(patch)
        global_caches = tuple(
            write_step(cache, keys, values, patch, segment, close_B)
            for cache, (keys, values) in zip(state.global_caches, global_kv, strict=True)
        )
        index = patch[:, None] * k + jnp.arange(k)
        return state._replace(
            global_caches=global_caches,
            slot_keys=tuple(_put_slots(b, index, n, close_B) for b, n in zip(state.slot_keys, slot_keys, strict=True)),
            slot_values=tuple(
                _put_slots(b, index, n, close_B) for b, n in zip(state.slot_values, slot_values, strict=True)
            ),
            closed=state.closed + close_B.astype(jnp.int32),
            eos_patches=state.eos_patches + (close_B & state.open_has_eos).astype(jnp.int32),
            open_has_eos=state.open_has_eos & ~close_B,
        )

    def _new_patch_entries(self, params: Params, state: BLTState) -> tuple:
        """For the open patch of every row (as if it closed now): the global model's new key/value per
        layer, and the decoder cross-attention keys / values of its k slots per cross-attention layer."""
        cfg = self.config
        b = state.closed.shape[0]
        k = cfg.cross_attn_k
        encoder, latent, decoder = self._stacks(params)
        patch = state.closed  # index of the patch that closes
        window = cfg.cross_attn_window_encoder
        byte_patch = state.byte_patch
        sees = (byte_patch >= 0) & (byte_patch <= patch[:, None]) & (patch[:, None] < byte_patch + window)
        mask = jnp.broadcast_to(sees[:, None, :], (b, k, sees.shape[1]))
        slots, pooled_index = None, 0
        for c, i in enumerate(self.encoder_cross_layers):
            if i in self.pooling_layers:
                pooled = self._pool_result(state.pooled[pooled_index], state.open_length + 1)
                pooled_index += 1
                slots = encoder.patch_queries(pooled[:, None])  # [B, k, E]
            attended = encoder.cross_attention[i].attend_cached(slots, state.cross_keys[c], state.cross_values[c], mask)
            slots = self._cross_residual(slots, attended)

        x = latent.project_in(slots.reshape(b, k * cfg.encoder.dim))
        segment = state.eos_patches if cfg.document_mask else None
        x, global_kv = latent.transformer.step_deferred(x, patch, segment, state.global_caches, SLOT_CHUNK_PATCHES)

        decoder_slots = decoder.patch_slots(x)  # [B, k, E]
        slot_keys, slot_values = [], []
        for i in self.decoder_cross_layers:
            keys, values = decoder.cross_attention[i].keys_values(decoder_slots)
            slot_keys.append(keys)
            slot_values.append(values)
        return global_kv, tuple(slot_keys), tuple(slot_values)


def _into(slots: int, values_BKTD: jax.Array, valid_BT: jax.Array) -> jax.Array:
    """A heads-major buffer [B, K, slots, D] holding a prefill's values at 0..T-1 where valid (zeros elsewhere)."""
    b, k, t, d = values_BKTD.shape
    buffer = jnp.zeros((b, k, slots, d), values_BKTD.dtype)
    return buffer.at[:, :, :t].set(jnp.where(valid_BT[:, None, :, None], values_BKTD, 0))


def _put_slots(buffer_BKSD: jax.Array, index_BR: jax.Array, new_BRKD: jax.Array, mask_B: jax.Array) -> jax.Array:
    """buffer[b, :, index[b, r]] = new[b, r] where mask[b]: the k slots of one patch per row."""
    rows = jnp.arange(buffer_BKSD.shape[0])[:, None]
    old = buffer_BKSD[rows, :, index_BR]  # [B, R, K, D]
    return buffer_BKSD.at[rows, :, index_BR].set(
        jnp.where(mask_B[:, None, None, None], new_BRKD.astype(old.dtype), old)
    )
