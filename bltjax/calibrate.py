"""Choose the entropy threshold θ for a target mean patch size (docs/architecture.md §3.15).

    python -m bltjax.calibrate --entropies doc1.npy doc2.npy --target-patch-size 4.5 [--out result.json]
    python -m bltjax.calibrate --data DATA --target-patch-size 4.5 [--split train --max-tokens N]
    python -m bltjax.calibrate --data DATA --target-patch-size 4.5 --rule monotonic   # §3.5's θ_r

Each .npy file holds one document as a 1-D array, or a 2-D array whose rows are documents of
equal length (float16/float32/float64 entropies in nats); `--data` reads the entropy sidecars of a
prepared folder (`python -m bltjax.entropy`). Prints a markdown table; `--out` also writes the
result as JSON (`--json` is its deprecated old name). The search itself is
`bltjax.patching.calibrate`. Exit status 2 for unusable inputs or command line.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
from collections.abc import Sequence

import numpy as np
from absl import flags

from bltjax.patching.calibrate import KINDS, UNITS, calibrate_threshold, format_table
from bltjax.runtime import cli
from bltjax.runtime.atomic import write_atomic
from bltjax.runtime.paths import is_uri, resolve


def _load_documents(paths: Sequence[str]) -> list[np.ndarray]:
    documents: list[np.ndarray] = []
    for path in paths:
        if is_uri(path):  # no mmap on a remote file: read it whole
            array = np.load(io.BytesIO(resolve(path).read_bytes()), allow_pickle=False)
        else:
            array = np.load(os.fspath(resolve(path)), mmap_mode="r", allow_pickle=False)
        if array.ndim == 1:
            documents.append(np.asarray(array))
        elif array.ndim == 2:
            documents.extend(np.asarray(row) for row in array)
        else:
            raise ValueError(
                f"calibrate: file {path} must hold a 1-D or 2-D array of entropies; got shape {array.shape}"
            )
    return documents


def _sidecar_documents(data: str, split: str, max_tokens: int | None) -> list[np.ndarray]:
    """Per-document entropies from the sidecars of a prepared folder (imports the data stack lazily)."""
    from bltjax.data import shards as shard_format
    from bltjax.data import sidecars

    folder = resolve(data)
    return sidecars.sidecar_documents(folder, shard_format.load_manifest(folder).shards(split), max_tokens)


def define_flags(values: flags.FlagValues) -> None:
    """Command-line flags (see `bltjax.runtime.cli` for the conventions every program shares)."""
    flags.DEFINE_multi_string("entropies", [], "FILE.npy ...: 1-D array = one document; 2-D array = one document "
                              "per row (several may follow one --entropies).", flag_values=values)  # fmt: skip
    flags.DEFINE_string("data", None, "Instead of --entropies: a prepared folder with entropy sidecars "
                        "(python -m bltjax.entropy).", flag_values=values)  # fmt: skip
    flags.DEFINE_string("split", "train", "With --data: the split to calibrate on.", flag_values=values)
    flags.DEFINE_integer("max_tokens", None, "With --data: whole documents up to this many tokens.",
                         flag_values=values)  # fmt: skip
    flags.DEFINE_float("target_patch_size", None, "Target mean patch size, e.g. 4.5, 6 or 8.", flag_values=values)
    flags.DEFINE_enum("unit", "tokens", list(UNITS), "What the target counts.", flag_values=values)
    flags.DEFINE_integer("max_patch_length", None, "Longest patch allowed.", flag_values=values)
    flags.DEFINE_enum("rule", "global", list(KINDS), "The entropy rule whose threshold to choose (global: "
                      "docs/architecture.md §3.4; monotonic: §3.5).", flag_values=values)  # fmt: skip
    flags.DEFINE_bool("bos", True, "Documents start with BOS (--no-bos: they do not).", flag_values=values)
    flags.DEFINE_bool("eos", True, "Documents end with EOS (--no-eos: they do not).", flag_values=values)
    flags.DEFINE_string("out", None, "Also write the result as JSON here.", flag_values=values)


def _main(command_line: cli.CommandLine) -> int:
    values = command_line.flags
    if bool(values.entropies) == bool(values.data):
        raise cli.CommandLineError("give exactly one of --entropies FILE.npy ... and --data DIR")
    cli.require(values, "target_patch_size")
    if values.entropies:
        documents = _load_documents(values.entropies)
    else:
        documents = _sidecar_documents(values.data, values.split, values.max_tokens)
    result = calibrate_threshold(
        documents,
        values.target_patch_size,
        unit=values.unit,
        max_patch_length=values.max_patch_length,
        bos=values.bos,
        eos=values.eos,
        kind=values.rule,
    )
    print(format_table(result))
    if values.out:
        write_atomic(resolve(values.out), json.dumps(dataclasses.asdict(result), indent=2).encode())
    return 0


PROGRAM = cli.Program(
    "python -m bltjax.calibrate",
    define_flags,
    _main,
    doc=__doc__,
    errors=(ValueError, OSError),  # the messages name the file or the unreachable target
    error_status=2,
    aliases={"json": "out"},
    multi_word=("entropies",),
)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bltjax.calibrate``: the exit status (0 done, 2 unusable inputs or command line)."""
    return PROGRAM.run(argv)


if __name__ == "__main__":
    sys.exit(main())
