r"""Bits-per-byte of a trained model over a whole data split: every byte counted exactly once.

  python -m bltjax.eval --model runs/tiny --data data/bundled [--step 500] [--split validation] \
      [--batch-size 16] [--patching.threshold 1.3]
  python -m bltjax.eval --model MODEL_DIR --data data/bundled      # a save_model folder / HF import
  python -m bltjax.eval --model runs/tiny --data data/bundled --watch [--watch-timeout 3600]

Prints a markdown table and writes the same numbers as JSON: ``WORKDIR/eval/<split>-step<N>.json``
for a workdir, ``MODEL_DIR/eval/<split>.json`` for a model folder, or ``--out FILE``. The
conventions (windows, patching, patch columns, batches) are those of `bltjax.inference.evaluate`,
which this command runs. ``--patching.*`` overrides the saved config (e.g. another threshold,
whose sidecars must exist). ``--model`` is a training workdir, a `save_model` folder or a
Hugging Face BLT folder (``--workdir`` is its deprecated old name). ``--watch`` evaluates each new
complete checkpoint of a running workdir until its final step, resuming after a restart
(`bltjax.inference.watch`; record ``WORKDIR/eval/watch-<split>.json``). Exit status 1 with a message
naming the field or file for bad input, 2 for a bad command line.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import jax
from absl import flags

from bltjax.config import ConfigError
from bltjax.data import pipeline
from bltjax.inference import watch
from bltjax.inference.evaluate import EvalError, evaluate_and_write, format_table, split_label
from bltjax.inference.restore import RestoreError
from bltjax.runtime import cli, compile_cache, distributed
from bltjax.runtime.paths import resolve
from bltjax.training import sharding

PATCHING_FLAGS = {
    "mode": "string",
    "threshold": "float",
    "threshold_add": "float",
    "monotonicity": "bool",
    "patch_size": "float",
    "max_patch_length": "integer",
}


def define_flags(values: flags.FlagValues) -> None:
    """Command-line flags (see `bltjax.runtime.cli` for the conventions every program shares)."""
    flags.DEFINE_string("model", None, "Model to read: a training workdir (its checkpoints/), a save_model folder or "
                        "a Hugging Face BLT folder.", flag_values=values)  # fmt: skip
    flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: the latest complete one).",
                         flag_values=values)  # fmt: skip
    flags.DEFINE_string("data", None, "Data folder written by python -m bltjax.prepare.", flag_values=values)
    flags.DEFINE_string("split", "validation", "Split to evaluate.", flag_values=values)
    flags.DEFINE_integer("batch_size", None, "Rows per batch (default: the config's data.batch_size).",
                         flag_values=values)  # fmt: skip
    flags.DEFINE_string("sidecar_tag", None, "Entropy sidecar tag (default: the one of the threshold).",
                        flag_values=values)  # fmt: skip
    flags.DEFINE_string("out", None, "JSON output path (default: DIR/eval/<split>[-step<N>].json).", flag_values=values)
    flags.DEFINE_bool("watch", False, "Evaluate each new complete checkpoint of a running workdir until its final "
                      "step (resumes after a restart).", flag_values=values)  # fmt: skip
    flags.DEFINE_float("watch_timeout", 3600.0, "With --watch: stop after this many seconds without a new "
                       "checkpoint.", flag_values=values)  # fmt: skip
    flags.DEFINE_float("poll_seconds", 30.0, "With --watch: seconds between looks at the checkpoints folder.",
                       flag_values=values)  # fmt: skip
    distributed.define_flags(values)  # --coordinator / --num-processes / --process-id (or the environment)
    for key, kind in PATCHING_FLAGS.items():
        getattr(flags, f"DEFINE_{kind}")(f"patching.{key}", None, f"Override config.patching.{key}.",
                                         flag_values=values)  # fmt: skip


def _main(command_line: cli.CommandLine) -> int:
    values = command_line.flags
    cli.require(values, "model", "data")
    compile_cache.enable()
    overrides = {key: values[f"patching.{key}"].value for key in PATCHING_FLAGS if values[f"patching.{key}"].present}
    if values.watch and (values.step is not None or values.out):
        raise EvalError("--watch: evaluates every checkpoint into WORKDIR/eval/; leave out --step and --out")
    distributed.initialize_from_flags(values)  # joins the other processes, if any, before any device work

    def evaluate_step(step: int | None) -> None:
        result, path = evaluate_and_write(
            # Any model, as typed: load_for_inference tells a workdir, a model folder and a Hub id apart.
            workdir=values.model,
            model_dir=None,
            data_dir=resolve(values.data),
            step=step,
            split=values.split,
            batch_size=values.batch_size,
            patching_overrides=overrides,
            sidecar_tag=values.sidecar_tag,
            out=resolve(values.out) if values.out else None,
        )
        if jax.process_index() == 0:
            print(format_table(result))
            print(f"\nwritten: {path}", flush=True)

    if not values.watch:
        evaluate_step(values.step)
        return 0
    label = split_label(values.split, overrides) + (f"-{values.sidecar_tag}" if values.sidecar_tag else "")
    watched = watch.watch_checkpoints(
        values.model, evaluate_step, record=resolve(values.model) / "eval" / f"watch-{label}.json",
        about={"split": values.split, "patching_overrides": overrides, "sidecar_tag": values.sidecar_tag},
        timeout_s=values.watch_timeout, poll_s=values.poll_seconds, log=lambda line: print(line, flush=True),
    )  # fmt: skip
    print(f"watch: evaluated steps {watched.evaluated}; stopped at {watched.stopped}", flush=True)
    return 0


PROGRAM = cli.Program(
    "python -m bltjax.eval",
    define_flags,
    _main,
    doc=__doc__,
    errors=(
        EvalError,
        RestoreError,
        ConfigError,
        pipeline.DataError,
        sharding.MeshError,
        distributed.DistributedError,
        watch.WatchError,
    ),  # fmt: skip
    aliases={"workdir": "model"},
)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bltjax.eval``; ``argv`` without the program name (default: the command line)."""
    return PROGRAM.run(argv)


if __name__ == "__main__":
    sys.exit(main())
