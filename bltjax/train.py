r"""Trains a BLT, an entropy model or a byte-level baseline: the framework's main job.

  python -m bltjax.train --config experiments/blt_tiny.py --workdir runs/tiny \
      --config.data.path=data/corpus [--config.train.steps=500 ...]

The workdir fully determines the run: relaunching the same command continues from the latest
complete checkpoint, bit for bit. What lands in the workdir, and how the loop checkpoints,
evaluates and stops, is described in `bltjax/training/trainer.py`, which this command runs.

Exit status: 0 when the run reached `config.train.steps`; 1 with a message naming the field or
file for a bad config, workdir, data or mesh, or when the loss became NaN / Inf; 143 after
SIGTERM (pre-emption), once a checkpoint of the current step is on disk.

Multi-host: every host runs the same command. `bltjax/runtime/distributed.py` joins the
processes first (--coordinator / --num-processes / --process-id, or the environment a launcher
sets; see docs/launching.md); process 0 alone prints.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from bltjax.config import ConfigError
from bltjax.data import pipeline
from bltjax.runtime import compile_cache, distributed
from bltjax.runtime.cli import normalise_argv
from bltjax.training import sharding
from bltjax.training.trainer import TrainingDivergedError, WorkdirError, train

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: schedulers treat it as "killed", and requeue


def define_flags() -> None:
    """Command-line flags, defined only when this module is the program."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file (path.py[:variant]).")
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, TensorBoard logs.")
    distributed.define_flags()


def main(argv: list[str]) -> None:
    del argv
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    if config is None or not workdir:
        raise app.UsageError("--config and --workdir are required")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    compile_cache.enable()
    try:
        # Joins the other hosts (if any) before any device work; only process 0 prints.
        topology = distributed.initialize_from_flags()
        console = distributed.primary_console()
        print(topology.summary(), file=console, flush=True)
        result = train(config, workdir, console=console)
    except (ConfigError, WorkdirError, pipeline.DataError, sharding.MeshError, TrainingDivergedError,
            distributed.DistributedError) as err:  # fmt: skip
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    print(f"checkpoints: {result.workdir / 'checkpoints'}", file=console)
    print(f"tensorboard: tensorboard --logdir {result.workdir / 'tensorboard'}", file=console)
    if result.validation_bpb is not None:
        print(f"validation bpb: {result.validation_bpb:.4f}", file=console, flush=True)
    if result.preempted:
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    define_flags()
    app.run(main, argv=normalise_argv(sys.argv))
