"""A sweep plan: one training config per (patching mode, patch size), plus the byte baseline.

Every job of a plan spends the same inference budget (forward FLOPs per byte) by its own model
size (`scaling.fit_stack`) and, with a training budget, the same training FLOPs by its schedule
(`scaling.training_schedule`). The plan is a pure function of the sweep definition, the config
files and (for space patching) the prepared data, so the same inputs give the same file, byte
for byte: no times, no absolute sweep paths.

Names: ``{mode}-ps{size}-{hash}`` (``byte-{hash}`` for the baseline), where hash is the first 8
hex digits of the sha256 of the job's canonical JSON (its config without ``data.path`` and the
entropy threshold, which the shared stages fill in, plus mode and target patch size). A changed
config is a new name, hence a new run folder: a run is never resumed with another config.

Files: ``plan.json`` (everything, the input of `run` and `report`), ``plan.md`` (the table a
person reads) and ``jobs/NAME.json`` (what `python -m bltjax.train` loads through
`bltjax/sweep/job_config.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import ml_collections
from etils import epath

from bltjax.config import ConfigError, base_megabyte_config, model_config, validate
from bltjax.models import flops
from bltjax.models.configs import BLTConfig, MegaByteConfig, TransformerConfig
from bltjax.runtime import paths
from bltjax.runtime.atomic import write_atomic
from bltjax.sweep import scaling, spec, stages

PLAN_FILE = "plan.json"
PLAN_TABLE = "plan.md"
JOBS_DIR = "jobs"
FORMAT = ("bltjax.sweep-plan", 1)
JOB_FORMAT = ("bltjax.sweep-job", 1)


class PlanError(ValueError):
    """A plan file that is missing, unreadable or from another sweep; the message names the file."""


# --- names --------------------------------------------------------------------------------------


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def job_hash(
    kind: str, mode: str, patch_size: float | None, config: Mapping[str, Any], inputs: Mapping[str, Any] | None = None
) -> str:
    """8 hex digits identifying a job by what it trains: its config, and the sweep's ``inputs``
    (the data to prepare, the entropy model) that the config only points to."""
    identity = json.loads(canonical_json(config))
    identity["data"].pop("path", None)
    if "patching" in identity:
        identity["patching"].pop("threshold", None)  # filled from the calibration stage
    payload = {"kind": kind, "mode": mode, "patch_size": patch_size, "config": identity, "inputs": inputs or {}}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:8]


def job_name(kind: str, mode: str, patch_size: float | None, digest: str) -> str:
    if kind == "byte_lm":
        return f"byte-{digest}"
    if kind == "token_lm":
        return f"bpe-{digest}"
    size = "" if patch_size is None else f"-ps{patch_size:g}"
    return f"{mode}{size}-{digest}"


# --- fitting one job ------------------------------------------------------------------------------


def _stack_dict(stack: TransformerConfig) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dataclasses.asdict(stack))


def _fit(sweep: ml_collections.ConfigDict, stack: TransformerConfig, cost, budget: float) -> scaling.StackFit:
    """`scaling.fit_stack` under the sweep's limits (tolerance, depth, width)."""
    return scaling.fit_stack(
        stack,
        cost,
        budget,
        tolerance=float(sweep.tolerance),
        max_layers=int(sweep.max_layers),
        max_width_multiple=int(sweep.max_width_multiple),
    )


