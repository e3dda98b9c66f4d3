r"""Export a bltjax BLT as a Hugging Face `transformers` folder (config, weights, tokenizer, generation config).

  python -m bltjax.export --model runs/quickstart/blt --out exports/blt [--dtype bf16|f32] \
      [--shard-size 5GB] [--entropy-model runs/quickstart/entropy_model] [--step N] [--overwrite]

``--model`` is a training workdir (its newest complete checkpoint, or ``--step``), a folder written
by `bltjax.checkpoints.save_model`, or a Hugging Face BLT folder or Hub id. ``--out`` then loads
with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``. Weights are
float32 (``f32``, exact) or bfloat16 (``bf16``), in one ``model.safetensors`` or, above
``--shard-size``, in shards with ``model.safetensors.index.json``. An entropy-patched BLT takes
its entropy model along as transformers' patcher (``--entropy-model``, or the one that provably
goes with the run). The folder appears at once, complete (`bltjax.convert.export`).

Exit status: 0 written; 1 for a source or flag that cannot be exported (the message names it);
2 for a bad command line.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags

from bltjax.config import ConfigError
from bltjax.convert.export import ExportError, export_to_hf
from bltjax.convert.hf_weights import parse_size
from bltjax.inference.restore import RestoreError
from bltjax.runtime import cli

DTYPE_NAMES = {"f32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}


def define_flags(values: flags.FlagValues) -> None:
    """Command-line flags (see `bltjax.runtime.cli` for the conventions every program shares)."""
    flags.DEFINE_string("model", None, "Model to export: a training workdir, a save_model folder, or a Hugging Face "
                        "BLT folder or Hub id.", flag_values=values)  # fmt: skip
    flags.DEFINE_string("out", None, "Folder to write (a transformers BLT folder).", flag_values=values)
    flags.DEFINE_enum("dtype", "f32", sorted(DTYPE_NAMES), "Weights' dtype: f32 (exact) or bf16.", flag_values=values)
    flags.DEFINE_string("shard_size", "5GB", "Largest weights file; above it, shards with an index (e.g. 500MB).",
                        flag_values=values)  # fmt: skip
    flags.DEFINE_string("entropy_model", None, "Entropy model to include as the patcher (entropy-patched BLTs; "
                        "default: the one that provably goes with the run).", flag_values=values)  # fmt: skip
    flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: the latest complete one).",
                         flag_values=values)  # fmt: skip
    flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.", flag_values=values)


def _main(command_line: cli.CommandLine) -> int:
    values = command_line.flags
    cli.require(values, "model", "out")
    try:
        max_shard_bytes = parse_size(values.shard_size)
    except ValueError as err:
        raise cli.CommandLineError(f"--shard-size: {err}") from None
    result = export_to_hf(
        values.model,  # as typed: a Hub id must not become a path under the current directory
        values.out,
        dtype=DTYPE_NAMES[values.dtype],
        max_shard_bytes=max_shard_bytes,
        entropy_model=values.entropy_model,
        step=values.step,
        overwrite=values.overwrite,
    )
    print(f"exported {result.source} -> {result.out}")
    if result.entropy_model:
        print(f"patcher: the entropy model {result.entropy_model}")
    print(f"files: {', '.join(result.files)}", flush=True)
    return 0


PROGRAM = cli.Program(
    "python -m bltjax.export",
    define_flags,
    _main,
    doc=__doc__,
    errors=(ExportError, RestoreError, ConfigError),
)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bltjax.export``; ``argv`` without the program name (default: the command line)."""
    return PROGRAM.run(argv)


if __name__ == "__main__":
    sys.exit(main())
