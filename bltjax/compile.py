r"""Ahead-of-time compilation of the train step for a target topology: does it shard, does it fit?

  python -m bltjax.compile --config experiments/blt_1b.py:v5p-128     # a pod variant: its slice is the target
  python -m bltjax.compile --config experiments/blt_1b.py --topology v5p-128 [--config.mesh.fsdp=-1 ...]
  python -m bltjax.compile --config experiments/blt_tiny.py --devices 8 --hbm-gib 16

Compiles the exact train step `python -m bltjax.train` would run for the target's devices and
prints its per-device memory, what is live at the memory peak (largest buffers with the jax
op that made them, totals per layer kind) and a roofline estimate of the step time and MFU on
the target; nothing runs and nothing is allocated. Exit status 1 with a clear
message when the mesh does not fit the devices or the batch, when compilation fails, or when
the peak estimate exceeds the device's HBM times --hbm-fraction; 2 for a bad command line. The target table (v4-N,
v5p-N, v5e-N, v6e-N, h100-N, ... or a TPU layout such as v5p:4x4x8), the two compilers
(--backend tpu: libtpu's, cpu: a fake CPU mesh) and what the memory numbers mean are
described in `bltjax/runtime/aot.py`, which this command runs.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence

from absl import flags

from bltjax.config import ConfigError, recorded_topology
from bltjax.runtime import cli, compile_cache
from bltjax.runtime.aot import DEFAULT_HBM_FRACTION, CompileError, compile_for_target
from bltjax.runtime.paths import resolve
from bltjax.training import sharding


def define_flags(values: flags.FlagValues) -> None:
    """Command-line flags (see `bltjax.runtime.cli` for the conventions every program shares)."""
    cli.define_config_file("config", "Experiment config file (path.py[:variant]).", values)
    flags.DEFINE_string("topology", None, "Target, e.g. v5p-128 or v5p:4x4x8 (default: the config's topology).",
                        flag_values=values)  # fmt: skip
    flags.DEFINE_integer("devices", None, "Instead of --topology: a device count (fake CPU mesh).", flag_values=values)
    flags.DEFINE_integer(
        "num_slices",
        None,
        "Slices of the target joined over DCN (multi-slice; default: config.mesh.num_slices).",
        flag_values=values,
    )
    flags.DEFINE_float("hbm_gib", None, "Memory per device in GiB (default: the target's nominal HBM).",
                       flag_values=values)  # fmt: skip
    flags.DEFINE_float("hbm_fraction", DEFAULT_HBM_FRACTION, "Fraction of the memory the step may use.",
                       flag_values=values)  # fmt: skip
    flags.DEFINE_enum("backend", "auto", ["auto", "tpu", "cpu"], "tpu: libtpu's compiler; cpu: fake CPU devices.",
                      flag_values=values)  # fmt: skip
    flags.DEFINE_string("out", None, "Also write the report as JSON here.", flag_values=values)
    flags.DEFINE_bool(
        "explain",
        True,
        "List what is live at the memory peak (compiles afresh); --noexplain: a cache lookup.",
        flag_values=values,
    )


def _main(command_line: cli.CommandLine) -> int:
    values = command_line.flags
    cli.require(values, "config")
    compile_cache.enable()  # a rerun of the same check is a cache lookup
    topology = values.topology
    if topology is None and values.devices is None:
        topology = recorded_topology(values.config)  # a pod variant (blt_1b.py:v5p-128) names its slice
    compile_for_target(
        values.config,
        topology=topology,
        devices=values.devices,
        num_slices=values.num_slices,
        hbm_gib=values.hbm_gib,
        hbm_fraction=values.hbm_fraction,
        backend=values.backend,
        out=resolve(values.out) if values.out else None,
        explain=values.explain,
        command=" ".join([command_line.typed[0], shlex.join(command_line.typed[1:])]),  # the program name has spaces
    )
    return 0


PROGRAM = cli.Program(
    "python -m bltjax.compile", define_flags, _main, doc=__doc__, errors=(CompileError, ConfigError, sharding.MeshError)
)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bltjax.compile``; ``argv`` without the program name (default: the command line)."""
    return PROGRAM.run(argv)


if __name__ == "__main__":
    sys.exit(main())
