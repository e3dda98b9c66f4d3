"""``python -m bltjax.prepare``: raw text -> byte shards + manifest.json, the first step of the data's way.

    python -m bltjax.prepare --input bltjax/data/corpus --out /tmp/bltjax-data
    python -m bltjax.prepare --input corpus/ more.jsonl.gz --out DATA [--val-fraction 0.01] [--seed 0]

This module is the command line only; the work is `bltjax.data.prepare.prepare` and the format
`bltjax.data.shards` (docs/data.md). ``--input`` takes one or more paths (repeat the flag or list
them after it); ``--output`` is the deprecated old name of ``--out``. Exit status 0 when done, 2
for unusable inputs, settings or command line.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence

from absl import flags

from bltjax.data.prepare import (
    DEFAULT_INCLUDE,
    DEFAULT_SHARD_BYTES,
    DEFAULT_TEXT_FIELD,
    DEFAULT_VAL_FRACTION,
    PrepareError,
    prepare,
)
from bltjax.runtime import cli
from bltjax.runtime.paths import resolve


def parse_size(text: str) -> int:
    """``64MiB``, ``64M``, ``512k``, ``1000`` -> bytes (binary multiples)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"expected a size like 64MiB, 512k or 1000, got {text!r}")
    return int(match.group(1)) * 1024 ** "_kmgt".index(match.group(2).lower() or "_")


class _SizeParser(flags.ArgumentParser):
    """absl parser of `parse_size` values (``--shard-bytes 64MiB``)."""

    def parse(self, argument):
        return argument if isinstance(argument, int) else parse_size(argument)

    def flag_type(self) -> str:
        return "a size like 64MiB, 512k or 1000"


def define_flags(values: flags.FlagValues) -> None:
    """Command-line flags (see `bltjax.runtime.cli` for the conventions every program shares)."""
    flags.DEFINE_multi_string("input", [], "Text files, JSONL files (one document per line) or folders of them "
                              "(recursive); several may follow one --input.", flag_values=values)  # fmt: skip
    flags.DEFINE_string("out", None, "The shard folder to write or resume.", flag_values=values)
    flags.DEFINE_float("val_fraction", DEFAULT_VAL_FRACTION, "Fraction of documents, chosen by a keyed hash of their "
                       "bytes, for validation.", flag_values=values)  # fmt: skip
    flags.DEFINE(_SizeParser(), "shard_bytes", DEFAULT_SHARD_BYTES, "Close a shard once its .tokens file reaches "
                 "this size (default 64MiB).", flag_values=values)  # fmt: skip
    flags.DEFINE_string("text_field", DEFAULT_TEXT_FIELD, "JSONL field that holds the text.", flag_values=values)
    flags.DEFINE_integer("seed", 0, "Key of the train/validation hash.", flag_values=values)
    flags.DEFINE_list("include", list(DEFAULT_INCLUDE), "Comma-separated name patterns taken from folders (files "
                      "named directly always are).", flag_values=values)  # fmt: skip
    flags.DEFINE_bool("progress", True, "A progress line on stderr (--no-progress: none).", flag_values=values)


def _main(command_line: cli.CommandLine) -> int:
    values = command_line.flags
    cli.require(values, "input", "out")
    result = prepare(
        [resolve(path) for path in values.input],
        resolve(values.out),
        val_fraction=values.val_fraction,
        shard_bytes=values.shard_bytes,
        text_field=values.text_field,
        seed=values.seed,
        include=[p.strip() for p in values.include if p.strip()],
        progress=values.progress,
    )
    print(result.summary())
    return 0


PROGRAM = cli.Program(
    "python -m bltjax.prepare",
    define_flags,
    _main,
    doc=__doc__,
    errors=(PrepareError,),
    error_status=2,
    aliases={"output": "out"},
    multi_word=("input",),
)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bltjax.prepare``: the exit status (0 ok, 2 unusable inputs, settings or command line)."""
    return PROGRAM.run(argv)


if __name__ == "__main__":
    sys.exit(main())
