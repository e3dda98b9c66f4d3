r"""Generate text from a trained BLT (or byte-level LM) with KV caches and incremental patching.

  python -m bltjax.generate --model runs/quickstart/blt --prompt "The Jargon File" [--prompt ...] \
      [--max-bytes 256] [--temperature 0] [--top-p 1] [--seed 0] [--step N] \
      [--entropy-model runs/quickstart/entropy_model/export]

``--model`` (formerly ``--workdir``, still accepted for a release) is a training run (its newest
complete checkpoint, or ``--step``), a folder written by `bltjax.checkpoints.save_model` or a
Hugging Face BLT folder, loaded with `bltjax.inference.restore.load_for_inference` onto one
device. The patching rule is the one saved with the checkpoint (``config.patching``). An
entropy-patched BLT needs its entropy model (``--entropy-model``, a `save_model` folder or a
Hugging Face BLT folder); without the flag, a Hugging Face folder uses its own patcher, and for a
training run the quickstart's layout is tried: the folder ``MODEL/../entropy_model/export`` is
used when its fingerprint is the one recorded in the entropy sidecars of the run's data
(``config.data.path``/sidecars.json), i.e. when it is provably the model the BLT was trained with.
Exit status 1 with a message naming the flag or folder, 2 for a bad command line.

Prompts of different lengths are generated together in one batch (`bltjax.inference.generation`):
greedy at temperature 0, otherwise sampling with nucleus ``--top-p`` from ``--seed``. Each
result is printed with its patches (count, mean size) and global-model steps.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags

from bltjax.config import ConfigError
from bltjax.inference.generation.folders import GenerateError, generate_from_folder
from bltjax.inference.restore import RestoreError
from bltjax.runtime import cli


def define_flags(values: flags.FlagValues) -> None:
    """Command-line flags (see `bltjax.runtime.cli` for the conventions every program shares)."""
    flags.DEFINE_string("model", None, "Model to read: a training workdir, a save_model folder or a Hugging Face BLT "
                        "folder.", flag_values=values)  # fmt: skip
    flags.DEFINE_multi_string("prompt", [], "Text to continue; repeat the flag for several prompts (one batch).",
                              flag_values=values)  # fmt: skip
    flags.DEFINE_integer("max_bytes", 256, "Bytes to generate per prompt at most (stops earlier at EOS).",
                         flag_values=values)  # fmt: skip
    flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.", flag_values=values)
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: keep the most likely bytes up to this probability mass.",
                       flag_values=values)  # fmt: skip
    flags.DEFINE_integer("seed", 0, "Seed of the sampling key (generation is deterministic given it).",
                         flag_values=values)  # fmt: skip
    flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: the latest complete one).",
                         flag_values=values)  # fmt: skip
    flags.DEFINE_string("entropy_model", None, "Entropy model to read (entropy-patched BLTs).", flag_values=values)


def _main(command_line: cli.CommandLine) -> int:
    from bltjax.runtime import compile_cache

    values = command_line.flags
    cli.require(values, "model")
    compile_cache.enable()
    generate_from_folder(
        # Models are passed as typed: the library tells a folder from a Hub id (facebook/blt-1b).
        workdir=values.model,
        prompts=values.prompt,
        max_bytes=values.max_bytes,
        temperature=values.temperature,
        top_p=values.top_p,
        seed=values.seed,
        step=values.step,
        entropy_model=values.entropy_model,
    )
    return 0


PROGRAM = cli.Program(
    "python -m bltjax.generate",
    define_flags,
    _main,
    doc=__doc__,
    errors=(GenerateError, RestoreError, ConfigError),
    aliases={"workdir": "model"},
)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bltjax.generate``; ``argv`` without the program name (default: the command line)."""
    return PROGRAM.run(argv)


if __name__ == "__main__":
    sys.exit(main())
