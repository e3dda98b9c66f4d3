"""The MegaByte baseline (Yu et al. 2023) as the BLT paper compares against it (docs/architecture.md §19).

    tokens [B, N]
      -> s - 1 BOE ids prepended                      encoder ids [B, N + s - 1]
      -> local encoder (byte transformer)             byte states h [B, N + s - 1, E]
      -> concatenation pooling                        patch p = h[p*s], ..., h[p*s + s - 1]  [B, P, s*E]
      -> W_in (s*E -> G), latent transformer          global outputs O [B, P, G], P = ceil(N / s)
      -> D (G -> s*E) = s slots per patch              slot r of O[p] feeds byte p*s + r
      -> decoder byte transformer over h[s - 1:] + slot -> logits [B, N, 260]

The prefix makes encoder patch 0 hold s - 1 fillers and token 0, so token i sits in encoder
patch floor((i + s - 1) / s) and O[p] has seen tokens 0..p*s. Byte i (target i + 1) reads slot
i mod s of O[floor(i / s)], which has seen tokens up to floor(i / s) * s <= i: no byte sees its
own target, and each byte reads the newest global output that is safe. Because the slots of
patch p are bytes p*s .. p*s + s - 1 in order, the per-byte read is a reshape, not a gather.
This is BLT's decoder patch rule (docs/architecture.md §8.2) with lengths [1, s, s, ...].

Parameters: ``local_encoder`` (byte embedding, optional hash tables, blocks), ``latent``
(``input_projection`` W_in, blocks), ``local_decoder`` (``patch_projection`` D, blocks, final
norm, head). There is no cross-attention.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bltjax.models.configs import MegaByteConfig
from bltjax.models.hash_embed import HashNgramEmbedding, all_hash_ids
from bltjax.models.layers import (
    Linear,
    RMSNorm,
    Transformer,
    dtype_of,
    eos_segment_ids,
    positions_like,
    truncated_normal_init,
)
from bltjax.models.partitioning import constrain
from bltjax.tokenizer import BOE_ID, EOS_ID


def num_patches(seq_len: int, patch_size: int) -> int:
    """Global positions of a row of N bytes: ceil(N / s) (the last byte reads O[floor((N - 1) / s)])."""
    return -(-seq_len // patch_size)


def with_boe_prefix(tokens_BN: jax.Array, patch_size: int) -> jax.Array:
    """The encoder's ids: s - 1 BOE fillers, then the row [B, N + s - 1]."""
    prefix = jnp.full((tokens_BN.shape[0], patch_size - 1), BOE_ID, tokens_BN.dtype)
    return jnp.concatenate([prefix, tokens_BN], axis=1)


def concat_patches(states_BME: jax.Array, patch_size: int, n_patches: int) -> jax.Array:
    """Concatenation pooling: patch p is the s states p*s .. p*s + s - 1 side by side, [B, P, s*E]."""
    b, _, e = states_BME.shape
    return states_BME[:, : n_patches * patch_size].reshape(b, n_patches, patch_size * e)


def _kw(cfg: MegaByteConfig) -> dict:
    return dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))


def _stack(cfg: MegaByteConfig, stack) -> Transformer:
    return Transformer(stack, cfg.init_std_factor, remat=cfg.remat, attention=cfg.attention, scan=cfg.scan_layers,
                       **_kw(cfg))  # fmt: skip


class MegaByteEncoder(nn.Module):
    """Byte embedding (+ hash n-grams) and a byte transformer: states [B, M, E] of the prefixed ids."""

    config: MegaByteConfig

    def setup(self) -> None:
        cfg = self.config
        e = cfg.encoder.dim
        self.byte_embedding = self.param(
            "byte_embedding",
            nn.with_logical_partitioning(truncated_normal_init(e**-0.5), ("vocab", "embed")),
            (cfg.vocab_size, e),
            dtype_of(cfg.param_dtype),
        )
        if cfg.num_hash_tables:
            self.hash_embedding = HashNgramEmbedding(
                cfg.num_hash_tables, cfg.hash_vocab, e, dtype_of(cfg.param_dtype), cfg.hash_rows_multiple
            )
        self.transformer = _stack(cfg, cfg.encoder)

    def __call__(self, ids_BM: jax.Array, segment_ids_BM: jax.Array | None) -> jax.Array:
        cfg = self.config
        x = jnp.take(self.byte_embedding, ids_BM, axis=0)
        if cfg.num_hash_tables:
            hash_ids = all_hash_ids(ids_BM, cfg.hash_sizes, cfg.hash_functions, cfg.hash_vocab)
            x = x + self.hash_embedding(constrain(hash_ids, (None, "batch", "length")))
            if cfg.hash_normalize:
                x = x / (len(cfg.hash_sizes) + 1)
        x = constrain(x.astype(dtype_of(cfg.dtype)), ("batch", "length", "act_embed"))
        return self.transformer(x, positions_like(ids_BM), segment_ids_BM)


