"""The Byte Latent Transformer, end to end (docs/architecture.md §9).

    tokens [B, N], patch_lengths [B, P]
      -> hash ids, patch ids, document segments           (all derived inside jit)
      -> local encoder  -> byte states, k slots per patch
      -> latent transformer over patches
      -> local decoder  -> logits [B, N, 260]

Shapes are static: rows are padded with BOE tokens and zero-length patches, and every mask is
built from ids by comparisons inside the attention that uses it (positions, document segment
ids and the stack's window; no [B, N, N] mask is materialised for the windowed local stacks).
Intermediate tensors are sown into the "intermediates" collection (apply with
``mutable=["intermediates"]`` to read them), which is how the parity tests locate the first
stage that disagrees with a reference.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bltjax.models.configs import BLTConfig
from bltjax.models.hash_embed import all_hash_ids
from bltjax.models.latent import LatentTransformer
from bltjax.models.layers import eos_segment_ids, positions_like
from bltjax.models.local_decoder import LocalDecoder
from bltjax.models.local_encoder import LocalEncoder
from bltjax.models.partitioning import constrain
from bltjax.models.patch_ids import check_patch_lengths, decoder_patch_ids, patch_ids, with_next_token
from bltjax.tokenizer import EOS_ID


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


class BLT(nn.Module):
    """``apply({'params': p}, tokens[B, N], patch_lengths[B, P]) -> float32 logits [B, N, 260]``.

    Each row of ``patch_lengths`` adds up to N (the Hugging Face convention) or N + 1 (the
    training convention, whose last patch also covers the next token), is right-padded with
    zeros, and starts with a patch of length 1. Outside jit the lengths are validated.
    """

    config: BLTConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, patch_lengths: jax.Array) -> jax.Array:
        cfg = self.config
        b, n = tokens.shape
        p = patch_lengths.shape[-1]
        if _is_concrete(patch_lengths):
            check_patch_lengths(patch_lengths, n)
        tokens = jnp.asarray(tokens, jnp.int32)
        lengths = with_next_token(jnp.asarray(patch_lengths), n)
        pid = constrain(patch_ids(lengths, n), ("batch", "length"))
        dpid = constrain(decoder_patch_ids(lengths, n), ("batch", "length"))

        is_eos = tokens == EOS_ID
        positions = positions_like(tokens)
        token_segments = eos_segment_ids(is_eos) if cfg.document_mask else None
        hash_ids = all_hash_ids(tokens, cfg.hash_sizes, cfg.hash_functions, cfg.hash_vocab)
        hash_ids = constrain(hash_ids, (None, "batch", "length"))
        self.sow("intermediates", "hash_ids", hash_ids)
        self.sow("intermediates", "encoder_patch_ids", pid)
        self.sow("intermediates", "decoder_patch_ids", dpid)

        encoder = LocalEncoder(cfg, name="local_encoder")
        byte_states, slots = encoder(tokens, hash_ids, positions, token_segments, pid, p)
        self.sow("intermediates", "encoder_hidden", byte_states)
        byte_states = constrain(byte_states, ("batch", "length", "act_embed"))
        patch_vectors = constrain(
            slots.reshape(b, p, cfg.cross_attn_k * cfg.encoder.dim), ("batch", "patches", "act_embed")
        )
        self.sow("intermediates", "encoder_patch_embeds", patch_vectors)

        patch_positions = positions_like(lengths)
        patch_segments = None
        if cfg.document_mask:
            # A patch ends a document if it holds an EOS (docs/architecture.md §7).
            patch_has_eos = jnp.zeros((b, p), bool).at[jnp.arange(b)[:, None], pid].max(is_eos)
            patch_segments = constrain(eos_segment_ids(patch_has_eos), ("batch", "patches"))
        global_out = LatentTransformer(cfg, name="latent")(patch_vectors, patch_positions, patch_segments)
        global_out = constrain(global_out, ("batch", "patches", "act_embed"))
        self.sow("intermediates", "global_output", global_out)

        logits = LocalDecoder(cfg, name="local_decoder")(byte_states, global_out, positions, token_segments, dpid)
        return constrain(logits, ("batch", "length", "act_vocab"))
