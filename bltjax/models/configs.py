"""Frozen, hashable model configurations (what the Linen modules are built from).

Experiment files use `ml_collections.ConfigDict` (see `bltjax/config.py`); the modules take
these small frozen dataclasses instead, because Linen module attributes must be hashable and
because a typed record documents every field in one place.
"""

from __future__ import annotations

import dataclasses
import math

from bltjax.tokenizer import VOCAB_SIZE

# Primes of the rolling-polynomial n-gram hash, indexed by hash function f (docs/architecture.md §4.1).
HASH_PRIMES = (
    1000000007,
    5915587277,
    1500450271,
    3267000013,
    5754853343,
    4093082899,
    9576890767,
    3628273133,
    2860486313,
    5463458053,
    3367900313,
)

INIT_STD_FACTORS = ("disabled", "current_depth", "global_depth", "dim_ratio")
POOLING_MODES = ("max", "avg", "min")
PATCH_QUERY_INITS = ("hidden", "embedding")
# Activation rematerialisation policies of `bltjax.models.remat`: "block" recomputes each block
# once its output gradient exists (activations kept: one [B, T, E] per block); "full" and
# "save_dots" are `nn.remat` with `jax.checkpoint_policies`.
REMAT_POLICIES = ("none", "block", "full", "save_dots")
# Attention implementations of `bltjax.kernels` (its ATTENTION_IMPLEMENTATIONS; this copy keeps
# config validation free of jax).
ATTENTION_IMPLEMENTATIONS = ("auto", "dense", "xla_blockwise", "splash", "cudnn")


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``value``."""
    return -(-value // multiple) * multiple


def swiglu_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float = 1.0) -> int:
    """The Llama SwiGLU width rule of docs/architecture.md §5.5 (768 -> 2048, 1024 -> 2816, 2048 -> 5632)."""
    hidden = int(ffn_dim_multiplier * int(2 * (4 * dim) / 3))
    return multiple_of * math.ceil(hidden / multiple_of)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """One stack of pre-norm Llama-style blocks (docs/architecture.md §5)."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # None: multi-head attention (n_kv_heads = n_heads)
    head_dim: int | None = None  # None: dim // n_heads
    ffn_hidden: int | None = None  # None: the SwiGLU rule of §5.5
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    window: int | None = None  # sliding window in keys incl. itself; None = full causal

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        return self.ffn_hidden or swiglu_hidden_dim(self.dim)


@dataclasses.dataclass(frozen=True)
class BLTConfig:
    """The whole Byte Latent Transformer (docs/architecture.md §6-§9).

    Defaults follow the official code and the released checkpoints; fields marked "paper"
    switch to the paper's description where the two disagree (docs/architecture.md §18).
    """

    encoder: TransformerConfig
    latent: TransformerConfig  # the global transformer over patches
    decoder: TransformerConfig
    vocab_size: int = VOCAB_SIZE
    cross_attn_k: int = 2
    cross_attn_heads: int | None = None  # None: the local stack's head count
    cross_attn_all_layers_encoder: bool = False
    cross_attn_all_layers_decoder: bool = True
    # Window in patches of the cross-attentions; 1 = own patch only (paper, released models).
    cross_attn_window_encoder: int = 1
    cross_attn_window_decoder: int = 1
    double_cross_attn_residual: bool = True  # code/checkpoints: 2*x + o; paper: x + o
    pooling: str = "max"
    patch_query_init: str = "hidden"  # code: pool encoder states; "embedding": paper
    # Hugging Face re-pools byte states at every encoder cross-attention layer, dropping the
    # previous result; the official code refines the same patch states (docs/architecture.md §18).
    repool_every_cross_attn_layer: bool = False
    hash_sizes: tuple[int, ...] = (3, 4, 5, 6, 7, 8)
    hash_functions: int = 1
    hash_vocab: int = 500002
    hash_normalize: bool = False  # paper: divide by (#sizes + 1); code: no normalisation
    document_mask: bool = True  # EOS ends attention segments (code); HF: no document masks
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    init_std_factor: str = "disabled"
    # How, not what: neither changes parameters or values.
    remat: str = "none"  # one of REMAT_POLICIES
    attention: str = "auto"  # one of ATTENTION_IMPLEMENTATIONS
    # The hash tables get round_up(hash_vocab, hash_rows_multiple) rows so that their row axis
    # divides the mesh; ids stay < hash_vocab, so the zero padding rows are never read.
    hash_rows_multiple: int = 1
    # Run each stack's identical blocks as one `lax.scan` over parameters stacked on a leading
    # "layers" axis (`bltjax.models.scan`): compile time stops growing with depth. Changes the
    # parameter layout, not the values (`bltjax.models.layout` converts between the two).
    scan_layers: bool = False

    @property
    def num_hash_tables(self) -> int:
        return self.hash_functions * len(self.hash_sizes)

    @property
    def hash_table_rows(self) -> int:
        return round_up(self.hash_vocab, self.hash_rows_multiple)


@dataclasses.dataclass(frozen=True)
class ByteLMConfig:
    """A plain causal byte transformer: the entropy model (docs/architecture.md §2) and the byte baseline."""

    stack: TransformerConfig
    vocab_size: int = VOCAB_SIZE
    document_mask: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    init_std_factor: str = "disabled"
    remat: str = "none"  # one of REMAT_POLICIES
    attention: str = "auto"  # one of ATTENTION_IMPLEMENTATIONS
    scan_layers: bool = False  # see BLTConfig.scan_layers


@dataclasses.dataclass(frozen=True)
class MegaByteConfig:
    """The MegaByte baseline (docs/architecture.md §3.9): fixed patches of ``patch_size`` bytes behind
    an s - 1 BOE prefix, concatenation pooling, and the global output added to the decoder's bytes.

    No hash n-gram embeddings by default (MegaByte has none); ``hash_sizes`` adds BLT's.
    """

    encoder: TransformerConfig
    latent: TransformerConfig
    decoder: TransformerConfig
    patch_size: int = 4
    vocab_size: int = VOCAB_SIZE
    hash_sizes: tuple[int, ...] = ()
    hash_functions: int = 1
    hash_vocab: int = 500002
    hash_normalize: bool = False
    document_mask: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    init_std_factor: str = "disabled"
    remat: str = "none"
    attention: str = "auto"
    hash_rows_multiple: int = 1
    scan_layers: bool = False

    @property
    def num_hash_tables(self) -> int:
        return self.hash_functions * len(self.hash_sizes)

    @property
    def hash_table_rows(self) -> int:
        return round_up(self.hash_vocab, self.hash_rows_multiple)