class MegaByteLatent(nn.Module):
    """W_in on the concatenated patches, then the global transformer: [B, P, s*E] -> [B, P, G]."""

    config: MegaByteConfig

    def setup(self) -> None:
        cfg = self.config
        width_in = cfg.patch_size * cfg.encoder.dim
        self.input_projection = Linear(
            (width_in,), (cfg.latent.dim,), ("patch_slots", "embed"), width_in**-0.5, **_kw(cfg)
        )
        self.transformer = _stack(cfg, cfg.latent)

    def __call__(self, patches_BPX: jax.Array, segment_ids_BP: jax.Array | None) -> jax.Array:
        x = constrain(self.input_projection(patches_BPX), ("batch", "patches", "act_embed"))
        positions = positions_like(x[..., 0])
        return self.transformer(x, positions, segment_ids_BP)


class MegaByteDecoder(nn.Module):
    """Byte states plus one slot of a global output each, a byte transformer, norm and head."""

    config: MegaByteConfig

    def setup(self) -> None:
        cfg = self.config
        g, e = cfg.latent.dim, cfg.decoder.dim
        self.patch_projection = Linear((g,), (cfg.patch_size * e,), ("embed", "patch_slots"), g**-0.5, **_kw(cfg))
        self.transformer = _stack(cfg, cfg.decoder)
        self.final_norm = RMSNorm(cfg.decoder.norm_eps, **_kw(cfg))
        self.output = Linear((e,), (cfg.vocab_size,), ("embed", "vocab"), e**-0.5, **_kw(cfg))

    def __call__(self, byte_states_BNE: jax.Array, global_BPG: jax.Array, segment_ids_BN: jax.Array | None):
        cfg = self.config
        b, n, e = byte_states_BNE.shape
        p = global_BPG.shape[1]
        # Slot r of O[p] is row p*s + r: byte i reads slot i mod s of O[floor(i / s)] (module docstring).
        slots = self.patch_projection(global_BPG).reshape(b, p * cfg.patch_size, e)[:, :n]
        x = constrain(byte_states_BNE + slots, ("batch", "length", "act_embed"))
        x = constrain(self.transformer(x, positions_like(x[..., 0]), segment_ids_BN), ("batch", "length", "act_embed"))
        return self.output(self.final_norm(x)).astype(jnp.float32)


class MegaByte(nn.Module):
    """``apply({'params': p}, tokens[B, N]) -> float32 logits [B, N, 260]`` for token i + 1.

    Patches are fixed, so the model needs no patch lengths: batches are those of a byte LM.
    """

    config: MegaByteConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.config
        s = cfg.patch_size
        tokens = jnp.asarray(tokens, jnp.int32)
        b, n = tokens.shape
        p = num_patches(n, s)
        ids = with_boe_prefix(tokens, s)
        is_eos = ids == EOS_ID
        enc_segments = eos_segment_ids(is_eos) if cfg.document_mask else None
        states = MegaByteEncoder(cfg, name="local_encoder")(ids, enc_segments)
        states = constrain(states, ("batch", "length", "act_embed"))
        self.sow("intermediates", "encoder_hidden", states)

        patches = constrain(concat_patches(states, s, p), ("batch", "patches", "act_embed"))
        self.sow("intermediates", "encoder_patch_embeds", patches)
        patch_segments = None
        if cfg.document_mask:
            # A patch holding an EOS ends its document for the global model (as BLT's, docs/architecture.md §7).
            patch_has_eos = is_eos[:, : p * s].reshape(b, p, s).any(axis=-1)
            patch_segments = constrain(eos_segment_ids(patch_has_eos), ("batch", "patches"))
        global_out = MegaByteLatent(cfg, name="latent")(patches, patch_segments)
        global_out = constrain(global_out, ("batch", "patches", "act_embed"))
        self.sow("intermediates", "global_output", global_out)

        dec_segments = enc_segments[:, s - 1 :] if enc_segments is not None else None
        logits = MegaByteDecoder(cfg, name="local_decoder")(states[:, s - 1 :], global_out, dec_segments)
        return constrain(logits, ("batch", "length", "act_vocab"))
