"""The Weights & Biases backend of `bltjax.training.metrics.MetricsWriter` (``config.metrics.backends``).

One workdir is one W&B run: its id is kept in ``WORKDIR/wandb_run_id``, so a relaunch resumes
the same run (``resume="allow"``) instead of starting a second curve. Evaluations of the run
(`bltjax.eval`) are runs of their own in the same group, with ``job_type="eval"``: W&B wants a
run's steps to grow, and an evaluation logs an earlier checkpoint's step while training goes on.
Keys are ``{split}/{name}`` (``train/loss``, ``eval/validation/bpb``).

wandb is an optional extra (``pip install 'bltjax[track]'``); `require_wandb` fails with the
install command when it is missing. Everything else is wandb's own configuration: the API key
(``wandb login`` or ``WANDB_API_KEY``), ``WANDB_MODE=offline`` for machines without network
(``wandb sync`` uploads later), ``WANDB_DIR`` for where the local files go (default: the workdir
when it is local, else wandb's default).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from typing import Any

from bltjax.runtime import paths
from bltjax.runtime.atomic import write_atomic

RUN_ID_FILE = "wandb_run_id"


class WandbMissingError(ImportError):
    """config.metrics.backends asks for wandb, which is not installed."""


def require_wandb() -> Any:
    """The wandb module, or WandbMissingError naming the config field and the install command."""
    try:
        import wandb
    except ImportError as err:
        raise WandbMissingError(
            "config.metrics.backends: 'wandb' needs the wandb package; install it with "
            "pip install 'bltjax[track]' (or pip install wandb), or drop wandb from the backends"
        ) from err
    return wandb


def run_id(workdir: paths.PathLike) -> str:
    """The W&B run id of a workdir: read from ``wandb_run_id``, or made and written on first use."""
    path = paths.resolve(workdir) / RUN_ID_FILE
    if path.exists():
        stored = path.read_text().strip()
        if stored:
            return stored
    new = uuid.uuid4().hex[:16]  # W&B ids: letters and digits, unique per project
    write_atomic(path, (new + "\n").encode())
    return new


class WandbRun:
    """A W&B run, started on first use (so a run that fails at start-up leaves no empty run behind)."""

    def __init__(
        self,
        workdir: paths.PathLike,
        *,
        project: str = "",
        entity: str = "",
        name: str = "",
        job_type: str = "train",
        run_suffix: str = "",
    ) -> None:
        self.workdir = paths.resolve(workdir)
        self.project = project or None  # None: wandb's default project (WANDB_PROJECT or "uncategorized")
        self.entity = entity or None
        self.name = name or self.workdir.name
        self.job_type = job_type
        self.run_suffix = run_suffix  # eval runs: one per (split, step), next to the training run
        self._run = None

    @property
    def run(self) -> Any:
        if self._run is None:
            wandb = require_wandb()
            group = run_id(self.workdir)
            local_dir = os.environ.get("WANDB_DIR") or (None if paths.is_uri(self.workdir) else os.fspath(self.workdir))
            self._run = wandb.init(
                project=self.project,
                entity=self.entity,
                name=self.name + (f"-{self.run_suffix}" if self.run_suffix else ""),
                id=group + (f"-{self.run_suffix}" if self.run_suffix else ""),
                group=group,
                job_type=self.job_type,
                resume="allow",
                dir=local_dir,
                reinit="create_new",  # eval after training in one process: two runs, not a reused one
            )
        return self._run

    def writer(self, split: str) -> WandbWriter:
        return WandbWriter(self, split)

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


class WandbWriter:
    """One split's view of a `WandbRun`, with the methods `MetricsWriter` calls on its backends.

    Not a clu MetricWriter subclass: metrics.py imports this module, not the other way round.
    """

    def __init__(self, run: WandbRun, split: str) -> None:
        self.wandb_run, self.split = run, split

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self.wandb_run.run.log({f"{self.split}/{key}": value for key, value in scalars.items()}, step=int(step))

    def write_config(self, step: int, config: Mapping[str, Any]) -> None:
        """The nested config as the run's config (a relaunch may change train.* fields, hence allow_val_change)."""
        del step
        self.wandb_run.run.config.update(dict(config), allow_val_change=True)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self.write_config(0, hparams)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass  # the run outlives a split's writers (truncate_after remakes them); WandbRun.finish ends it
