"""``python -m bltjax.entropy``: entropy sidecars (next-byte entropies, patch-start bits) next to every shard.

    python -m bltjax.entropy --data DATA --entropy-model ENTROPY_MODEL_DIR --threshold 1.335442066192627
    python -m bltjax.entropy --data DATA --entropy-model ENTROPY_MODEL_DIR --target-patch-size 4.5
    python -m bltjax.entropy --data DATA --entropy-model M --rule monotonic --threshold 0.4
    python -m bltjax.entropy --data DATA --entropy-model M --rule combined --threshold 1.3 --threshold-add 0.1
    python -m bltjax.entropy --data DATA --entropy-model M --rule monotonic --target-patch-size 4.5
    python -m bltjax.entropy --data DATA --entropy-model M --rule topk --patch-size 4.5 [--reset-on-newline]

Each run adds the start bits of one entropy patching rule (``--rule``, default global) to those
already listed; ``--reset-on-newline`` restarts the entropy model's context after every newline
(docs/architecture.md §2.5), which recomputes the entropies of a folder computed without it.

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
from bltjax.data.sidecar_rules import ENTROPY_KINDS
from bltjax.data.sidecars import SidecarError
from bltjax.patching import PatchingError, PatchingRule
from bltjax.patching.calibrate import UNITS
from bltjax.runtime import cli, distributed
from bltjax.runtime.paths import resolve


def define_flags(values: flags.FlagValues) -> None:
    """Command-line flags (see `bltjax.runtime.cli` for the conventions every program shares)."""
    flags.DEFINE_string("data", None, "A folder written by python -m bltjax.prepare.", flag_values=values)
    flags.DEFINE_string("entropy_model", None, "The entropy model to read: a bltjax byte_lm model folder or a "
                        "Hugging Face BLT folder.", flag_values=values)  # fmt: skip
    flags.DEFINE_enum("rule", "global", list(ENTROPY_KINDS), "The entropy patching rule whose start bits to add "
                      "(docs/architecture.md §3.4-§3.7).", flag_values=values)  # fmt: skip
    flags.DEFINE_float("threshold", None, "Entropy threshold θ of the global, monotonic or combined rule (global "
                       "default: the model's).", flag_values=values)  # fmt: skip
    flags.DEFINE_float("threshold_add", None, "--rule combined: θ_add, the bound on H_{p-1} - H_{p-2}.",
                       flag_values=values)  # fmt: skip
    flags.DEFINE_bool("reference_quirks", False, "--rule combined: no start at position 3, as the official code.",
                      flag_values=values)  # fmt: skip
    flags.DEFINE_float("patch_size", None, "--rule topk: floor(N / s) patches per document.", flag_values=values)
    flags.DEFINE_bool("reset_on_newline", False, "Restart the entropy context after every newline byte "
                      "(config.patching.entropy_reset_on_newline).", flag_values=values)  # fmt: skip
    flags.DEFINE_float("target_patch_size", None, "Instead of --threshold: calibrate the threshold (--rule global or "
                       "monotonic) on the train split for this mean patch size.", flag_values=values)  # fmt: skip
    flags.DEFINE_enum("unit", "tokens", list(UNITS), "What --target-patch-size counts.", flag_values=values)
    flags.DEFINE_integer("calibration_tokens", None, "Calibrate on at most this many train tokens.",
                         flag_values=values)  # fmt: skip
    flags.DEFINE_integer("batch_size", None, "Rows of --context tokens per step (default: the model's).",
                         flag_values=values)  # fmt: skip
    flags.DEFINE_integer("context", None, "Longest chunk in tokens (default: see bltjax.data.entropy).",
                         flag_values=values)  # fmt: skip
    flags.DEFINE_integer("overlap", None, "Tokens re-read by each further chunk (default: exact).", flag_values=values)
    distributed.define_flags(values)  # --coordinator / --num-processes / --process-id (or the environment)


def _rule(values: flags.FlagValues) -> PatchingRule | None:
    """The rule of --rule and its numbers; None for the global rule (--threshold / --target-patch-size)."""
    kind = values.rule
    used = {"threshold_add": kind == "combined", "reference_quirks": kind == "combined", "patch_size": kind == "topk"}
    for name, allowed in used.items():
        if not allowed and values[name].present:
            raise cli.CommandLineError(f"--{name.replace('_', '-')} does not go with --rule {kind}")
    if values.target_patch_size is not None and kind not in ("global", "monotonic"):
        raise cli.CommandLineError(f"--target-patch-size calibrates the global and monotonic rules, not --rule {kind}")
    if kind == "global" or values.target_patch_size is not None:
        return None
    if kind == "topk":
        cli.require(values, "patch_size")
        fields = {"patch_size": values.patch_size}
    else:
        cli.require(values, "threshold")
        fields = {"threshold": values.threshold, "monotonicity": kind == "monotonic"}
        if kind == "combined":
            cli.require(values, "threshold_add")
            fields.update(threshold_add=values.threshold_add, reference_quirks=values.reference_quirks)
    try:
        return PatchingRule(mode="entropy", **fields)
    except PatchingError as error:
        raise cli.CommandLineError(str(error)) from error


def _main(command_line: cli.CommandLine) -> int:
    values = command_line.flags
    cli.require(values, "data", "entropy_model")
    if values.threshold is not None and values.target_patch_size is not None:
        raise cli.CommandLineError("--threshold and --target-patch-size exclude each other; give one")
    rule = _rule(values)
    threshold = values.threshold if rule is None else None
    # flags, else the environment a launcher sets (bltjax/runtime/distributed.py), else one process
    distributed.initialize_from_flags(values)
    summary = entropy.run(
        resolve(values.data),
        values.entropy_model,  # as typed: the library tells a folder from a Hub id
        threshold=threshold,
        target_patch_size=values.target_patch_size,
        rule=rule,
        target_kind=values.rule if values.target_patch_size is not None else "global",
        reset_on_newline=values.reset_on_newline,
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
    elif summary.rule is not None:
        print(f"rule={summary.rule['kind']} tag={summary.tag}")
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
