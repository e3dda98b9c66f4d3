r"""Generate text from a trained BLT (or byte-level LM) with KV caches and incremental patching.

  python -m bltjax.generate --workdir runs/quickstart/blt --prompt "The Jargon File" [--prompt ...] \
      [--max-bytes 256] [--temperature 0] [--top-p 1] [--seed 0] [--step N] \
      [--entropy-model runs/quickstart/entropy_model/export]

``--workdir`` is a training run (its newest complete checkpoint, or ``--step``), a folder
written by `bltjax.checkpoints.save_model` or a Hugging Face BLT folder, loaded with
`bltjax.inference.restore.load_for_inference` onto one device. The patching rule is the one saved with
the checkpoint (``config.patching``). An entropy-patched BLT needs its entropy model
(``--entropy-model``, a `save_model` folder or a Hugging Face BLT folder); without the flag, a
Hugging Face folder uses its own patcher, and for a training run the quickstart's layout is
tried: the folder ``WORKDIR/../entropy_model/export`` is used when its fingerprint is the one recorded in the
entropy sidecars of the run's data (``config.data.path``/sidecars.json), i.e. when it is
provably the model the BLT was trained with.

Prompts of different lengths are generated together in one batch (`bltjax.inference.generation`):
greedy at temperature 0, otherwise sampling with nucleus ``--top-p`` from ``--seed``. Each
result is printed with its patches (count, mean size) and global-model steps.
"""

from __future__ import annotations

import sys

from bltjax.config import ConfigError
from bltjax.inference.generation.folders import GenerateError, generate_from_folder
from bltjax.inference.restore import RestoreError


def define_flags() -> None:
    """Command-line flags, defined only when this module is the program."""
    from absl import flags

    flags.DEFINE_string("workdir", None, "Training run directory, or a folder written by save_model.")
    flags.DEFINE_multi_string("prompt", [], "Text to continue; repeat the flag for several prompts (one batch).")
    flags.DEFINE_integer("max_bytes", 256, "Bytes to generate per prompt at most (stops earlier at EOS).")
    flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: keep the most likely bytes up to this probability mass.")
    flags.DEFINE_integer("seed", 0, "Seed of the sampling key (generation is deterministic given it).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest complete one).")
    flags.DEFINE_string("entropy_model", None, "Entropy model folder (entropy-patched BLTs).")


def main(argv: list[str]) -> None:
    from absl import app, flags, logging

    del argv
    FLAGS = flags.FLAGS
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
    from bltjax.runtime import compile_cache

    compile_cache.enable()
    try:
        generate_from_folder(
            workdir=FLAGS.workdir,
            prompts=FLAGS.prompt,
            max_bytes=FLAGS.max_bytes,
            temperature=FLAGS.temperature,
            top_p=FLAGS.top_p,
            seed=FLAGS.seed,
            step=FLAGS.step,
            entropy_model=FLAGS.entropy_model,
        )
    except (GenerateError, RestoreError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    from absl import app

    define_flags()
    from bltjax.runtime.cli import normalise_argv

    app.run(main, argv=normalise_argv(sys.argv))
