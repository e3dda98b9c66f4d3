r"""Trains a BLT, an entropy model or a byte-level baseline: the framework's main job.

  python -m bltjax.train --config experiments/blt_tiny.py --workdir runs/tiny \
      --config.data.path=data/corpus [--config.train.steps=500 ...]

The workdir fully determines the run: relaunching the same command continues from the latest
complete checkpoint, bit for bit. What lands in the workdir, and how the loop checkpoints,
evaluates and stops, is described in `bltjax/training/trainer.py`, which this command runs.

Exit status: 0 when the run reached `config.train.steps`; 1 with a message naming the field or
file for a bad config, workdir, data or mesh, or when the loss became NaN / Inf; 143 after
SIGTERM (pre-emption), once a checkpoint of the current step is on disk; 2 for a bad command line.

Multi-host: every host runs the same command. `bltjax/runtime/distributed.py` joins the
processes first (--coordinator / --num-processes / --process-id, or the environment a launcher
sets; see docs/launching.md); process 0 alone prints.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags

from bltjax.config import ConfigError
from bltjax.data import pipeline
from bltjax.runtime import cli, compile_cache, distributed
from bltjax.runtime.paths import resolve
from bltjax.training import sharding
from bltjax.training.trainer import TrainingDivergedError, WorkdirError, train

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: schedulers treat it as "killed", and requeue


def define_flags(values: flags.FlagValues) -> None:
    """Command-line flags (see `bltjax.runtime.cli` for the conventions every program shares)."""
    cli.define_config_file("config", "Experiment config file (path.py[:variant]).", values)
    flags.DEFINE_string("workdir", None, "Run directory to write: checkpoints, metrics, TensorBoard logs.",
                        flag_values=values)  # fmt: skip
    distributed.define_flags(values)


def _main(command_line: cli.CommandLine) -> int:
    values = command_line.flags
    cli.require(values, "config", "workdir")
    compile_cache.enable()
    # Joins the other hosts (if any) before any device work; only process 0 prints.
    topology = distributed.initialize_from_flags(values)
    console = distributed.primary_console()
    print(topology.summary(), file=console, flush=True)
    result = train(values.config, resolve(values.workdir), console=console)
    print(f"checkpoints: {result.workdir / 'checkpoints'}", file=console)
    print(f"tensorboard: tensorboard --logdir {result.workdir / 'tensorboard'}", file=console)
    if result.validation_bpb is not None:
        print(f"validation bpb: {result.validation_bpb:.4f}", file=console, flush=True)
    return PREEMPTED_EXIT_CODE if result.preempted else 0


PROGRAM = cli.Program(
    "python -m bltjax.train",
    define_flags,
    _main,
    doc=__doc__,
    errors=(
        ConfigError,
        WorkdirError,
        pipeline.DataError,
        sharding.MeshError,
        TrainingDivergedError,
        distributed.DistributedError,
    ),  # fmt: skip
)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bltjax.train``; ``argv`` without the program name (default: the command line)."""
    return PROGRAM.run(argv)


if __name__ == "__main__":
    sys.exit(main())
