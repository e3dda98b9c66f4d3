"""FLOPs per byte and parameter counts of an experiment: the model half of MFU.

  from bltjax.models import flops
  flops.analytic_flops_per_byte(config).train      # what MFU divides by (see below)
  flops.parameter_counts(bltjax.config.model_config(config))

Two counts, for two questions:

* **Analytic** (`analytic_flops_per_byte`, built from the primitives of docs/architecture.md
  §14.1 and the BLT sum of §14.2): the paper's formula, with d_ff = 4, multi-head attention, every
  attention averaged over (m + 1) / 2 keys, and a 256-way output head. It is the count the
  paper's iso-FLOP comparisons use, so **MFU is reported with it** (`bltjax.runtime.peaks.mfu`)::

      MFU = train FLOPs per byte (3 x analytic forward) x bytes/s / peak FLOP/s

  Runs, sweeps and paper numbers are then comparable, whatever the implementation does.

* **Matmul** (`matmul_flops_per_byte`): the multiply-adds of bltjax's modules, with the real
  SwiGLU width, grouped-query heads, head_dim, the exact causal-window key average, k slots per
  patch, the E_C / W_in / D_C projections and the 260-way head. Attention counts only the
  scores a query may see (its causal window; a patch slot's own bytes); ``dense_attention=True``
  counts every query against every key of its row instead, an upper bound. What a forward pass
  actually asks for (`traced_matmul_flops`) lies between the two, depending on how the
  attention kernels skip masked blocks. Benchmarks use it for hardware efficiency.

Neither counts elementwise work (norms, softmax, RoPE) or embedding lookups, and neither
subtracts document masking, which depends on the data. Backward = 2 x forward
(docs/architecture.md §14.1).

* **XLA's own** (`xla_flops_per_byte`, `compiled_flops`): ``cost_analysis()`` of the compiled
  forward (or gradient) program. It counts everything XLA executes, elementwise work and padded
  patch columns included, so it agrees with the analytic count (within a few per cent, tested)
  only for paper-shaped stacks whose ``max_patches`` leaves no padding; it is the check that the
  formulas describe the program, not a number to report.

Parameters (`parameter_counts`, docs/architecture.md §14.4) are counted per component from the
config alone, and equal the shapes Flax creates (tested); ``non_embedding`` leaves out the byte
embedding, the hash tables and the output head, the paper's convention for model size.

MegaByte (`megabyte_flops_per_byte`, `megabyte_matmul_flops_per_byte`, docs/architecture.md §19):
BLT's sum with fixed patches of s bytes and the two cross-attention columns holding the
concatenation projections instead (``encoder_cross``: W_in, s·h_E -> h_G per patch;
``decoder_cross``: D, h_G -> s·h_D per patch).

Token-level baselines (`token_lm_flops_per_byte`): a Llama over tokens of ``bytes_per_token``
bytes on average, the paper's FL_BPE, for comparing a BLT with the token model of the same
inference budget.

The device half (peak FLOP/s) is `bltjax.runtime.peaks`; ``python -m bltjax.flops`` prints
this module's breakdown of one config as a table.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.extend import core as jex_core

from bltjax.config import model_config
from bltjax.models.configs import BLTConfig, ByteLMConfig, MegaByteConfig, TransformerConfig

# Output vocabulary of the analytic count: docs/architecture.md §14.2 writes the decoder head as
# V = 256 (the byte values); the byte LM's analytic head uses the same so BLT and byte LM compare
# like for like. The matmul count uses the real head width, `record.vocab_size` (260).
ANALYTIC_BYTE_VOCAB = 256
TRAIN_MULTIPLIER = 3  # forward + backward (= 2 x forward), docs/architecture.md §14.1


# --- docs/architecture.md §14.1 primitives (paper Table 11): forward FLOPs per query position ---


def attention_flops(n_layers: float, width: float, context: float) -> float:
    """Attention(l, h, m) = 4·l·h·(m + 1)/2: QK^T and AV over the (m + 1)/2 keys of a causal row."""
    return 2.0 * n_layers * width * (context + 1)


def qkvo_flops(n_layers: float, width: float, kv_per_query: float) -> float:
    """QKVO(l, h, r) = (2r + 2)·2·l·h²: Q and O once per query, K and V for r key vectors per query."""
    return (2.0 * kv_per_query + 2.0) * 2.0 * n_layers * width * width


def feed_forward_flops(n_layers: float, width: float) -> float:
    """FeedForward(l, h) = 2·l·2·h·(4h) = 16·l·h²: two h x 4h matrices (the paper's d_ff = 4)."""
    return 16.0 * n_layers * width * width


def de_embedding_flops(width: float, vocab: float) -> float:
    """DeEmbedding(h, V) = 2·h·V: the output head (embedding lookups are free)."""
    return 2.0 * width * vocab


def transformer_flops(width: float, n_layers: float, context: float, vocab: float) -> float:
    """TransfFL(h, l, m, V) = 24·l·h² + 2·l·h·(m + 1) + 2·h·V per position."""
    return (
        feed_forward_flops(n_layers, width)
        + qkvo_flops(n_layers, width, 1.0)
        + attention_flops(n_layers, width, context)
        + de_embedding_flops(width, vocab)
    )


def cross_attention_flops(width: float, n_layers: float, context: float, kv_per_query: float) -> float:
    """CrossFL(h, l, m, r) = Attention(l, h, m) + QKVO(l, h, r) per query."""
    return attention_flops(n_layers, width, context) + qkvo_flops(n_layers, width, kv_per_query)


# --- per-byte breakdowns -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FlopBreakdown:
    """Forward FLOPs per byte by component (docs/architecture.md §14.2 columns).

    A byte LM has no patches: its whole transformer, head included, is `global_`.
    """

    global_: float = 0.0
    encoder: float = 0.0
    decoder: float = 0.0  # decoder blocks and the output head
    encoder_cross: float = 0.0
    decoder_cross: float = 0.0

    @property
    def total_forward(self) -> float:
        return self.global_ + self.encoder + self.decoder + self.encoder_cross + self.decoder_cross

    @property
    def train(self) -> float:
        """Training FLOPs per byte: forward + backward = 3 x forward."""
        return TRAIN_MULTIPLIER * self.total_forward

    def as_dict(self) -> dict[str, float]:
        """Every component plus the totals, e.g. for a JSON report."""
        values = {f.name.rstrip("_"): getattr(self, f.name) for f in dataclasses.fields(self)}
        values.update(total_forward=self.total_forward, train=self.train)
        return values


def _context(window: int | None, context: float) -> float:
    return context if window is None else min(window, context)


def _cross_layers(n_layers: int, all_layers: bool) -> int:
    return n_layers if all_layers else 1


def blt_flops_per_byte(record: BLTConfig, *, context_bytes: float, mean_patch_size: float) -> FlopBreakdown:
    """The paper's FL_BLT (docs/architecture.md §14.2) by component, analytic.

    n_ctx = ``context_bytes``, n_p = ``mean_patch_size``, k = ``cross_attn_k``; the local
    windows are the stacks' windows (the context when None). Cross-attention layers are
    counted as configured (every layer or one), which is l_E / l_D for the paper's models.
    """
    n_ctx, n_p, k = float(context_bytes), float(mean_patch_size), float(record.cross_attn_k)
    if n_ctx <= 0 or n_p <= 0:
        raise ValueError(f"context_bytes and mean_patch_size must be positive, got {context_bytes}, {mean_patch_size}")
    enc, lat, dec = record.encoder, record.latent, record.decoder
    n_patches = n_ctx / n_p
    cross_enc = _cross_layers(enc.n_layers, record.cross_attn_all_layers_encoder)
    cross_dec = _cross_layers(dec.n_layers, record.cross_attn_all_layers_decoder)
    return FlopBreakdown(
        global_=transformer_flops(lat.dim, lat.n_layers, _context(lat.window, n_patches), 0) / n_p,
        encoder=transformer_flops(enc.dim, enc.n_layers, _context(enc.window, n_ctx), 0),
        decoder=transformer_flops(dec.dim, dec.n_layers, _context(dec.window, n_ctx), ANALYTIC_BYTE_VOCAB),
        encoder_cross=cross_attention_flops(enc.dim, cross_enc, n_p, n_p / k) * k / n_p,
        decoder_cross=cross_attention_flops(dec.dim, cross_dec, k, k / n_p),
    )


def byte_lm_flops_per_byte(record: ByteLMConfig, *, context_bytes: float) -> FlopBreakdown:
    """A plain byte transformer, analytic: TransfFL(h, l, m = min(window, n_ctx), V = 256)."""
    stack = record.stack
    return FlopBreakdown(
        global_=transformer_flops(stack.dim, stack.n_layers, _context(stack.window, context_bytes), ANALYTIC_BYTE_VOCAB)
    )


def megabyte_flops_per_byte(record: MegaByteConfig, *, context_bytes: float) -> FlopBreakdown:
    """MegaByte in the paper's primitives: BLT's FL_BLT at n_p = s with the cross-attentions replaced
    by the concatenation projections, 2·s·h_E·h_G (W_in) and 2·h_G·s·h_D (D) per patch = 2·h·h_G per byte.

    Per byte of the row, as the paper counts: the s - 1 prefix positions the encoder also runs are
    left out (`megabyte_matmul_flops_per_byte` counts them).
    """
    n_ctx, s = float(context_bytes), float(record.patch_size)
    if n_ctx <= 0:
        raise ValueError(f"context_bytes must be positive, got {context_bytes}")
    enc, lat, dec = record.encoder, record.latent, record.decoder
    return FlopBreakdown(
        global_=transformer_flops(lat.dim, lat.n_layers, _context(lat.window, n_ctx / s), 0) / s,
        encoder=transformer_flops(enc.dim, enc.n_layers, _context(enc.window, n_ctx), 0),
        decoder=transformer_flops(dec.dim, dec.n_layers, _context(dec.window, n_ctx), ANALYTIC_BYTE_VOCAB),
        encoder_cross=2.0 * enc.dim * lat.dim,
        decoder_cross=2.0 * lat.dim * dec.dim,
    )


def bpe_flops_per_byte(dim: int, layers: int, vocab: int, context_bytes: float, bytes_per_token: float) -> float:
    """The token baseline, forward: FL_BPE = TransfFL(h, l, n_ctx / n_bpe, |vocab|) / n_bpe (architecture.md §14.2)."""
    tokens = context_bytes / bytes_per_token
    return transformer_flops(dim, layers, tokens, vocab) / bytes_per_token


def token_lm_flops_per_byte(
    stack: TransformerConfig, *, context_bytes: float, bytes_per_token: float, vocab: int
) -> FlopBreakdown:
    """A token-level Llama of ``stack``'s shape, per byte (docs/architecture.md §14.2 FL_BPE), as `global_`.

    Its context is ``context_bytes / bytes_per_token`` tokens (the stack's window caps it), its
    head has ``vocab`` outputs, and every token costs one pass for ``bytes_per_token`` bytes.
    """
    if bytes_per_token <= 0 or context_bytes <= 0 or vocab <= 0:
        raise ValueError(
            "bytes_per_token, context_bytes and vocab must be positive, got "
            f"{bytes_per_token}, {context_bytes}, {vocab}"
        )
    tokens = float(context_bytes) / float(bytes_per_token)
    per_token = transformer_flops(stack.dim, stack.n_layers, _context(stack.window, tokens), vocab)
    return FlopBreakdown(global_=per_token / float(bytes_per_token))


# --- what bltjax multiplies -------------------------------------------------------------------


def mean_causal_keys(length: float, window: int | None) -> float:
    """Mean number of keys a query sees in a causal row of ``length`` with a sliding window.

    Query i sees min(i + 1, w) keys; without a window (or w >= length) the mean is (n + 1) / 2.
    """
    if window is None or window >= length:
        return (length + 1) / 2
    return (window * (window + 1) / 2 + (length - window) * window) / length


def _block_matmul_flops(stack: TransformerConfig, keys: float) -> float:
    """One pre-norm block, one query position: projections, attention scores/values, SwiGLU."""
    q_width = stack.n_heads * stack.resolved_head_dim
    kv_width = stack.kv_heads * stack.resolved_head_dim
    projections = 2 * stack.dim * (2 * q_width + 2 * kv_width)
    attention = 4 * q_width * keys
    ffn = 6 * stack.dim * stack.hidden_dim
    return projections + attention + ffn


def _cross_widths(record: BLTConfig, stack: TransformerConfig) -> tuple[int, int]:
    """(query width, key/value width) of a cross-attention layer, as `layers.CrossAttention` builds it."""
    heads = record.cross_attn_heads or stack.n_heads
    kv_heads = heads if record.cross_attn_heads else stack.kv_heads
    head_dim = stack.dim // heads
    return heads * head_dim, kv_heads * head_dim


def blt_matmul_flops_per_byte(
    record: BLTConfig, *, context_bytes: int, mean_patch_size: float, dense_attention: bool = False
) -> FlopBreakdown:
    """Forward matmul FLOPs per byte of bltjax's BLT (see the module docstring).

    With ``dense_attention`` every query scores every key of its row (local stacks: N keys,
    global: N / n_p patches, encoder slots: all N bytes, decoder bytes: all k·N / n_p slots),
    the upper bound of a masked-dense implementation.
    """
    n, n_p, k = float(context_bytes), float(mean_patch_size), record.cross_attn_k
    if n <= 0 or n_p <= 0:
        raise ValueError(f"context_bytes and mean_patch_size must be positive, got {context_bytes}, {mean_patch_size}")
    enc, lat, dec = record.encoder, record.latent, record.decoder
    e, g = enc.dim, lat.dim
    n_patches = n / n_p

    def keys(stack: TransformerConfig, length: float) -> float:
        return length if dense_attention else mean_causal_keys(length, stack.window)

    encoder = enc.n_layers * _block_matmul_flops(enc, keys(enc, n))

    q_w, kv_w = _cross_widths(record, enc)
    layers = _cross_layers(enc.n_layers, record.cross_attn_all_layers_encoder)
    poolings = layers if record.repool_every_cross_attn_layer else 1
    slot_keys = n if dense_attention else record.cross_attn_window_encoder * n_p
    per_patch = poolings * 2 * e * k * e + layers * k * (4 * e * q_w + 4 * q_w * slot_keys)  # E_C; Q, O, scores
    encoder_cross = per_patch / n_p + layers * 4 * e * kv_w  # K and V of every byte

    input_projection = 2 * k * e * g if k * e != g else 0
    global_ = (input_projection + lat.n_layers * _block_matmul_flops(lat, keys(lat, n_patches))) / n_p

    q_w, kv_w = _cross_widths(record, dec)
    layers = _cross_layers(dec.n_layers, record.cross_attn_all_layers_decoder)
    per_patch = 2 * g * k * dec.dim + layers * k * 4 * dec.dim * kv_w  # D_C; K and V of every slot
    slots = k * n_patches if dense_attention else k * record.cross_attn_window_decoder
    decoder_cross = per_patch / n_p + layers * (4 * dec.dim * q_w + 4 * q_w * slots)

    decoder = dec.n_layers * _block_matmul_flops(dec, keys(dec, n)) + 2 * dec.dim * record.vocab_size
    return FlopBreakdown(global_, encoder, decoder, encoder_cross, decoder_cross)


def byte_lm_matmul_flops_per_byte(
    record: ByteLMConfig, *, context_bytes: int, dense_attention: bool = False
) -> FlopBreakdown:
    """Forward matmul FLOPs per byte of bltjax's byte LM (blocks + 260-way head) as `global_`."""
    stack = record.stack
    keys = float(context_bytes) if dense_attention else mean_causal_keys(context_bytes, stack.window)
    return FlopBreakdown(global_=stack.n_layers * _block_matmul_flops(stack, keys) + 2 * stack.dim * record.vocab_size)


def megabyte_matmul_flops_per_byte(
    record: MegaByteConfig, *, context_bytes: int, dense_attention: bool = False
) -> FlopBreakdown:
    """Forward matmul FLOPs per byte of bltjax's MegaByte over rows of N = ``context_bytes`` bytes.

    Exact shapes: the encoder runs N + s - 1 positions, the latent model ceil(N / s) patches.
    """
    n, s = int(context_bytes), record.patch_size
    enc, lat, dec = record.encoder, record.latent, record.decoder
    m, patches = n + s - 1, -(-n // s)

    def keys(stack: TransformerConfig, length: float) -> float:
        return length if dense_attention else mean_causal_keys(length, stack.window)

    return FlopBreakdown(
        global_=patches * lat.n_layers * _block_matmul_flops(lat, keys(lat, patches)) / n,
        encoder=m * enc.n_layers * _block_matmul_flops(enc, keys(enc, m)) / n,
        decoder=dec.n_layers * _block_matmul_flops(dec, keys(dec, n)) + 2 * dec.dim * record.vocab_size,
        encoder_cross=patches * 2 * s * enc.dim * lat.dim / n,
        decoder_cross=patches * 2 * lat.dim * s * dec.dim / n,
    )


# --- from an experiment config ----------------------------------------------------------------


def expected_patch_size(config: ml_collections.ConfigDict) -> float:
    """The mean patch size the FLOP counts assume for an experiment: static -> its size, byte -> 1,
    space / entropy -> ``config.patching.patch_size`` (the calibrated target mean)."""
    patching = config.patching
    if patching.mode == "byte":
        return 1.0
    if patching.patch_size is None:
        raise ValueError(
            f"config.patching.patch_size: expected the expected mean patch size for mode={patching.mode!r} "
            "(or pass mean_patch_size= the measured mean), got None"
        )
    return float(patching.patch_size)


def record_and_patch_size(config: ml_collections.ConfigDict, mean_patch_size: float | None):
    """The model record, and the mean patch size for a BLT or MegaByte (None for a byte LM)."""
    record = model_config(config)
    if isinstance(record, MegaByteConfig):
        return record, float(record.patch_size)
    if isinstance(record, BLTConfig):
        n_p = expected_patch_size(config) if mean_patch_size is None else float(mean_patch_size)
        return record, n_p
    return record, None


def token_bytes_per_token(config: ml_collections.ConfigDict, bytes_per_token: float | None = None) -> float:
    """A token LM's bytes per token: ``bytes_per_token`` if given, else ``config.data.bytes_per_token``."""
    value = config.data.get("bytes_per_token") if bytes_per_token is None else bytes_per_token
    if value is None or not float(value) > 0:
        raise ValueError(
            "config.data.bytes_per_token: expected the token folder's bytes per token (its manifest.json, "
            f"python -m bltjax.bpe prints it) to count a token LM's FLOPs per byte, got {value!r}"
        )
    return float(value)


def analytic_flops_per_byte(
    config: ml_collections.ConfigDict, *, mean_patch_size: float | None = None, bytes_per_token: float | None = None
) -> FlopBreakdown:
    """Spec §14 FLOPs per byte of an experiment, context = ``config.data.seq_len``: **the MFU count**.

    ``mean_patch_size`` overrides the config's expectation, e.g. with the realised mean of the
    batches seen (entropy patching makes the FLOPs data-dependent). A token LM's rows are
    ``seq_len`` tokens of ``bytes_per_token`` bytes (`token_bytes_per_token`; FL_BPE of §14.2).
    """
    record, n_p = record_and_patch_size(config, mean_patch_size)
    if config.model_type == "token_lm":
        n_bpe = token_bytes_per_token(config, bytes_per_token)
        context = config.data.seq_len * n_bpe
        return token_lm_flops_per_byte(
            record.stack, context_bytes=context, bytes_per_token=n_bpe, vocab=record.vocab_size
        )
    if n_p is None:
        return byte_lm_flops_per_byte(record, context_bytes=config.data.seq_len)
    if isinstance(record, MegaByteConfig):
        return megabyte_flops_per_byte(record, context_bytes=config.data.seq_len)
    return blt_flops_per_byte(record, context_bytes=config.data.seq_len, mean_patch_size=n_p)


def matmul_flops_per_byte(
    config: ml_collections.ConfigDict,
    *,
    mean_patch_size: float | None = None,
    dense_attention: bool = False,
    bytes_per_token: float | None = None,
) -> FlopBreakdown:
    """bltjax's own matmul FLOPs per byte of an experiment (benchmarks; see the module docstring)."""
    record, n_p = record_and_patch_size(config, mean_patch_size)
    if config.model_type == "token_lm":  # per token (the byte LM's stack over ids), over the bytes a token covers
        per_token = byte_lm_matmul_flops_per_byte(
            record, context_bytes=config.data.seq_len, dense_attention=dense_attention
        )
        return FlopBreakdown(global_=per_token.global_ / token_bytes_per_token(config, bytes_per_token))
    if n_p is None:
        return byte_lm_matmul_flops_per_byte(record, context_bytes=config.data.seq_len, dense_attention=dense_attention)
    if isinstance(record, MegaByteConfig):
        return megabyte_matmul_flops_per_byte(
            record, context_bytes=config.data.seq_len, dense_attention=dense_attention
        )
    return blt_matmul_flops_per_byte(
        record, context_bytes=config.data.seq_len, mean_patch_size=n_p, dense_attention=dense_attention
    )


# --- parameter counts (docs/architecture.md §14.4) -------------------------------------------------------------

# Components of `parameter_counts`: the FLOP components first, then what costs no FLOPs.
BLT_PARAMETER_COMPONENTS = (
    "global",
    "global_input_projection",  # W_in, only when k·h_E != h_G
    "encoder",
    "decoder",  # blocks and the final norm
    "encoder_cross",
    "decoder_cross",
    "encoder_patch_projection",  # E_C: pooled byte state -> k slots
    "decoder_patch_projection",  # D_C: global output -> k slots
    "byte_embedding",
    "hash_tables",
    "output_head",
)
BYTE_LM_PARAMETER_COMPONENTS = ("global", "byte_embedding", "output_head")
EMBEDDING_COMPONENTS = ("byte_embedding", "hash_tables", "output_head")


def block_parameters(stack: TransformerConfig) -> int:
    """One pre-norm block: Q, K, V, O (grouped-query aware), SwiGLU (3·dim·hidden), two norms."""
    q_width = stack.n_heads * stack.resolved_head_dim
    kv_width = stack.kv_heads * stack.resolved_head_dim
    return stack.dim * (2 * q_width + 2 * kv_width) + 3 * stack.dim * stack.hidden_dim + 2 * stack.dim


def _cross_layer_parameters(record: BLTConfig, stack: TransformerConfig) -> int:
    q_width, kv_width = _cross_widths(record, stack)
    return stack.dim * (2 * q_width + 2 * kv_width) + 2 * stack.dim  # Q, K, V, O; query and key norms


def parameter_counts(record: BLTConfig | ByteLMConfig | MegaByteConfig) -> dict[str, int]:
    """Parameters per component (docs/architecture.md §14.4), plus ``total`` and ``non_embedding``.

    Counted from the config alone (no allocation), exactly as the Flax modules create them:
    norms included, hash tables with their padded rows. For a byte LM the whole transformer and
    its final norm are ``global``, as in `FlopBreakdown`.
    """
    if isinstance(record, ByteLMConfig):
        stack = record.stack
        counts = {
            "global": stack.n_layers * block_parameters(stack) + stack.dim,
            "byte_embedding": record.vocab_size * stack.dim,
            "output_head": stack.dim * record.vocab_size,
        }
    elif isinstance(record, MegaByteConfig):  # no cross-attention; W_in and D always exist
        enc, lat, dec, s = record.encoder, record.latent, record.decoder, record.patch_size
        counts = {
            "global": lat.n_layers * block_parameters(lat),
            "global_input_projection": s * enc.dim * lat.dim,
            "encoder": enc.n_layers * block_parameters(enc),
            "decoder": dec.n_layers * block_parameters(dec) + dec.dim,
            "decoder_patch_projection": lat.dim * s * dec.dim,
            "byte_embedding": record.vocab_size * enc.dim,
            "hash_tables": record.num_hash_tables * record.hash_table_rows * enc.dim,
            "output_head": dec.dim * record.vocab_size,
        }
    else:
        enc, lat, dec, k = record.encoder, record.latent, record.decoder, record.cross_attn_k
        counts = {
            "global": lat.n_layers * block_parameters(lat),
            "global_input_projection": k * enc.dim * lat.dim if k * enc.dim != lat.dim else 0,
            "encoder": enc.n_layers * block_parameters(enc),
            "decoder": dec.n_layers * block_parameters(dec) + dec.dim,
            "encoder_cross": _cross_layers(enc.n_layers, record.cross_attn_all_layers_encoder)
            * _cross_layer_parameters(record, enc),
            "decoder_cross": _cross_layers(dec.n_layers, record.cross_attn_all_layers_decoder)
            * _cross_layer_parameters(record, dec),
            "encoder_patch_projection": enc.dim * k * enc.dim,
            "decoder_patch_projection": lat.dim * k * dec.dim,
            "byte_embedding": record.vocab_size * enc.dim,
            "hash_tables": record.num_hash_tables * record.hash_table_rows * enc.dim,
            "output_head": dec.dim * record.vocab_size,
        }
    counts["total"] = sum(counts.values())
    counts["non_embedding"] = counts["total"] - sum(counts.get(name, 0) for name in EMBEDDING_COMPONENTS)
    return counts


# --- counting the matmuls of a traced program -------------------------------------------------


def _dot_flops(eqn) -> int:
    """2 x (batch x lhs-free x contracted) x rhs-free = 2 x |lhs| x |rhs free dims|."""
    (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    shared = set(rhs_contract) | set(rhs_batch)
    return 2 * math.prod(lhs) * math.prod(d for i, d in enumerate(rhs) if i not in shared)


def _jaxpr_matmul_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "cond":
            total += max(_jaxpr_matmul_flops(branch.jaxpr) for branch in eqn.params["branches"])
        else:
            inner = sum(_jaxpr_matmul_flops(sub) for sub in jex_core.jaxprs_in_params(eqn.params))
            total += inner * (eqn.params["length"] if name == "scan" else 1)
    return total


def traced_matmul_flops(fun: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """FLOPs of every ``dot_general`` in ``fun(*args)``'s jaxpr (2 per multiply-add).

    Scans count their body ``length`` times, conds their costliest branch, while loops once.
    This is what the program asks the matmul units for, independent of XLA's cost model.
    """
    return _jaxpr_matmul_flops(jax.make_jaxpr(fun)(*args, **kwargs).jaxpr)


# --- XLA's own count ---------------------------------------------------------------------------


def compiled_flops(fun: Callable[..., Any], *args: Any) -> float:
    """FLOPs of ``fun(*args)`` as XLA's cost model counts the compiled program (nothing runs).

    Arguments may be `jax.ShapeDtypeStruct`s. Everything XLA executes counts: elementwise work,
    padding, masked attention blocks.
    """
    analysis = jax.jit(fun).lower(*args).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0]
    if not analysis or "flops" not in analysis:
        raise RuntimeError(f"compiled_flops: XLA's cost analysis has no 'flops' entry on this backend ({analysis!r})")
    return float(analysis["flops"])


def static_patch_lengths(seq_len: int, patch_size: int, max_patches: int, batch_size: int = 1):
    """Training-convention lengths [1, s, s, ..., r] (row sum N + 1) padded to ``max_patches``."""
    import numpy as np

    lengths = [1] + [patch_size] * (seq_len // patch_size)
    if seq_len + 1 - sum(lengths):
        lengths.append(seq_len + 1 - sum(lengths))
    if len(lengths) > max_patches:
        raise ValueError(
            f"config.data.max_patches: expected >= {len(lengths)} for static patches of {patch_size} bytes over "
            f"seq_len={seq_len}, got {max_patches}"
        )
    out = np.zeros((batch_size, max_patches), np.int32)
    out[:, : len(lengths)] = lengths
    return out


def xla_flops_per_byte(
    config: ml_collections.ConfigDict, *, patch_size: int | None = None, train: bool = False
) -> float:
    """XLA's FLOPs per byte for one row of ``config`` (forward, or forward + backward with ``train``).

    A BLT is fed static patches of ``patch_size`` bytes (default: the config's expected mean,
    rounded), so the realised mean is (N + 1) / (1 + ceil(N / s)); compare it with the analytic
    count at that mean. The training program differentiates the summed log-probabilities.
    """
    from bltjax.models.factory import build_model, example_inputs

    model = build_model(config)
    inputs = list(example_inputs(config, batch_size=1))
    if config.model_type == "blt":
        size = int(round(expected_patch_size(config))) if patch_size is None else int(patch_size)
        inputs[1] = static_patch_lengths(config.data.seq_len, size, config.data.max_patches)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))

    def forward(p, *a):
        return model.apply(p, *a)

    def loss(p, *a):
        return jnp.sum(jax.nn.log_softmax(model.apply(p, *a).astype(jnp.float32)))

    fun = jax.grad(loss) if train else forward
    return compiled_flops(fun, params, *inputs) / config.data.seq_len


def realised_static_patch_size(seq_len: int, patch_size: int) -> float:
    """Mean patch of static patching in the training convention: (N + 1) / (1 + ceil(N / s))."""
    return (seq_len + 1) / (1 + math.ceil(seq_len / patch_size))
