"""A seeded study on top of a sweep: run every job, score it on the whole validation split,
put the seeds of each job together, and test named claims against the seed noise.

A sweep answers "which run has the lowest bpb"; a study answers "is that gap larger than what
another seed would give". It adds to the sweep folder:

    SWEEP/study/logs/NAME.log          each job's training output (the pool runs several at once)
    SWEEP/study/eval/NAME.json         `bltjax.eval` of the final checkpoint over the whole validation split
    SWEEP/study/study.json             per group (a job's seeds): mean, std, FLOPs, patch sizes; the claims
    SWEEP/study/timing.json            wall time of each phase, summed over relaunches
    SWEEP/study/trained_at.json        the code versions (commits) any job trained at, in order

Each job is its own ``python -m bltjax.sweep run SWEEP --only NAME`` process, so the sweep's
resume rules hold (a finished job is skipped, a killed one continues from its checkpoint) and
a study relaunched after a kill redoes nothing that is complete.

Scores are the paper's bits per byte (`bpb_bytes`: nats over byte targets / (ln 2 x bytes),
docs/architecture.md §11) over every byte of the validation split, the same bytes for every
model, so the seeds' spread is the models' and not a sampling of batches.

A claim compares two groups. With means m, standard deviations s and n seeds each, the gap
d = m_expected_better - m_other and its standard error se = sqrt(s_a^2/n_a + s_b^2/n_b); the
verdict is "agrees" when d < -2 se, "disagrees" when d > 2 se and "inside the seed noise"
otherwise (about a 95% two-sided test for normal seeds; with 3 seeds it is a rough guide, which
the results say).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from etils import epath

from bltjax.runtime import paths
from bltjax.runtime.atomic import write_atomic
from bltjax.sweep.plan import load_plan
from bltjax.sweep.report import RunResult, gather
from bltjax.sweep.runner import read_done, run_dir
from bltjax.training.metrics import METRICS_FILE, read_jsonl

STUDY_DIR = "study"
NOISE_SIGMAS = 2.0  # a gap counts when it is larger than this many standard errors


@dataclasses.dataclass(frozen=True)
class Claim:
    """One ordering the paper reports: ``better`` should reach a lower bpb than ``other``."""

    key: str
    statement: str  # what the paper says, in our words
    source: str  # where: arXiv 2412.09871 section / figure / table
    better: str  # group names (a job's name without seed and hash: 'entropy-ps6', 'bpe', 'byte')
    other: str


@dataclasses.dataclass(frozen=True)
class GroupResult:
    """The seeds of one job, together."""

    group: str
    mode: str
    patch_size: float | None
    seeds: tuple[int, ...]
    bpb: tuple[float, ...]  # one per seed with a final evaluation
    realised_patch_size: float | None  # mean over seeds
    inference_flops_per_byte: float | None  # analytic forward, at the realised patch size (mean over seeds)
    planned_train_flops: float
    flops_spent: float | None  # per run, padding included (the trainer's flops_spent_total), mean over seeds
    non_embedding_parameters: int
    stack: str
    wall_time_s: float  # summed over seeds
    # (training FLOPs spent, validation bpb) at each validation point, mean over the seeds that reached it;
    # the trainer's validation (config.train.eval_batches batches), not the final whole-split score
    curve: tuple[tuple[float, float], ...] = ()

    @property
    def mean(self) -> float | None:
        return sum(self.bpb) / len(self.bpb) if self.bpb else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation (n - 1); None below two seeds."""
        if len(self.bpb) < 2:
            return None
        mean = self.mean
        return math.sqrt(sum((x - mean) ** 2 for x in self.bpb) / (len(self.bpb) - 1))


@dataclasses.dataclass(frozen=True)
class Verdict:
    claim: Claim
    gap: float | None  # mean(better) - mean(other); negative = the paper's ordering
    standard_error: float | None
    outside_spread: bool | None  # |gap| larger than both groups' seed std (the issue's bar)
    status: str  # agrees / disagrees / inside the seed noise / not measured


def study_dir(sweep_dir: paths.PathLike) -> epath.Path:
    return paths.resolve(sweep_dir) / STUDY_DIR


# --- running ----------------------------------------------------------------------------------------


