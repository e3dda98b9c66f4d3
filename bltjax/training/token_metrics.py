"""Bits per byte of a token-level LM: the paper's conversion, over the bytes its targets cover.

A token LM (`bltjax.data.bpe`) predicts tokens of several bytes each, so its nats are divided by
the bytes those tokens stand for rather than by their number (docs/architecture.md §11, the
paper's BPE baseline):

    bpb       = nats over every loss-mask target / (ln 2 x bytes of the byte stream those targets cover)
    bpb_bytes = nats over text-token targets / (ln 2 x text bytes they cover)

The byte stream counts BOS and EOS as one position each, as a byte LM's ``bpb`` does, so both
numbers compare with a byte LM's and a BLT's on the same documents. ``target_bytes`` [B, N] comes
with every token batch (`bltjax.data.token_pipeline`): `bpe.BPETokenizer.stream_bytes` of each
target id.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bltjax.tokenizer import OFFSET


def summarize_token_nll(
    nll: jax.Array, targets: jax.Array, loss_mask: jax.Array, target_bytes: jax.Array
) -> dict[str, jax.Array]:
    """`metrics.summarize_nll`'s sums for token targets, plus ``n_target_bytes``, bpb's denominator.

    ``n_targets`` stays the number of targets (the loss is nats per token); ``n_bytes`` is the text
    bytes the text-token targets cover and ``n_target_bytes`` the byte-stream bytes of all of them.
    """
    mask = loss_mask.astype(bool)
    text = mask & (targets >= OFFSET)
    covered = target_bytes.astype(jnp.int32)
    nll = nll.astype(jnp.float32)
    return dict(
        nats_sum=jnp.sum(jnp.where(mask, nll, 0.0)),
        n_targets=jnp.sum(mask, dtype=jnp.int32),
        nats_bytes_sum=jnp.sum(jnp.where(text, nll, 0.0)),
        n_bytes=jnp.sum(jnp.where(text, covered, 0), dtype=jnp.int32),
        n_target_bytes=jnp.sum(jnp.where(mask, covered, 0), dtype=jnp.int32),
    )


def bpb_denominator(sums: dict) -> float:
    """What ``bpb`` divides by: the covered bytes of a token LM's targets, else the number of targets."""
    return sums["n_target_bytes"] if "n_target_bytes" in sums else sums["n_targets"]
