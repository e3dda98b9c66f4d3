"""The config fields that say where a run's metrics and traces go: ``config.metrics`` and
``config.train.profile_steps``, with their defaults and checks.

They live apart from `bltjax.config` so that the writers (`bltjax.training.metrics`) and the
profiler (`bltjax.training.profiling`) read the same definitions that `bltjax.config.validate`
checks; `validate` turns `ObservabilityError` into its ConfigError, as it does for patching.
"""

from __future__ import annotations

from typing import Any

import ml_collections

METRIC_BACKENDS = ("tensorboard", "jsonl", "wandb")


class ObservabilityError(ValueError):
    """A bad metrics / profiling field; the message starts with the dotted field name."""


def metrics_defaults() -> ml_collections.ConfigDict:
    """``config.metrics``: the backends (the console line is always printed) and the W&B run's names."""
    return ml_collections.ConfigDict(
        dict(
            backends="tensorboard,jsonl",  # comma-separated names of METRIC_BACKENDS; sweeps read jsonl
            wandb_project="",  # backend "wandb" (pip install 'bltjax[track]'); "" = WANDB_PROJECT or wandb's default
            wandb_entity="",  # "" = the account's default entity
            wandb_name="",  # "" = the workdir's name
        )
    )


def parse_backends(value: Any) -> tuple[str, ...]:
    """``"tensorboard, jsonl"`` -> ("tensorboard", "jsonl"); ObservabilityError naming config.metrics.backends."""
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip())) if isinstance(value, str) else None
    if names is None or any(name not in METRIC_BACKENDS for name in names):
        raise ObservabilityError(
            f"config.metrics.backends: expected names from {METRIC_BACKENDS}, comma-separated, got {value!r}"
        )
    return names


def check_profile_steps(value: Any, steps: int) -> None:
    """None, or (first_step, count): positive ints whose steps all lie within config.train.steps."""
    if value is None:
        return
    field = "config.train.profile_steps"
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(_positive_int(v) for v in value)):
        raise ObservabilityError(
            f"{field}: expected None or (first_step, count), two positive integers, e.g. (10, 3), got {value!r}"
        )
    first, count = value
    if first + count - 1 > steps:
        raise ObservabilityError(
            f"{field}: expected steps within config.train.steps={steps} (the last traced step is "
            f"first_step + count - 1), got {value!r}"
        )


def check(config: ml_collections.ConfigDict) -> None:
    """Both sections of one config; a config from before the metrics section gets the defaults."""
    check_profile_steps(config.train.get("profile_steps"), config.train.steps)
    metrics = config.get("metrics")
    if metrics is None:
        return
    parse_backends(metrics.backends)
    for name in ("wandb_project", "wandb_entity", "wandb_name"):
        if not isinstance(metrics[name], str):
            raise ObservabilityError(f"config.metrics.{name}: expected a string, got {metrics[name]!r}")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
