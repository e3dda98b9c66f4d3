r"""The experiment file of a planned sweep job: what `python -m bltjax.train --config` reads.

    python -m bltjax.train --config bltjax/sweep/job_config.py:SWEEP/jobs/NAME.json --workdir SWEEP/runs/NAME

A plan writes each job's full config to ``SWEEP/jobs/NAME.json``; this file turns it back into a
ConfigDict and fills in what only the shared stages know: ``data.path`` (SWEEP/data, or the
sweep's prepared folder; DATA/bpe-<V> for the token baseline) and, for entropy patching, the
threshold calibrated for the job's target patch size (SWEEP/stages/entropy.json). Command-line
overrides (``--config.mesh.fsdp=4``) still apply on top, as with any experiment file.
"""

from __future__ import annotations

import json

import ml_collections

from bltjax.config import ConfigError
from bltjax.runtime import paths
from bltjax.sweep import stages


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if not arg:
        raise ConfigError("bltjax/sweep/job_config.py: expected ':SWEEP/jobs/NAME.json' after the file name")
    path = paths.resolve(arg)  # the job file of a sweep folder, local or in a bucket
    try:
        job = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(
            f"{path}: unreadable sweep job ({err}); rewrite it with `python -m bltjax.sweep plan`"
        ) from err
    if not isinstance(job, dict) or job.get("format") != "bltjax.sweep-job" or "config" not in job:
        raise ConfigError(f"{path}: field 'format': expected 'bltjax.sweep-job', got {job.get('format')!r}")
    sweep_dir = path.parent.parent
    config = ml_collections.ConfigDict(job["config"])
    config.data.path = str(stages.data_dir(sweep_dir, job["data"]))
    if job.get("tokens"):  # the token baseline reads the token shards of the shared BPE stage
        config.data.path = str(stages.data_dir(sweep_dir, job["data"]) / job["tokens"]["folder"])
    target = job.get("entropy_target")
    if target is not None:
        thresholds = stages.read_thresholds(sweep_dir)
        key = stages.target_key(target, job.get("entropy_rule", "global"))
        if key not in thresholds:
            raise ConfigError(
                f"{sweep_dir / stages.STAGES_DIR / stages.ENTROPY_RECORD}: no threshold for target patch size {key}; "
                f"run the shared stages first: python -m bltjax.sweep run {sweep_dir} --stages-only"
            )
        with config.ignore_type():
            config.patching.threshold = float(thresholds[key]["threshold"])
    return config
