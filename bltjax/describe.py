"""Prints a config after validation and the parameter count of each model component.

  python -m bltjax.describe --config experiments/blt_1b.py

Nothing is allocated: shapes come from `jax.eval_shape`, so the 8B config prints on a laptop.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import jax
from absl import flags

from bltjax.config import ConfigError
from bltjax.models.factory import parameter_shapes
from bltjax.runtime import cli


def count_parameters(shapes: dict) -> dict[str, int]:
    """Parameters per top-level component (and per hash table group), plus the total."""
    counts: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        keys = [p.key for p in path]
        component = keys[0] if keys[0] != "local_encoder" or keys[1] != "hash_embedding" else "hash_embedding"
        counts[component] = counts.get(component, 0) + math.prod(leaf.shape)
    counts["total"] = sum(counts.values())
    return counts


def define_flags(values: flags.FlagValues) -> None:
    """Command-line flags (see `bltjax.runtime.cli` for the conventions every program shares)."""
    cli.define_config_file("config", "Experiment config file (path.py[:variant]).", values)


def _main(command_line: cli.CommandLine) -> int:
    config = command_line.flags.config
    cli.require(command_line.flags, "config")
    counts = count_parameters(parameter_shapes(config))
    print(config)
    print("| component | parameters |\n|---|---:|")
    for name, count in counts.items():
        print(f"| {name} | {count:,} |")
    return 0


PROGRAM = cli.Program("python -m bltjax.describe", define_flags, _main, doc=__doc__, errors=(ConfigError,))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bltjax.describe``; ``argv`` without the program name (default: the command line)."""
    return PROGRAM.run(argv)


if __name__ == "__main__":
    sys.exit(main())