def run_pool(commands: Sequence[tuple[str, list[str], epath.Path]], parallel: int, log: Any = sys.stdout) -> list[str]:
    """Runs (label, argv, log file) commands, at most ``parallel`` at once; returns the labels that failed."""
    waiting, running, failed = list(commands), [], []
    while waiting or running:
        while waiting and len(running) < parallel:
            label, argv, log_path = waiting.pop(0)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(log_path, "ab")  # noqa: SIM115 - closed when the process ends, below
            print(f"study: start {label} (log {log_path})", file=log, flush=True)
            running.append((label, subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT), handle))
        time.sleep(0.5)
        for entry in list(running):
            label, process, handle = entry
            if process.poll() is None:
                continue
            handle.close()
            running.remove(entry)
            status = "done" if process.returncode == 0 else f"FAILED (exit {process.returncode})"
            print(f"study: {status}: {label}", file=log, flush=True)
            if process.returncode != 0:
                failed.append(label)
    return failed


def _add_time(sweep_dir: epath.Path, phase: str, seconds: float) -> None:
    path = study_dir(sweep_dir) / "timing.json"
    timing = json.loads(path.read_text()) if path.is_file() else {}
    timing[phase] = timing.get(phase, 0.0) + seconds
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(timing, indent=1, sort_keys=True) + "\n").encode())


def _timed(sweep_dir: epath.Path, phase: str, work: Callable[[], Any]) -> Any:
    start = time.monotonic()
    try:
        return work()
    finally:
        _add_time(sweep_dir, phase, time.monotonic() - start)


def _note_training_version(sweep_dir: epath.Path, version: str) -> None:
    """Adds ``version`` to SWEEP/study/trained_at.json: a page written later (the page's own commit)
    still names the code its runs trained with, and a study resumed across commits names each."""
    path = study_dir(sweep_dir) / "trained_at.json"
    versions = json.loads(path.read_text()) if path.is_file() else []
    if version not in versions:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, (json.dumps([*versions, version]) + "\n").encode())


def read_training_versions(sweep_dir: paths.PathLike) -> list[str]:
    path = study_dir(sweep_dir) / "trained_at.json"
    return json.loads(path.read_text()) if path.is_file() else []


def train_all(sweep_dir: paths.PathLike, parallel: int, log: Any = sys.stdout, version: str = "") -> list[str]:
    """The shared stages once, then every unfinished job as its own sweep process; returns failed jobs.

    ``version`` (a commit) is noted in SWEEP/study/trained_at.json when any job is left to train."""
    sweep_dir = paths.resolve(sweep_dir)
    python = [sys.executable, "-m", "bltjax.sweep", "run", str(sweep_dir)]
    failed = _timed(
        sweep_dir, "stages", lambda: run_pool([("shared stages", python + ["--stages-only"],
                                                study_dir(sweep_dir) / "logs" / "stages.log")], 1, log)
    )  # fmt: skip
    if failed:
        return failed
    jobs = [job for job in load_plan(sweep_dir)["jobs"] if read_done(sweep_dir, job) is None]
    commands = [(job["name"], python + ["--only", job["name"]], study_dir(sweep_dir) / "logs" / f"{job['name']}.log")
                for job in jobs]  # fmt: skip
    if commands and version:
        _note_training_version(sweep_dir, version)
    return _timed(sweep_dir, "training", lambda: run_pool(commands, parallel, log))


def eval_path(sweep_dir: paths.PathLike, name: str) -> epath.Path:
    return study_dir(sweep_dir) / "eval" / f"{name}.json"


def evaluate_all(sweep_dir: paths.PathLike, parallel: int, log: Any = sys.stdout) -> list[str]:
    """`bltjax.eval` of every finished job's final checkpoint over the whole validation split."""
    sweep_dir = paths.resolve(sweep_dir)
    commands = []
    for job in load_plan(sweep_dir)["jobs"]:
        workdir = run_dir(sweep_dir, job["name"])
        if read_done(sweep_dir, job) is None or eval_path(sweep_dir, job["name"]).is_file():
            continue
        data = json.loads((workdir / "config.json").read_text())["data"]["path"]  # token LMs: their token folder
        argv = [sys.executable, "-m", "bltjax.eval", "--model", str(workdir), "--data", data,
                "--out", str(eval_path(sweep_dir, job["name"]))]  # fmt: skip
        commands.append((f"eval {job['name']}", argv, study_dir(sweep_dir) / "logs" / f"{job['name']}.eval.log"))
    return _timed(sweep_dir, "evaluation", lambda: run_pool(commands, parallel, log))


# --- putting seeds together -------------------------------------------------------------------------


