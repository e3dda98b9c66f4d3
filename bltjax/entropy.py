"""``python -m bltjax.entropy``: entropy sidecars (next-byte entropies, patch-start bits) next to every shard.

    python -m bltjax.entropy --data DATA --checkpoint ENTROPY_MODEL_DIR --threshold 1.335442066192627
    python -m bltjax.entropy --data DATA --checkpoint ENTROPY_MODEL_DIR --target-patch-size 4.5

This module is the command line only: the pass is `bltjax.data.entropy.run` (its docstring
explains chunking, buckets and resume) and the files it writes are `bltjax.data.sidecars`.
Several processes share the shards (``--coordinator`` or a launcher's environment,
`bltjax.runtime.distributed`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bltjax import checkpoints
from bltjax.data import entropy
from bltjax.data.sidecars import SidecarError
from bltjax.patching.calibrate import UNITS
from bltjax.runtime import distributed


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bltjax.entropy``: returns the exit status (0 done, 2 unusable data, model or flags)."""
    parser = argparse.ArgumentParser(
        prog="python -m bltjax.entropy",
        description="Entropy sidecars (next-byte entropies and patch-start bits) next to every byte shard.",
    )
    parser.add_argument("--data", required=True, help="a folder written by python -m bltjax.prepare")
    parser.add_argument(
        "--checkpoint", required=True, help="a bltjax byte_lm model folder or a Hugging Face BLT folder"
    )
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--threshold", type=float, help="global entropy threshold (default: the checkpoint's)")
    choice.add_argument(
        "--target-patch-size", type=float, help="calibrate the threshold on the train split for this mean patch size"
    )
    parser.add_argument("--unit", choices=UNITS, default="tokens", help="what --target-patch-size counts")
    parser.add_argument("--calibration-tokens", type=int, help="calibrate on at most this many train tokens")
    parser.add_argument("--batch-size", type=int, help="rows of --context tokens per step (default: the model's)")
    parser.add_argument("--context", type=int, help="longest chunk in tokens (default: see the module doc)")
    parser.add_argument("--overlap", type=int, help="tokens re-read by each further chunk (default: exact)")
    parser.add_argument("--coordinator", help="host:port of process 0, for multi-process runs")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    args = parser.parse_args(argv)
    try:  # flags, else the environment a launcher sets (bltjax/runtime/distributed.py), else one process
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    except distributed.DistributedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        summary = entropy.run(
            args.data,
            args.checkpoint,
            threshold=args.threshold,
            target_patch_size=args.target_patch_size,
            unit=args.unit,
            batch_size=args.batch_size,
            context=args.context,
            overlap=args.overlap,
            calibration_tokens=args.calibration_tokens,
        )
    except (SidecarError, checkpoints.CheckpointError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if summary.calibration is not None:
        c = summary.calibration
        print(
            f"calibrated threshold {summary.threshold!r} for {c['target_patch_size']:g} {c['unit']} per patch: "
            f"mean {c['mean_tokens_per_patch']:.4f} tokens / {c['mean_bytes_per_patch']:.4f} bytes per patch "
            f"on {c['documents']} train documents"
        )
    if summary.tag is None:
        print("no threshold given and none stored in the checkpoint: wrote entropies only")
    else:
        print(f"threshold={summary.threshold!r} tag={summary.tag}")
    print(
        f"shards: {len(summary.computed)} entropies computed, {len(summary.restarted)} starts written, "
        f"{len(summary.skipped)} skipped; {summary.bytes_per_second:,.0f} bytes/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
