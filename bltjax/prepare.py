"""``python -m bltjax.prepare``: raw text -> byte shards + manifest.json, the first step of the data's way.

    python -m bltjax.prepare --input bltjax/data/corpus --output /tmp/bltjax-data
    python -m bltjax.prepare --input corpus/ more.jsonl.gz --output DATA [--val-fraction 0.01] [--seed 0]

This module is the command line only; the work is `bltjax.data.prepare.prepare` and the format
`bltjax.data.shards` (docs/data.md). Exit status 0 when done, 2 for unusable inputs or settings.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from bltjax.data.prepare import (
    DEFAULT_INCLUDE,
    DEFAULT_SHARD_BYTES,
    DEFAULT_TEXT_FIELD,
    DEFAULT_VAL_FRACTION,
    PrepareError,
    prepare,
)


def parse_size(text: str) -> int:
    """``64MiB``, ``64M``, ``512k``, ``1000`` -> bytes (binary multiples)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size like 64MiB, 512k or 1000, got {text!r}")
    return int(match.group(1)) * 1024 ** "_kmgt".index(match.group(2).lower() or "_")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bltjax.prepare",
        description="Raw text (files, folders, JSONL, .gz/.zst) -> byte shards + manifest.json (docs/data.md).",
    )
    parser.add_argument(
        "--input",
        nargs="+",
        action="extend",
        required=True,
        metavar="PATH",
        help="text files, JSONL files (one document per line) or folders of them (recursive)",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="the shard folder to write or resume")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        help="fraction of documents, chosen by a keyed hash of their bytes, for validation",
    )
    parser.add_argument(
        "--shard-bytes",
        type=parse_size,
        default=DEFAULT_SHARD_BYTES,
        help="close a shard once its .tokens file reaches this size (default 64MiB)",
    )
    parser.add_argument("--text-field", default=DEFAULT_TEXT_FIELD, help="JSONL field that holds the text")
    parser.add_argument("--seed", type=int, default=0, help="key of the train/validation hash")
    parser.add_argument(
        "--include",
        default=",".join(DEFAULT_INCLUDE),
        help="comma-separated name patterns taken from folders (files named directly always are)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bltjax.prepare``: returns the exit status (0 ok, 2 unusable inputs or settings)."""
    args = _parser().parse_args(argv)
    include = [p.strip() for p in args.include.split(",") if p.strip()]
    try:
        result = prepare(
            args.input,
            args.output,
            val_fraction=args.val_fraction,
            shard_bytes=args.shard_bytes,
            text_field=args.text_field,
            seed=args.seed,
            include=include,
            progress=not args.no_progress,
        )
    except PrepareError as err:
        print(f"prepare: error: {err}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