def _flops_spent(workdir: epath.Path) -> float | None:
    """The trainer's padding-inclusive FLOPs of the last logged step (bltjax/training/padding.py)."""
    path = workdir / METRICS_FILE
    if not path.is_file():
        return None
    spent = [r["flops_spent_total"] for r in read_jsonl(path) if r.get("split") == "train" and "flops_spent_total" in r]
    return float(spent[-1]) if spent else None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _mean_curve(curves: Sequence[Sequence[tuple[float, float]]]) -> tuple[tuple[float, float], ...]:
    """Point i of the mean curve averages point i of every seed's curve that has one (same schedule)."""
    length = max((len(c) for c in curves), default=0)
    points = []
    for i in range(length):
        here = [c[i] for c in curves if len(c) > i]
        points.append((sum(x for x, _ in here) / len(here), sum(y for _, y in here) / len(here)))
    return tuple(points)


def gather_groups(sweep_dir: paths.PathLike) -> list[GroupResult]:
    """One `GroupResult` per group, in plan order, from the final evaluations that exist."""
    sweep_dir = paths.resolve(sweep_dir)
    by_group: dict[str, list[RunResult]] = {}
    for result in gather(sweep_dir):
        by_group.setdefault(result.group, []).append(result)
    groups = []
    for group, runs in by_group.items():
        scored = [(r, json.loads(eval_path(sweep_dir, r.name).read_text())) for r in runs
                  if eval_path(sweep_dir, r.name).is_file()]  # fmt: skip
        spent = [s for s in (_flops_spent(run_dir(sweep_dir, r.name)) for r, _ in scored) if s is not None]
        realised = [r.realised_patch_size for r, _ in scored if r.realised_patch_size is not None]
        inference = [r.inference_flops_per_byte for r, _ in scored if r.inference_flops_per_byte is not None]
        first = runs[0]
        groups.append(
            GroupResult(
                group=group,
                mode=first.mode,
                patch_size=first.patch_size,
                seeds=tuple(r.seed if r.seed is not None else 0 for r, _ in scored),
                bpb=tuple(float(e["bpb_bytes"]) for _, e in scored),
                realised_patch_size=_mean(realised),
                inference_flops_per_byte=_mean(inference) or first.planned_inference_flops_per_byte,
                planned_train_flops=first.planned_train_flops,
                flops_spent=_mean(spent),
                non_embedding_parameters=first.non_embedding_parameters,
                stack=first.stack,
                wall_time_s=sum(r.wall_time_s for r in runs),
                curve=_mean_curve([r.curve for r in runs]),
            )
        )
    return groups


def judge(claim: Claim, groups: Mapping[str, GroupResult]) -> Verdict:
    """The claim's verdict under the rule of the module docstring."""
    better, other = groups.get(claim.better), groups.get(claim.other)
    if better is None or other is None or better.mean is None or other.mean is None:
        return Verdict(claim, None, None, None, "not measured")
    gap = better.mean - other.mean
    if better.std is None or other.std is None:
        return Verdict(claim, gap, None, None, "one seed: no noise estimate")
    se = math.sqrt(better.std**2 / len(better.bpb) + other.std**2 / len(other.bpb))
    outside = abs(gap) > max(better.std, other.std)
    if gap < -NOISE_SIGMAS * se:
        status = "agrees"
    elif gap > NOISE_SIGMAS * se:
        status = "disagrees"
    else:
        status = "inside the seed noise"
    return Verdict(claim, gap, se, outside, status)


def write_study(sweep_dir: paths.PathLike, claims: Sequence[Claim]) -> tuple[list[GroupResult], list[Verdict]]:
    """Gathers the groups, judges the claims and writes SWEEP/study/study.json."""
    sweep_dir = paths.resolve(sweep_dir)
    groups = gather_groups(sweep_dir)
    verdicts = [judge(c, {g.group: g for g in groups}) for c in claims]
    record = {
        "groups": [dict(dataclasses.asdict(g), mean=g.mean, std=g.std) for g in groups],
        "claims": [
            dict(
                dataclasses.asdict(v.claim),
                gap=v.gap,
                standard_error=v.standard_error,
                outside_spread=v.outside_spread,
                status=v.status,
            )
            for v in verdicts
        ],  # fmt: skip
        "timing": read_timing(sweep_dir),
    }
    path = study_dir(sweep_dir) / "study.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(record, indent=1, allow_nan=True) + "\n").encode())
    return groups, verdicts


def read_timing(sweep_dir: paths.PathLike) -> dict[str, float]:
    path = study_dir(sweep_dir) / "timing.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
