"""``python -m bltjax.entropy``: entropy sidecars (next-byte entropies, patch-start bits) next to every shard.

    python -m bltjax.entropy --data DATA --entropy-model ENTROPY_MODEL_DIR --threshold 1.335442066192627
    python -m bltjax.entropy --data DATA --entropy-model ENTROPY_MODEL_DIR --target-patch-size 4.5

This module is the command line only: the pass is `bltjax.data.entropy.run` (its docstring
explains chunking, buckets and resume) and the files it writes are `bltjax.data.sidecars`.
Several processes share the shards (``--coordinator`` or a launcher's environment,
`bltjax.runtime.distributed`). ``--checkpoint`` is the deprecated old name of ``--entropy-model``.
Exit status 0 when done, 2 for unusable data, model or command line.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags

from bltjax import checkpoints
from bltjax.data import entropy
from bltjax.data.sidecars import SidecarError
from bltjax.patching.calibrate import UNITS
from bltjax.runtime import cli, distributed
from bltjax.runtime.paths import resolve


def define_flags(values: flags.FlagValues) -> None:
    """Command-line flags (see `bltjax.runtime.cli` for the conventions every program shares)."""
    flags.DEFINE_string("data", None, "A folder written by python -m bltjax.prepare.", flag_values=values)
    flags.DEFINE_string("entropy_model", None, "The entropy model to read: a bltjax byte_lm model folder or a "
                        "Hugging Face BLT folder.", flag_values=values)  # fmt: skip
    flags.DEFINE_float("threshold", None, "Global entropy threshold (default: the model's).", flag_values=values)
    flags.DEFINE_float("target_patch_size", None, "Instead of --threshold: calibrate the threshold on the train split "
                       "for this mean patch size.", flag_values=values)  # fmt: skip
    flags.DEFINE_enum("unit", "tokens", list(UNITS), "What --target-patch-size counts.", flag_values=values)
    flags.DEFINE_integer("calibration_tokens", None, "Calibrate on at most this many train tokens.",
                         flag_values=values)  # fmt: skip
    flags.DEFINE_integer("batch_size", None, "Rows of --context tokens per step (default: the model's).",
                         flag_values=values)  # fmt: skip
    flags.DEFINE_integer("context", None, "Longest chunk in tokens (default: see bltjax.data.entropy).",
                         flag_values=values)  # fmt: skip
    flags.DEFINE_integer("overlap", None, "Tokens re-read by each further chunk (default: exact).", flag_values=values)
    distributed.define_flags(values)  # --coordinator / --num-processes / --process-id (or the environment)


def _main(command_line: cli.CommandLine) -> int:
    values = command_line.flags
    cli.require(values, "data", "entropy_model")
    if values.threshold is not None and values.target_patch_size is not None:
        raise cli.CommandLineError("--threshold and --target-patch-size exclude each other; give one")
    # flags, else the environment a launcher sets (bltjax/runtime/distributed.py), else one process
    distributed.initialize_from_flags(values)
    summary = entropy.run(
        resolve(values.data),
        values.entropy_model,  # as typed: the library tells a folder from a Hub id
        threshold=values.threshold,
        target_patch_size=values.target_patch_size,
        unit=values.unit,
        batch_size=values.batch_size,
        context=values.context,
        overlap=values.overlap,
        calibration_tokens=values.calibration_tokens,
    )
    if summary.calibration is not None:
        c = summary.calibration
        print(
            f"calibrated threshold {summary.threshold!r} for {c['target_patch_size']:g} {c['unit']} per patch: "
            f"mean {c['mean_tokens_per_patch']:.4f} tokens / {c['mean_bytes_per_patch']:.4f} bytes per patch "
            f"on {c['documents']} train documents"
        )
    if summary.tag is None:
        print("no threshold given and none stored in the model: wrote entropies only")
    else:
        print(f"threshold={summary.threshold!r} tag={summary.tag}")
    print(
        f"shards: {len(summary.computed)} entropies computed, {len(summary.restarted)} starts written, "
        f"{len(summary.skipped)} skipped; {summary.bytes_per_second:,.0f} bytes/s"
    )
    return 0


PROGRAM = cli.Program(
    "python -m bltjax.entropy",
    define_flags,
    _main,
    doc=__doc__,
    # OSError / ValueError: a data or model file that cannot be read names itself.
    errors=(SidecarError, checkpoints.CheckpointError, distributed.DistributedError, OSError, ValueError),
    error_status=2,
    aliases={"checkpoint": "entropy_model"},
)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bltjax.entropy``: the exit status (0 done, 2 unusable data, model or command line)."""
    return PROGRAM.run(argv)


if __name__ == "__main__":
    sys.exit(main())
