"""Prints the FLOPs per byte and the parameters of one experiment, component by component.

  python -m bltjax.flops --config experiments/blt_1b.py [--patch-size 6] \
      [--bytes-per-token 4.4 --vocab 128256]

Columns: the paper's analytic forward FLOPs per byte (docs/architecture.md §14, the count MFU
uses), its share, training FLOPs per byte (3 x forward), bltjax's own matmul count and the
parameters. With ``--bytes-per-token`` a second table compares the config with a token-level
Llama and a byte-level transformer of the same shape. For a token LM config (experiments/token_lm.py)
``--bytes-per-token`` is its own tokenizer's rate (default: ``config.data.bytes_per_token``, else the
manifest of ``config.data.path``). The counts live in `bltjax.models.flops`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import ml_collections
from absl import flags

from bltjax.config import ConfigError
from bltjax.data import token_pipeline
from bltjax.data.errors import DataError
from bltjax.models.configs import ByteLMConfig
from bltjax.models.flops import (
    TRAIN_MULTIPLIER,
    analytic_flops_per_byte,
    byte_lm_flops_per_byte,
    matmul_flops_per_byte,
    parameter_counts,
    record_and_patch_size,
    token_bytes_per_token,
    token_lm_flops_per_byte,
)
from bltjax.runtime import cli

_ROWS = (
    # table row, FlopBreakdown field, parameter components
    ("global (latent)", "global_", ("global", "global_input_projection")),
    ("encoder", "encoder", ("encoder",)),
    ("decoder + head", "decoder", ("decoder", "output_head")),
    ("encoder cross-attention", "encoder_cross", ("encoder_cross", "encoder_patch_projection")),
    ("decoder cross-attention", "decoder_cross", ("decoder_cross", "decoder_patch_projection")),
    ("byte embedding", None, ("byte_embedding",)),
    ("hash n-gram tables", None, ("hash_tables",)),
)
_MEGABYTE_ROWS = (
    ("global (latent)", "global_", ("global",)),
    ("encoder", "encoder", ("encoder",)),
    ("decoder + head", "decoder", ("decoder", "output_head")),
    ("concatenation projection W_in", "encoder_cross", ("global_input_projection",)),
    ("global-to-byte projection D", "decoder_cross", ("decoder_patch_projection",)),
    ("byte embedding", None, ("byte_embedding",)),
    ("hash n-gram tables", None, ("hash_tables",)),
)
_BYTE_LM_ROWS = (
    ("transformer + head", "global_", ("global", "output_head")),
    ("byte embedding", None, ("byte_embedding",)),
)
_TOKEN_LM_ROWS = (  # the byte LM's parameter tree over token ids: its "byte_embedding" embeds tokens
    ("transformer + head", "global_", ("global", "output_head")),
    ("token embedding", None, ("byte_embedding",)),
)


def format_breakdown(
    config: ml_collections.ConfigDict,
    *,
    mean_patch_size: float | None = None,
    bytes_per_token: float | None = None,
    vocab: int = 32000,
) -> str:
    """The markdown table `python -m bltjax.flops` prints: FLOPs per byte and parameters per component."""
    record, n_p = record_and_patch_size(config, mean_patch_size)
    token_lm = config.model_type == "token_lm"
    if token_lm:  # --bytes-per-token is the token LM's own rate here, not a second model's
        config = token_pipeline.with_bytes_per_token(config)
        n_bpe = token_bytes_per_token(config, bytes_per_token)
        config.data.bytes_per_token, bytes_per_token = n_bpe, None
    analytic = analytic_flops_per_byte(config, mean_patch_size=n_p)
    matmul = matmul_flops_per_byte(config, mean_patch_size=n_p)
    params = parameter_counts(record)
    context = config.data.seq_len
    rows = _ROWS if n_p is not None else _BYTE_LM_ROWS
    if token_lm:
        rows = _TOKEN_LM_ROWS
        head = (f"token LM, context {context} tokens of {n_bpe:g} bytes (config.data.bytes_per_token or "
                f"--bytes-per-token), vocabulary {record.vocab_size}: per-token FLOPs / bytes per token")  # fmt: skip
    elif n_p is None:
        head = f"byte LM, context {context} bytes (every byte is a position)"
    elif config.model_type == "megabyte":
        head = f"MegaByte, context {context} bytes, fixed patches of {n_p:g} bytes (config.model.patch_size)"
        rows = _MEGABYTE_ROWS
    else:
        source = "--patch-size" if mean_patch_size is not None else f"config.patching ({config.patching.mode})"
        head = f"BLT, context {context} bytes, mean patch size {n_p:g} bytes (from {source})"
    total = analytic.total_forward
    lines = [
        head,
        "",
        "| component | forward FLOPs/byte (paper) | share | train FLOPs/byte | bltjax matmul fwd/byte | parameters |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, field, components in rows:
        count = sum(params.get(c, 0) for c in components)
        if field is None:
            lines.append(f"| {label} | 0 | 0.0% | 0 | 0 | {count:,} |")
            continue
        fwd, real = getattr(analytic, field), getattr(matmul, field)
        share = 100.0 * fwd / total
        lines.append(f"| {label} | {fwd:.3e} | {share:.1f}% | {TRAIN_MULTIPLIER * fwd:.3e} | {real:.3e} | {count:,} |")
    lines.append(
        f"| **total** | **{total:.3e}** | 100% | **{analytic.train:.3e}** | {matmul.total_forward:.3e} | "
        f"{params['total']:,} |"
    )
    lines.append("")
    lines.append(f"non-embedding parameters: {params['non_embedding']:,}")
    if bytes_per_token is not None:
        stack = record.latent if n_p is not None else record.stack
        token = token_lm_flops_per_byte(stack, context_bytes=context, bytes_per_token=bytes_per_token, vocab=vocab)
        byte = byte_lm_flops_per_byte(ByteLMConfig(stack=stack), context_bytes=context)
        which = "the global model" if n_p is not None else "the byte LM's stack"
        lines += [
            "",
            f"| same budget comparison ({which}: {stack.n_layers} x {stack.dim}) | forward FLOPs/byte "
            "| train FLOPs/byte |",
            "|---|---:|---:|",
            f"| this config | {total:.3e} | {analytic.train:.3e} |",
            f"| token-level Llama, {bytes_per_token:g} bytes/token, vocab {vocab} | {token.total_forward:.3e} | "
            f"{token.train:.3e} |",
            f"| byte-level (every byte through it) | {byte.total_forward:.3e} | {byte.train:.3e} |",
        ]
    return "\n".join(lines)


def define_flags(values: flags.FlagValues) -> None:
    """Command-line flags (see `bltjax.runtime.cli` for the conventions every program shares)."""
    cli.define_config_file("config", "Experiment config file (path.py[:variant]).", values)
    flags.DEFINE_float("patch_size", None, "Mean patch size n_p (default: the config's expectation).",
                       flag_values=values)  # fmt: skip
    flags.DEFINE_float("bytes_per_token", None, "Also print a token-level Llama of the same shape at this n_bpe.",
                       flag_values=values)  # fmt: skip
    flags.DEFINE_integer("vocab", 32000, "Vocabulary of that token-level Llama (Llama 2: 32000, Llama 3: 128256).",
                         flag_values=values)  # fmt: skip


def _main(command_line: cli.CommandLine) -> int:
    values = command_line.flags
    cli.require(values, "config")
    table = format_breakdown(
        values.config, mean_patch_size=values.patch_size, bytes_per_token=values.bytes_per_token, vocab=values.vocab
    )
    print(table)
    return 0


# ValueError: the counts name the field they cannot use (ConfigError is one).
PROGRAM = cli.Program(
    "python -m bltjax.flops", define_flags, _main, doc=__doc__, errors=(ConfigError, DataError, ValueError)
)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bltjax.flops``; ``argv`` without the program name (default: the command line)."""
    return PROGRAM.run(argv)


if __name__ == "__main__":
    sys.exit(main())
