"""Choose the global entropy threshold θ for a target mean patch size (docs/architecture.md §3.15).

    python -m bltjax.calibrate --entropies doc1.npy doc2.npy --target-patch-size 4.5
    python -m bltjax.calibrate --data DATA --target-patch-size 4.5 [--split train --max-tokens N]

Each .npy file holds one document as a 1-D array, or a 2-D array whose rows are documents of
equal length (float16/float32/float64 entropies in nats); `--data` reads the entropy sidecars of a
prepared folder (`python -m bltjax.entropy`). Prints a markdown table; `--json` also writes the
result. The search itself is `bltjax.patching.calibrate`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence

import numpy as np

from bltjax.patching.calibrate import UNITS, calibrate_threshold, format_table
from bltjax.runtime.atomic import write_atomic


def _load_documents(paths: Sequence[str]) -> list[np.ndarray]:
    documents: list[np.ndarray] = []
    for path in paths:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        if array.ndim == 1:
            documents.append(np.asarray(array))
        elif array.ndim == 2:
            documents.extend(np.asarray(row) for row in array)
        else:
            raise ValueError(
                f"calibrate: file {path} must hold a 1-D or 2-D array of entropies; got shape {array.shape}"
            )
    return documents


def _sidecar_documents(args: argparse.Namespace) -> list[np.ndarray]:
    """Per-document entropies from the sidecars of a prepared folder (imports the data stack lazily)."""
    import pathlib

    from bltjax.data import shards as shard_format
    from bltjax.data import sidecars

    data = pathlib.Path(args.data)
    return sidecars.sidecar_documents(data, shard_format.load_manifest(data).shards(args.split), args.max_tokens)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bltjax.calibrate", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--entropies",
        nargs="+",
        metavar="FILE.npy",
        help="1-D array = one document; 2-D array = one document per row",
    )
    source.add_argument(
        "--data", metavar="DIR", help="a prepared folder with entropy sidecars (python -m bltjax.entropy)"
    )
    parser.add_argument("--split", default="train", help="with --data: the split to calibrate on")
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="with --data: whole documents up to this many tokens"
    )
    parser.add_argument("--target-patch-size", type=float, required=True, help="e.g. 4.5, 6 or 8")
    parser.add_argument("--unit", choices=UNITS, default="tokens", help="what the target counts (default: tokens)")
    parser.add_argument("--max-patch-length", type=int, default=None)
    parser.add_argument("--no-bos", action="store_true", help="documents do not start with BOS")
    parser.add_argument("--no-eos", action="store_true", help="documents do not end with EOS")
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    args = parser.parse_args(argv)
    try:
        documents = _load_documents(args.entropies) if args.entropies else _sidecar_documents(args)
        result = calibrate_threshold(
            documents,
            args.target_patch_size,
            unit=args.unit,
            max_patch_length=args.max_patch_length,
            bos=not args.no_bos,
            eos=not args.no_eos,
        )
    except (ValueError, OSError) as error:
        print(error, file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json:
        write_atomic(args.json, json.dumps(dataclasses.asdict(result), indent=2).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
