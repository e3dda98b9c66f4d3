"""``python -m bltjax.bpe``: a byte-level BPE tokenizer and token shards, the token-level baseline's data.

    python -m bltjax.bpe --data DATA --vocab-size 4096              # -> DATA/bpe-4096/
    python -m bltjax.bpe --data DATA --vocab-size 4096 --out TOKENS

Learns the tokenizer on DATA's train split (a folder written by ``python -m bltjax.prepare``) and
writes every split's documents as token shards next to the byte shards, with ``tokenizer.json``
and a manifest (bytes per token measured on the train split). Train a token LM on the folder
with ``--config experiments/token_lm.py --config.data.path=DATA/bpe-4096``. ``--delimited`` also
writes byte shards with the delimiter id 3 before every token (DATA/bpe-4096-delimited), which a
BLT with BPE-delimiter patching (``--config.patching.mode=bpe``, docs/architecture.md §3.11)
trains on. This module is the command line only; the work and the format are `bltjax.data.bpe`.
Re-running resumes. Exit status 0 when done, 1 for unusable data, 2 for a bad command line.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags

from bltjax.data import bpe
from bltjax.data.shards import DataFormatError
from bltjax.runtime import cli
from bltjax.runtime.paths import resolve


def define_flags(values: flags.FlagValues) -> None:
    """Command-line flags (see `bltjax.runtime.cli` for the conventions every program shares)."""
    flags.DEFINE_string("data", None, "A folder written by python -m bltjax.prepare.", flag_values=values)
    flags.DEFINE_integer("vocab_size", 4096, f"BPE ids, the 256 bytes included ([{bpe.MIN_VOCAB}, {bpe.MAX_VOCAB}]); "
                         f"the model's vocabulary is this + {bpe.OFFSET} special ids.", flag_values=values)  # fmt: skip
    flags.DEFINE_string("out", None, "Folder to write (default: DATA/bpe-<vocab-size>).", flag_values=values)
    flags.DEFINE_bool("delimited", False, "Also write DATA/bpe-<V>-delimited: byte shards with the BPE delimiter id 3 "
                      "before every token's bytes (a BLT with patching.mode='bpe').", flag_values=values)  # fmt: skip
    flags.DEFINE_bool("progress", True, "A progress line on stderr (--no-progress: none).", flag_values=values)


def _main(command_line: cli.CommandLine) -> int:
    values = command_line.flags
    cli.require(values, "data")
    result = bpe.tokenize_data(
        resolve(values.data),
        values.vocab_size,
        out=resolve(values.out) if values.out else None,
        progress=values.progress,
    )
    manifest = result.manifest
    tokens = {split: sum(s.tokens for s in manifest.shards(split)) for split in manifest.splits}
    print(f"token folder: {result.folder}")
    print(f"  tokenizer  {'trained' if result.trained else 'reused'}: {manifest.vocab_size} BPE ids "
          f"(model vocabulary {manifest.model_vocab_size})")  # fmt: skip
    print(f"  shards     {result.shards_written} written, {result.shards_kept} kept; tokens {tokens}")
    print(f"  bytes per token (train): {manifest.bytes_per_token:.4f} with BOS/EOS, "
          f"{manifest.text_bytes_per_token:.4f} text only")  # fmt: skip
    if values.delimited:
        folder = bpe.write_delimited(resolve(values.data), values.vocab_size)
        print(f"  delimited byte shards (BLT patching.mode='bpe'): {folder}")
    return 0


PROGRAM = cli.Program(
    "python -m bltjax.bpe",
    define_flags,
    _main,
    doc=__doc__,
    errors=(bpe.BPEError, DataFormatError, FileNotFoundError),
)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bltjax.bpe``; ``argv`` without the program name (default: the command line)."""
    return PROGRAM.run(argv)


if __name__ == "__main__":
    sys.exit(main())