def _schedule_fields(config: ml_collections.ConfigDict, schedule: scaling.Schedule, evals: int) -> None:
    """Steps and batch from the schedule; evaluation, checkpoint and log cadence from the steps."""
    steps = schedule.steps
    every = max(1, math.ceil(steps / evals))
    config.data.batch_size = schedule.batch_size
    config.train.steps = steps
    config.train.eval_every = every
    config.train.checkpoint_every = every
    config.train.log_every = max(1, min(int(config.train.log_every), every))
    config.optimizer.warmup_steps = min(int(config.optimizer.warmup_steps), max(1, steps // 10))


def _job(
    kind: str,
    mode: str,
    patch_size: float | None,
    expected: float,
    config: ml_collections.ConfigDict,
    fit: scaling.StackFit,
    schedule: scaling.Schedule,
) -> dict[str, Any]:
    validate(config)
    record = model_config(config)
    if kind == "token_lm":  # FL_BPE at the tokenizer's bytes per token (`expected`, bytes per position)
        breakdown = flops.analytic_flops_per_byte(config, bytes_per_token=expected)
    elif isinstance(record, BLTConfig):
        breakdown = flops.blt_flops_per_byte(record, context_bytes=config.data.seq_len, mean_patch_size=expected)
    elif isinstance(record, MegaByteConfig):
        breakdown = flops.megabyte_flops_per_byte(record, context_bytes=config.data.seq_len)
    else:
        breakdown = flops.byte_lm_flops_per_byte(record, context_bytes=config.data.seq_len)
    values = config.to_dict()
    stack = fit.stack
    return {
        "name": None,  # named by make_plan, which knows the sweep's inputs
        "hash": None,
        "kind": kind,
        "mode": mode,
        "patch_size": patch_size,
        "expected_patch_size": expected,
        "fitted_stack": {
            "dim": stack.dim,
            "n_layers": stack.n_layers,
            "n_heads": stack.n_heads,
            "n_kv_heads": stack.n_kv_heads,
            "ffn_hidden": stack.hidden_dim,
        },
        "fit": {
            "budget": fit.budget,
            "flops_per_byte": fit.flops_per_byte,
            "mismatch": fit.mismatch,
            "within_tolerance": fit.within_tolerance,
            "candidates": fit.candidates,
        },
        "flops_per_byte": breakdown.as_dict(),
        "parameters": flops.parameter_counts(record),
        "schedule": {
            "steps": schedule.steps,
            "batch_size": schedule.batch_size,
            "seq_len": config.data.seq_len,
            "train_flops": schedule.train_flops,
            "budget": schedule.budget,
        },
        "config": values,
    }


def _max_patches(
    mode: str, seq_len: int, size: float, expected: float, factor: float, seen: int | None, rows: str = "windows"
) -> int:
    if mode == "static":
        return 1 + math.ceil(seq_len / size)
    if rows == "packed":  # the first 1-byte patch, then seq_len bytes at the expected mean patch size
        return min(seq_len + 1, 1 + math.ceil(seq_len / expected))
    room = math.ceil(factor * seq_len / expected) + 2
    if seen is not None:
        room = max(room, seen + 2)
    return min(seq_len + 1, room)


def _blt_job(
    sweep: ml_collections.ConfigDict,
    base: ml_collections.ConfigDict,
    mode: str,
    size: float | None,
    expected: float,
    budget: float,
    seen: int | None,
) -> dict[str, Any]:
    config = ml_collections.ConfigDict(base.to_dict())
    seq_len = int(config.data.seq_len)
    config.patching.mode = "entropy" if mode == "monotonic" else mode
    config.patching.threshold = None
    config.patching.threshold_add = None
    config.patching.monotonicity = mode == "monotonic"
    if mode == "monotonic":  # the rule needs a threshold to validate; job_config puts the calibrated one in
        config.patching.threshold = 0.0
    config.patching.patch_size = float(size if size is not None else round(expected, 3))
    config.data.rows = sweep.get("rows", "windows")
    config.data.max_patches = _max_patches(
        mode, seq_len, config.patching.patch_size, expected, float(sweep.max_patches_factor), seen, config.data.rows
    )
    config.data.path = ""
    record = model_config(config)

    def cost(stack: TransformerConfig) -> float:
        candidate = dataclasses.replace(record, latent=stack)
        return flops.blt_flops_per_byte(candidate, context_bytes=seq_len, mean_patch_size=expected).total_forward

    fit = _fit(sweep, record.latent, cost, budget)
    config.model.latent = _stack_dict(fit.stack)
    schedule = _schedule(sweep, config, fit)
    _schedule_fields(config, schedule, int(sweep.evals))
    return _job("blt", mode, size, expected, config, fit, schedule)


def _byte_job(
    sweep: ml_collections.ConfigDict,
    baseline: ml_collections.ConfigDict,
    base: ml_collections.ConfigDict,
    budget: float,
) -> dict[str, Any]:
    config = ml_collections.ConfigDict(baseline.to_dict())
    config.data.seq_len = int(base.data.seq_len)  # the same context and bytes per step as the BLT runs
    config.data.batch_size = int(base.data.batch_size)
    config.train.steps = int(base.train.steps)
    config.data.path = ""
    record = model_config(config)

    def cost(stack: TransformerConfig) -> float:
        candidate = dataclasses.replace(record, stack=stack)
        return flops.byte_lm_flops_per_byte(candidate, context_bytes=config.data.seq_len).total_forward

    fit = _fit(sweep, record.stack, cost, budget)
    config.model.stack = _stack_dict(fit.stack)
    schedule = _schedule(sweep, config, fit)
    _schedule_fields(config, schedule, int(sweep.evals))
    return _job("byte_lm", "byte", None, 1.0, config, fit, schedule)


def _token_job(
    sweep: ml_collections.ConfigDict,
    token_baseline: ml_collections.ConfigDict,
    base: ml_collections.ConfigDict,
    budget: float,
    tokens: dict[str, Any],
) -> dict[str, Any]:
    """The BPE token LM (`bltjax.data.bpe`) at the same forward FLOPs per byte, over rows of the BLTs' bytes.

    A row holds base seq_len / bytes-per-token tokens, so the context and the bytes per step match the
    BLT runs'; the stack is fitted to FL_BPE (docs/architecture.md §14.2) at the measured bytes per token.
    """
    config = ml_collections.ConfigDict(token_baseline.to_dict())
    n_bpe = float(tokens["bytes_per_token"])
    config.data.seq_len = max(2, round(int(base.data.seq_len) / n_bpe))
    config.data.batch_size = int(base.data.batch_size)
    config.data.bytes_per_token = n_bpe
    config.model.vocab_size = int(tokens["model_vocab_size"])
    config.train.steps = int(base.train.steps)
    config.data.path = ""
    record = model_config(config)
    context = config.data.seq_len * n_bpe

    def cost(stack: TransformerConfig) -> float:
        return flops.token_lm_flops_per_byte(
            stack, context_bytes=context, bytes_per_token=n_bpe, vocab=record.vocab_size
        ).total_forward

    fit = _fit(sweep, record.stack, cost, budget)
    config.model.stack = _stack_dict(fit.stack)
    schedule = _schedule(sweep, config, fit, bytes_per_position=n_bpe)
    _schedule_fields(config, schedule, int(sweep.evals))
    job = _job("token_lm", "bpe", None, n_bpe, config, fit, schedule)
    job["tokens"] = dict(tokens)
    return job


# What a MegaByte job takes from the base BLT besides its stacks; not its hash n-grams (MegaByte has none).
MEGABYTE_SHARED_FIELDS = ("vocab_size", "document_mask", "dtype", "param_dtype", "init_std_factor", "remat",
                          "attention", "scan_layers")  # fmt: skip


def _megabyte_job(
    sweep: ml_collections.ConfigDict, base: ml_collections.ConfigDict, size: int, budget: float
) -> dict[str, Any]:
    """MegaByte (docs/architecture.md §19) with the base BLT's local and global stacks, data and schedule,
    fixed patches of ``size`` bytes, its latent model fitted to the budget like a BLT's."""
    values = base.to_dict()
    del values["patching"]
    model = base_megabyte_config().model.to_dict()
    model.update({k: values["model"][k] for k in (*MEGABYTE_SHARED_FIELDS, "encoder", "latent", "decoder")})
    values.update(model_type="megabyte", model=dict(model, patch_size=size))
    config = ml_collections.ConfigDict(values)
    config.data.path = ""
    record = model_config(config)

    def cost(stack: TransformerConfig) -> float:
        candidate = dataclasses.replace(record, latent=stack)
        return flops.megabyte_flops_per_byte(candidate, context_bytes=config.data.seq_len).total_forward

    fit = _fit(sweep, record.latent, cost, budget)
    config.model.latent = _stack_dict(fit.stack)
    schedule = _schedule(sweep, config, fit)
    _schedule_fields(config, schedule, int(sweep.evals))
    return _job("megabyte", "megabyte", float(size), float(size), config, fit, schedule)


def _schedule(
    sweep: ml_collections.ConfigDict,
    config: ml_collections.ConfigDict,
    fit: scaling.StackFit,
    bytes_per_position: float = 1.0,
):
    """Steps and batch for the training budget; a row of ``seq_len`` positions of ``bytes_per_position`` bytes."""
    budget = sweep.budget_train_flops
    return scaling.training_schedule(
        flops.TRAIN_MULTIPLIER * fit.flops_per_byte * bytes_per_position,  # FLOPs per position (a token's bytes)
        int(config.data.seq_len),
        int(config.data.batch_size),
        int(config.train.steps),
        None if budget is None else float(budget),
        min_steps=int(sweep.min_steps),
        batch_multiple=int(sweep.batch_multiple),
    )


# --- the whole plan -------------------------------------------------------------------------------


def make_plan(sweep: ml_collections.ConfigDict, sweep_dir: paths.PathLike, log: TextIO = sys.stdout) -> dict[str, Any]:
    """Every job of ``sweep``; may prepare the data (space patching's mean is measured on it)."""
    sweep_dir = paths.resolve(sweep_dir)
    spec.validate_sweep(sweep)
    base = spec.load_experiment(sweep.base, "base")
    validate(base)
    if base.model_type != "blt":
        raise ConfigError(f"sweep.base: expected a BLT experiment (model_type 'blt'), got {base.model_type!r}")
    baseline = None
    if sweep.baseline:
        baseline = spec.load_experiment(sweep.baseline, "baseline")
        validate(baseline)
        if baseline.model_type != "byte_lm":
            raise ConfigError(f"sweep.baseline: expected a byte LM experiment, got model_type {baseline.model_type!r}")
    modes = list(sweep.modes)
    budget = sweep.budget_flops_per_byte
    budget_source = "sweep"
    if budget is None:
        budget = flops.analytic_flops_per_byte(base).total_forward
        budget_source = f"the base config at its patch size {flops.expected_patch_size(base):g}"
    budget = float(budget)

    data: dict[str, Any] = {
        "corpus": [] if sweep.data.path else list(sweep.data.corpus),
        "path": sweep.data.path,
        "val_fraction": float(sweep.data.val_fraction),
        "shard_bytes": int(sweep.data.shard_bytes),
    }
    space = None
    if "space" in modes:
        if sweep.space_patch_size is not None:
            space = {"mean_patch_size": float(sweep.space_patch_size), "max_patches_seen": None, "source": "sweep"}
        else:
            folder = stages.ensure_data(sweep_dir, data, log)
            probe = ml_collections.ConfigDict(base.to_dict())
            probe.patching.mode, probe.patching.threshold, probe.patching.patch_size = "space", None, None
            measured = stages.measure_patch_size(probe, folder)
            measured.pop("overflow")  # against the base's max_patches: not the space run's
            space = dict(measured, source="measured on the train split")

    jobs = []
    for mode in modes:
        if mode == "space":
            jobs.append(_blt_job(sweep, base, mode, None, space["mean_patch_size"], budget, space["max_patches_seen"]))
            continue
        for size in spec.mode_sizes(sweep, mode):
            if mode == "megabyte":
                jobs.append(_megabyte_job(sweep, base, int(size), budget))
                continue
            expected = flops.realised_static_patch_size(int(base.data.seq_len), int(size)) if mode == "static" else size
            jobs.append(_blt_job(sweep, base, mode, size, expected, budget, None))
    if baseline is not None:
        jobs.append(_byte_job(sweep, baseline, base, budget))
    tokens = None
    if sweep.get("token_baseline"):
        token_baseline = spec.load_experiment(sweep.token_baseline, "token_baseline")
        validate(token_baseline)
        if token_baseline.model_type != "token_lm":
            raise ConfigError(
                f"sweep.token_baseline: expected a token LM experiment (experiments/token_lm.py), got model_type "
                f"{token_baseline.model_type!r}"
            )
        folder = stages.ensure_data(sweep_dir, data, log)
        tokens = stages.ensure_tokens(folder, int(sweep.bpe_vocab_size), log)
        jobs.append(_token_job(sweep, token_baseline, base, budget, tokens))
    entropy = None
    if any(mode in spec.ENTROPY_MODES for mode in modes):
        experiment = None
        if sweep.entropy.config and not sweep.entropy.model:
            experiment = spec.load_experiment(sweep.entropy.config, "entropy.config")
            validate(experiment)
            experiment = experiment.to_dict()
        entropy = {
            "experiment": experiment,
            "model": sweep.entropy.model,
            "context": int(sweep.entropy.context),
            "unit": sweep.entropy.unit,
            "targets": sorted({s for m in modes if m in spec.ENTROPY_MODES for s in spec.mode_sizes(sweep, m)}),
        }
    for job in jobs:
        inputs = {"data": data}
        if job["kind"] == "token_lm":
            inputs["tokens"] = {"vocab_size": job["tokens"]["vocab_size"]}
        if job["mode"] in spec.ENTROPY_MODES:
            inputs["entropy"] = {k: v for k, v in entropy.items() if k != "targets"}
        job["hash"] = job_hash(job["kind"], job["mode"], job["patch_size"], job["config"], inputs)
        job["name"] = job_name(job["kind"], job["mode"], job["patch_size"], job["hash"])
    jobs = _with_seeds(jobs, sweep.get("seeds"))
    names = [job["name"] for job in jobs]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep: two jobs have the same config (names {sorted(names)}); remove the duplicate")

    return {
        "format": FORMAT[0],
        "version": FORMAT[1],
        "sweep": sweep.to_dict(),
        "budget": {
            "inference_flops_per_byte": budget,
            "source": budget_source,
            "train_flops": sweep.budget_train_flops,
        },
        "stages": {"data": data, "entropy": entropy, "space": space, "tokens": tokens},
        "jobs": jobs,
    }


def _with_seeds(jobs: list[dict[str, Any]], seeds: Any) -> list[dict[str, Any]]:
    """Each job once per seed (config.seed), seeds next to each other; None: the jobs as they are."""
    if seeds is None:
        return jobs
    seeded = []
    for job in jobs:
        for seed in seeds:
            copy = json.loads(canonical_json(job))
            copy["config"]["seed"] = int(seed)
            copy["seed"] = int(seed)
            copy["group"] = job["name"].rsplit("-", 1)[0]  # what the seeds of one job share (report, results)
            copy["hash"] = job_hash(copy["kind"], copy["mode"], copy["patch_size"], copy["config"], {"of": job["hash"]})
            copy["name"] = f"{copy['group']}-s{seed}-{copy['hash']}"
            seeded.append(copy)
    return seeded


# --- files ----------------------------------------------------------------------------------------


def job_file(sweep_dir: paths.PathLike, name: str) -> epath.Path:
    return paths.resolve(sweep_dir) / JOBS_DIR / f"{name}.json"


def _dump(value: Any) -> bytes:
    return (json.dumps(value, indent=1, sort_keys=True) + "\n").encode()


def write_plan(plan: Mapping[str, Any], sweep_dir: paths.PathLike, *, force: bool = False) -> epath.Path:
    """Writes plan.json, plan.md and jobs/*.json atomically; refuses to replace a different plan."""
    sweep_dir = paths.resolve(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / PLAN_FILE
    data = _dump(plan)
    if path.is_file() and path.read_bytes() != data and not force:
        old = {job["name"] for job in load_plan(sweep_dir)["jobs"]}
        new = {job["name"] for job in plan["jobs"]}
        raise PlanError(
            f"{path}: holds a different plan ({len(old ^ new)} job name(s) differ, e.g. "
            f"{sorted(old ^ new)[:2]}); use a new --out, or --force to replace it (finished runs stay in runs/)"
        )
    for job in plan["jobs"]:
        entropy_target = job["patch_size"] if job["mode"] in spec.ENTROPY_MODES else None
        record = {
            "format": JOB_FORMAT[0],
            "version": JOB_FORMAT[1],
            "name": job["name"],
            "hash": job["hash"],
            "entropy_target": entropy_target,
            "entropy_rule": "monotonic" if job["mode"] == "monotonic" else "global",
            "data": plan["stages"]["data"],
            "tokens": job.get("tokens"),  # the token baseline's folder inside the data folder
            "config": job["config"],
        }
        target = job_file(sweep_dir, job["name"])
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, _dump(record))
    write_atomic(sweep_dir / PLAN_TABLE, (format_plan(plan) + "\n").encode())
    write_atomic(path, data)
    return path


def load_plan(sweep_dir: paths.PathLike) -> dict[str, Any]:
    """plan.json of a sweep folder, checked."""
    path = paths.resolve(sweep_dir) / PLAN_FILE
    if not path.is_file():
        raise PlanError(f"{path}: no plan; write one with `python -m bltjax.sweep plan --out {sweep_dir}`")
    try:
        plan = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PlanError(f"{path}: unreadable ({err})") from err
    found = (plan.get("format"), plan.get("version")) if isinstance(plan, dict) else None
    if found != FORMAT:
        raise PlanError(f"{path}: field 'format', 'version': expected {FORMAT}, got {found}")
    return plan


# --- the table --------------------------------------------------------------------------------


def _stack_text(job: Mapping[str, Any]) -> str:
    stack = job["fitted_stack"]
    return f"{stack['n_layers']} x {stack['dim']} ({stack['n_heads']} heads)"


def format_plan(plan: Mapping[str, Any]) -> str:
    """The human-readable plan: budgets, the fitting rule's outcome per job, the schedule."""
    budget = plan["budget"]
    lines = [
        "# Sweep plan",
        "",
        f"Inference budget: {budget['inference_flops_per_byte']:.4g} forward FLOPs per byte "
        f"(docs/architecture.md §14; from "
        f"{budget['source']}). Training budget per run: "
        + (f"{budget['train_flops']:.4g} FLOPs." if budget["train_flops"] else "none (the base config's steps)."),
        "",
        "Each BLT's latent model (the byte baseline's stack) is fitted to the budget: head_dim fixed, depth/width "
        "ratio as close to the base's as the tolerance allows (bltjax/sweep/scaling.py).",
        "",
        "| name | mode | patch size (target -> expected) | latent / stack | non-embedding params | fwd FLOPs/byte "
        "| mismatch | train FLOPs/byte | steps x batch x seq_len | train FLOPs |",
        "|---|---|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for job in plan["jobs"]:
        target = "-" if job["patch_size"] is None else f"{job['patch_size']:g}"
        fit, sched, fl = job["fit"], job["schedule"], job["flops_per_byte"]
        flag = "" if fit["within_tolerance"] else " (outside tolerance)"
        lines.append(
            f"| {job['name']} | {job['mode']} | {target} -> {job['expected_patch_size']:.3g} | {_stack_text(job)} | "
            f"{job['parameters']['non_embedding']:,} | {fl['total_forward']:.4g} | "
            f"{100 * fit['mismatch']:+.1f}%{flag} | "
            f"{fl['train']:.4g} | {sched['steps']} x {sched['batch_size']} x {sched['seq_len']} | "
            f"{sched['train_flops']:.4g} |"
        )
    space = plan["stages"].get("space")
    if space:
        lines += ["", f"Space patching: mean patch {space['mean_patch_size']:.3f} tokens ({space['source']})."]
    entropy = plan["stages"].get("entropy")
    if entropy:
        source = entropy["model"] or "trained by the shared stage"
        lines += [
            "",
            f"Entropy patching: thresholds calibrated per target ({entropy['unit']}) with the entropy model {source}.",
        ]
    return "\n".join(lines)
