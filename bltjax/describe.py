"""Prints a config after validation and the parameter count of each model component.

  python -m bltjax.describe --config experiments/blt_1b.py

Nothing is allocated: shapes come from `jax.eval_shape`, so the 8B config prints on a laptop.
"""

from __future__ import annotations

import math

import jax
from absl import app, flags
from ml_collections import config_flags

from bltjax.models.factory import parameter_shapes


def count_parameters(shapes: dict) -> dict[str, int]:
    """Parameters per top-level component (and per hash table group), plus the total."""
    counts: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        keys = [p.key for p in path]
        component = keys[0] if keys[0] != "local_encoder" or keys[1] != "hash_embedding" else "hash_embedding"
        counts[component] = counts.get(component, 0) + math.prod(leaf.shape)
    counts["total"] = sum(counts.values())
    return counts


def define_flags() -> None:
    """Command-line flags, defined only when this module is the program."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file (path.py[:variant]).")


def main(argv: list[str]) -> None:
    del argv
    config = flags.FLAGS.config
    if config is None:
        raise app.UsageError("--config is required, e.g. --config experiments/blt_tiny.py")
    counts = count_parameters(parameter_shapes(config))
    print(config)
    print("| component | parameters |\n|---|---:|")
    for name, count in counts.items():
        print(f"| {name} | {count:,} |")


if __name__ == "__main__":
    define_flags()
    app.run(main)
