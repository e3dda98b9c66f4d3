r"""Bits-per-byte of a trained model over a whole data split: every byte counted exactly once.

  python -m bltjax.eval --workdir runs/tiny --data data/bundled [--step 500] [--split validation] \
      [--batch-size 16] [--patching.threshold 1.3]
  python -m bltjax.eval --model MODEL_DIR --data data/bundled      # a save_model folder / HF import

Prints a markdown table and writes the same numbers as JSON: ``WORKDIR/eval/<split>-step<N>.json``
for a workdir, ``MODEL_DIR/eval/<split>.json`` for a model folder, or ``--out FILE``. The
conventions (windows, patching, patch columns, batches) are those of `bltjax.inference.evaluate`,
which this command runs. ``--patching.*`` overrides the saved config (e.g. another threshold,
whose sidecars must exist). Exit status 1 with a message naming the flag, field or file for
bad input.
"""

from __future__ import annotations

import sys

import jax
from absl import app, flags, logging

from bltjax.config import ConfigError
from bltjax.data import pipeline
from bltjax.inference.evaluate import EvalError, evaluate_and_write, format_table
from bltjax.inference.restore import RestoreError
from bltjax.runtime import compile_cache, distributed
from bltjax.runtime.cli import normalise_argv
from bltjax.training import sharding

PATCHING_FLAGS = {
    "mode": "string",
    "threshold": "float",
    "threshold_add": "float",
    "monotonicity": "bool",
    "patch_size": "float",
    "max_patch_length": "integer",
}


def define_flags() -> None:
    """Command-line flags, defined only when this module is the program."""
    flags.DEFINE_string("workdir", None, "Training run directory (its checkpoints/ are read).")
    flags.DEFINE_string("model", None, "Alternatively: an exported model folder or a Hugging Face BLT folder.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest complete one).")
    flags.DEFINE_string("data", None, "Data folder written by python -m bltjax.prepare.")
    flags.DEFINE_string("split", "validation", "Split to evaluate.")
    flags.DEFINE_integer("batch_size", None, "Rows per batch (default: the config's data.batch_size).")
    flags.DEFINE_string("sidecar_tag", None, "Entropy sidecar tag (default: the one of the threshold).")
    flags.DEFINE_string("out", None, "JSON output path (default: DIR/eval/<split>[-step<N>].json).")
    distributed.define_flags()  # --coordinator / --num-processes / --process-id (or the environment)
    for key, kind in PATCHING_FLAGS.items():
        getattr(flags, f"DEFINE_{kind}")(f"patching.{key}", None, f"Override config.patching.{key}.")


def main(argv: list[str]) -> None:
    del argv
    FLAGS = flags.FLAGS
    if not FLAGS.data or (FLAGS.workdir is None) == (FLAGS.model is None):
        raise app.UsageError("--data and exactly one of --workdir / --model are required")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
    compile_cache.enable()
    overrides = {key: FLAGS[f"patching.{key}"].value for key in PATCHING_FLAGS if FLAGS[f"patching.{key}"].present}
    try:
        distributed.initialize_from_flags()  # joins the other processes, if any, before any device work
        result, path = evaluate_and_write(
            workdir=FLAGS.workdir,
            model_dir=FLAGS.model,
            data_dir=FLAGS.data,
            step=FLAGS.step,
            split=FLAGS.split,
            batch_size=FLAGS.batch_size,
            patching_overrides=overrides,
            sidecar_tag=FLAGS.sidecar_tag,
            out=FLAGS.out,
        )
    except (EvalError, RestoreError, ConfigError, pipeline.DataError, sharding.MeshError,
            distributed.DistributedError) as err:  # fmt: skip
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    if jax.process_index() == 0:
        print(format_table(result))
        print(f"\nwritten: {path}", flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main, argv=normalise_argv(sys.argv))
