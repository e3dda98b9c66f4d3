r"""Ahead-of-time compilation of the train step for a target topology: does it shard, does it fit?

  python -m bltjax.compile --config experiments/blt_1b.py:v5p-128     # a pod variant: its slice is the target
  python -m bltjax.compile --config experiments/blt_1b.py --topology v5p-128 [--config.mesh.fsdp=-1 ...]
  python -m bltjax.compile --config experiments/blt_tiny.py --devices 8 --hbm-gib 16

Compiles the exact train step `python -m bltjax.train` would run for the target's devices and
prints its per-device memory, what is live at the memory peak (largest buffers with the jax
op that made them, totals per layer kind) and a roofline estimate of the step time and MFU on
the target; nothing runs and nothing is allocated. Exit status 1 with a clear
message when the mesh does not fit the devices or the batch, when compilation fails, or when
the peak estimate exceeds the device's HBM times --hbm-fraction. The target table (v4-N,
v5p-N, v5e-N, v6e-N, h100-N, ... or a TPU layout such as v5p:4x4x8), the two compilers
(--backend tpu: libtpu's, cpu: a fake CPU mesh) and what the memory numbers mean are
described in `bltjax/runtime/aot.py`, which this command runs.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from bltjax.config import ConfigError, recorded_topology
from bltjax.runtime import compile_cache
from bltjax.runtime.aot import DEFAULT_HBM_FRACTION, CompileError, compile_for_target
from bltjax.runtime.cli import normalise_argv
from bltjax.training import sharding


def define_flags() -> None:
    """Command-line flags, defined only when this module is the program."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file (path.py[:variant]).")
    flags.DEFINE_string("topology", None, "Target, e.g. v5p-128 or v5p:4x4x8 (default: the config's topology).")
    flags.DEFINE_integer("devices", None, "Instead of --topology: a device count (fake CPU mesh).")
    flags.DEFINE_integer("num_slices", 1, "Slices of the TPU topology (multi-slice).")
    flags.DEFINE_float("hbm_gib", None, "Memory per device in GiB (default: the target's nominal HBM).")
    flags.DEFINE_float("hbm_fraction", DEFAULT_HBM_FRACTION, "Fraction of the memory the step may use.")
    flags.DEFINE_enum("backend", "auto", ["auto", "tpu", "cpu"], "tpu: libtpu's compiler; cpu: fake CPU devices.")
    flags.DEFINE_string("out", None, "Also write the report as JSON here.")
    flags.DEFINE_bool(
        "explain", True, "List what is live at the memory peak (compiles afresh); --noexplain: a cache lookup."
    )


def main(argv: list[str]) -> None:
    del argv
    FLAGS = flags.FLAGS
    if FLAGS.config is None:
        raise app.UsageError("--config is required")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    compile_cache.enable()  # a rerun of the same check is a cache lookup
    topology = FLAGS.topology
    if topology is None and FLAGS.devices is None:
        topology = recorded_topology(FLAGS.config)  # a pod variant (blt_1b.py:v5p-128) names its slice
    try:
        compile_for_target(
            FLAGS.config,
            topology=topology,
            devices=FLAGS.devices,
            num_slices=FLAGS.num_slices,
            hbm_gib=FLAGS.hbm_gib,
            hbm_fraction=FLAGS.hbm_fraction,
            backend=FLAGS.backend,
            out=FLAGS.out,
            explain=FLAGS.explain,
        )
    except (CompileError, ConfigError, sharding.MeshError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main, argv=normalise_argv(sys.argv))
