"""The sweep's results: one row per run, from what the runs wrote, plus two plots.

Per run, read from ``runs/NAME/metrics.jsonl`` (the trainer's records) and ``launches.jsonl``:

* final validation bpb: the ``validation`` record of the final step (a run still going shows
  its latest one, marked partial);
* realised mean patch size: the ``train`` records' ``mean_patch_size`` (tokens per patch of
  the batches seen), averaged over steps;
* training FLOPs spent: the sum over logged windows of steps x batch x seq_len x the window's
  ``flops_per_byte``, which the trainer computes at the window's realised patch size;
* inference FLOPs per byte at the realised patch size (analytic forward, docs/architecture.md §14), next to the
  planned ones: entropy and space patching make them data-dependent;
* wall time: the sum of the runner's launches (start to end; a launch killed together with
  the runner counts until its log's last write).

Written next to each other in the sweep folder: ``report.md`` (markdown table), ``report.csv``,
``report.json``, ``bpb_vs_train_flops.png`` (validation bpb against training FLOPs spent, one
line per run, coloured by patch size) and ``bpb_vs_inference_flops.png`` (final bpb against
inference FLOPs per byte).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from etils import epath

from bltjax.models import flops
from bltjax.runtime import paths
from bltjax.runtime.atomic import write_atomic
from bltjax.sweep.plan import load_plan
from bltjax.sweep.runner import LAUNCHES_FILE, LOG_FILE, read_done, run_dir
from bltjax.training.metrics import METRICS_FILE, read_jsonl

REPORT_TABLE = "report.md"
REPORT_CSV = "report.csv"
REPORT_JSON = "report.json"
PLOT_TRAIN = "bpb_vs_train_flops.png"
PLOT_INFERENCE = "bpb_vs_inference_flops.png"


@dataclasses.dataclass(frozen=True)
class RunResult:
    """One row of the report."""

    name: str
    mode: str
    patch_size: float | None  # the target (None: space and byte)
    status: str  # done / partial / not started
    steps_done: int
    steps: int
    final_bpb: float | None  # validation at the final step, else the latest validation
    realised_patch_size: float | None
    planned_inference_flops_per_byte: float
    inference_flops_per_byte: float | None  # at the realised patch size
    planned_train_flops: float
    train_flops: float  # spent so far
    wall_time_s: float
    non_embedding_parameters: int
    stack: str
    group: str  # the job's name without seed and hash: runs that differ only in their seed share it
    seed: int | None  # config.seed when the sweep lists seeds
    curve: tuple[tuple[float, float], ...]  # (training FLOPs spent, validation bpb)

    def row(self) -> dict[str, Any]:
        """Flat values for the CSV and JSON (no curve)."""
        values = dataclasses.asdict(self)
        values.pop("curve")
        return values


# --- reading one run ------------------------------------------------------------------------------


def _by_step(records: Sequence[Mapping[str, Any]], split: str) -> list[dict[str, Any]]:
    latest: dict[int, dict[str, Any]] = {}
    for record in records:
        if record.get("split") == split:
            latest[int(record["step"])] = dict(record)
    return [latest[s] for s in sorted(latest)]


def _windows(train: Sequence[Mapping[str, Any]]) -> list[tuple[int, int, Mapping[str, Any]]]:
    """(first step, last step, record) of each logged window of training steps."""
    out, previous = [], 0
    for record in train:
        step = int(record["step"])
        out.append((previous, step, record))
        previous = step
    return out


def _spent(windows: Sequence[tuple[int, int, Mapping[str, Any]]], step: int, bytes_per_step: float) -> float:
    """Training FLOPs of steps 1..``step``; past the last window at its rate."""
    total, end, rate = 0.0, 0, 0.0
    for first, last, record in windows:
        rate = float(record["flops_per_byte"])
        overlap = min(last, step) - first
        if overlap > 0:
            total += overlap * bytes_per_step * rate
        end = last
    if step > end:
        total += (step - end) * bytes_per_step * rate
    return total


def wall_time(workdir: epath.Path) -> float:
    """Seconds over the runner's launches; an unfinished launch ends at the run's last log write."""
    path = workdir / LAUNCHES_FILE
    if not path.is_file():
        return 0.0
    events = read_jsonl(path)
    last_write = max((p.stat().mtime for p in (workdir / LOG_FILE, workdir / METRICS_FILE) if p.is_file()), default=0.0)
    total, start = 0.0, None
    for event in events:
        if event.get("event") == "start":
            if start is not None:  # the previous launch never reported its end
                total += max(0.0, min(last_write, float(event["time"])) - start)
            start = float(event["time"])
        elif event.get("event") == "end" and start is not None:
            total += float(event["time"]) - start
            start = None
    if start is not None:
        total += max(0.0, last_write - start)
    return total


def _stack_text(job: Mapping[str, Any]) -> str:
    stack = job["fitted_stack"]
    return f"{stack['n_layers']}x{stack['dim']}"


def gather_run(sweep_dir: epath.Path, job: Mapping[str, Any]) -> RunResult:
    """The report row of one planned job, from whatever its run folder holds."""
    workdir = run_dir(sweep_dir, job["name"])
    records = read_jsonl(workdir / METRICS_FILE) if (workdir / METRICS_FILE).is_file() else []
    train, validation = _by_step(records, "train"), _by_step(records, "validation")
    schedule = job["schedule"]
    steps = int(schedule["steps"])
    # a token LM's rows are seq_len tokens of its planned bytes per token
    bytes_per_step = float(schedule["batch_size"] * schedule["seq_len"]) * float(
        (job.get("tokens") or {}).get("bytes_per_token", 1.0)
    )
    windows = _windows(train)
    steps_done = windows[-1][1] if windows else 0
    spent = _spent(windows, steps_done, bytes_per_step) if windows else 0.0

    realised = None
    inference = None
    if job["kind"] in ("byte_lm", "megabyte") and windows:  # fixed patches: as planned
        realised = float(job["expected_patch_size"])
        inference = job["flops_per_byte"]["total_forward"]
    elif job["kind"] == "token_lm" and windows:  # FL_BPE at the bytes per token its batches had
        per_token = [
            (last - first, float(r["bytes_per_token"])) for first, last, r in windows if "bytes_per_token" in r
        ]
        measured = sum(n * b for n, b in per_token) / max(sum(n for n, _ in per_token), 1)
        config = ml_collections.ConfigDict(job["config"])
        inference = flops.analytic_flops_per_byte(config, bytes_per_token=measured or None).total_forward
    elif windows and all("mean_patch_size" in w[2] for w in windows):
        realised = sum((last - first) * float(r["mean_patch_size"]) for first, last, r in windows) / steps_done
        config = ml_collections.ConfigDict(job["config"])
        inference = flops.analytic_flops_per_byte(config, mean_patch_size=realised).total_forward

    final = [r for r in validation if int(r["step"]) == steps]
    latest = final[-1] if final else (validation[-1] if validation else None)
    if read_done(sweep_dir, job) is not None:
        status = "done"
    elif records:
        status = f"partial (step {steps_done}/{steps})"
    else:
        status = "not started"
    curve = tuple((_spent(windows, int(r["step"]), bytes_per_step), float(r["bpb"])) for r in validation)
    return RunResult(
        name=job["name"],
        mode=job["mode"],
        group=job.get("group", job["name"].rsplit("-", 1)[0]),
        seed=job.get("seed"),
        patch_size=job["patch_size"],
        status=status,
        steps_done=steps_done,
        steps=steps,
        final_bpb=None if latest is None else float(latest["bpb"]),
        realised_patch_size=realised,
        planned_inference_flops_per_byte=float(job["flops_per_byte"]["total_forward"]),
        inference_flops_per_byte=inference,
        planned_train_flops=float(schedule["train_flops"]),
        train_flops=spent,
        wall_time_s=wall_time(workdir),
        non_embedding_parameters=int(job["parameters"]["non_embedding"]),
        stack=_stack_text(job),
        curve=curve,
    )


def gather(sweep_dir: paths.PathLike) -> list[RunResult]:
    """One `RunResult` per job of the plan, in plan order."""
    sweep_dir = paths.resolve(sweep_dir)
    return [gather_run(sweep_dir, job) for job in load_plan(sweep_dir)["jobs"]]


# --- writing ----------------------------------------------------------------------------------


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s"


def format_table(results: Sequence[RunResult], budget: float) -> str:
    """The markdown table of report.md."""
    lines = [
        "# Sweep report",
        "",
        f"Inference budget: {budget:.4g} forward FLOPs per byte. bpb: validation bits per byte at the final step "
        "(partial runs: their latest). Realised figures use the mean patch size of the batches the run trained on.",
        "",
        "| run | mode | target patch | realised patch | latent / stack | non-embedding params | inference FLOPs/byte "
        "(planned -> realised) | train FLOPs (planned / spent) | steps | final val bpb | wall time | status |",
        "|---|---|---:|---:|---|---:|---|---|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.mode} | {_num(r.patch_size, 'g')} | {_num(r.realised_patch_size, '.2f')} | {r.stack} | "
            f"{r.non_embedding_parameters:,} | {r.planned_inference_flops_per_byte:.3e} -> "
            f"{_num(r.inference_flops_per_byte, '.3e')} | {r.planned_train_flops:.3e} / {r.train_flops:.3e} | "
            f"{r.steps_done}/{r.steps} | {_num(r.final_bpb, '.4f')} | {_duration(r.wall_time_s)} | {r.status} |"
        )
    return "\n".join(lines) + "\n"


def format_csv(results: Sequence[RunResult]) -> str:
    buffer = io.StringIO()
    rows = [r.row() for r in results]
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["name"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _label(r: RunResult) -> str:
    if r.mode == "byte":
        return "byte baseline"
    if r.mode == "bpe":
        return "BPE token baseline"
    size = f"{r.patch_size:g}" if r.patch_size is not None else f"~{_num(r.realised_patch_size, '.1f')}"
    return f"{r.mode} ps {size}"


_STYLES = {"entropy": ("-", "o"), "monotonic": ("-", "P"), "space": (":", "s"), "static": ("--", "^"),
           "megabyte": ("--", "v"), "byte": ("-.", "D"), "bpe": ("-.", "x")}  # fmt: skip


def _colour(r: RunResult, sizes: list[float]):
    import matplotlib

    if r.mode in ("byte", "bpe"):
        return "black" if r.mode == "byte" else "dimgray"
    size = r.patch_size if r.patch_size is not None else (r.realised_patch_size or 0.0)
    colours = matplotlib.colormaps["viridis"]
    rank = sorted(set(sizes + [size])).index(size)
    return colours(0.1 + 0.75 * rank / max(1, len(set(sizes + [size])) - 1))


def _save(figure, path: epath.Path) -> None:
    write_atomic(path, lambda temp: figure.savefig(temp, format="png", dpi=120, bbox_inches="tight"))


def write_plots(results: Sequence[RunResult], sweep_dir: epath.Path, budget: float) -> list[epath.Path]:
    """The two PNGs of the module docstring; runs without validation points are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r.patch_size for r in results if r.patch_size is not None]
    written = []
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for r in results:
        if not r.curve:
            continue
        line, marker = _STYLES.get(r.mode, ("-", "o"))
        xs, ys = zip(*r.curve, strict=True)
        axis.plot(xs, ys, linestyle=line, marker=marker, color=_colour(r, sizes), label=_label(r))
    axis.set_xscale("log")
    axis.set_xlabel("training FLOPs spent")
    axis.set_ylabel("validation bits per byte")
    axis.set_title(f"bpb vs training FLOPs (inference budget {budget:.3g} FLOPs/byte)")
    axis.grid(True, which="both", alpha=0.3)
    if axis.lines:
        axis.legend(fontsize=8)
    written.append(sweep_dir / PLOT_TRAIN)
    _save(figure, written[-1])
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for r in results:
        if r.final_bpb is None or r.inference_flops_per_byte is None:
            continue
        _, marker = _STYLES.get(r.mode, ("-", "o"))
        done = r.status == "done"
        colour = _colour(r, sizes)
        axis.scatter(
            [r.inference_flops_per_byte],
            [r.final_bpb],
            marker=marker,
            s=60,
            facecolors=colour if done else "none",
            edgecolors=colour,
        )
        axis.annotate(
            _label(r) + ("" if done else " (partial)"),
            (r.inference_flops_per_byte, r.final_bpb),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=7,
        )
    axis.axvline(budget, color="grey", linestyle=":", linewidth=1, label=f"inference budget {budget:.3g}")
    axis.legend(fontsize=8)
    axis.set_xlabel("inference FLOPs per byte (forward, at the realised patch size)")
    axis.set_ylabel("final validation bits per byte")
    axis.set_title("bpb vs inference FLOPs per byte")
    axis.grid(True, alpha=0.3)
    written.append(sweep_dir / PLOT_INFERENCE)
    _save(figure, written[-1])
    plt.close(figure)
    return written


def write_report(sweep_dir: paths.PathLike) -> dict[str, epath.Path]:
    """Gathers every run and writes the table, CSV, JSON and plots into the sweep folder."""
    sweep_dir = paths.resolve(sweep_dir)
    plan = load_plan(sweep_dir)
    budget = float(plan["budget"]["inference_flops_per_byte"])
    results = gather(sweep_dir)
    files = {
        "table": sweep_dir / REPORT_TABLE,
        "csv": sweep_dir / REPORT_CSV,
        "json": sweep_dir / REPORT_JSON,
    }
    write_atomic(files["table"], format_table(results, budget).encode())
    write_atomic(files["csv"], format_csv(results).encode())
    payload = {"budget": plan["budget"], "runs": [dict(r.row(), curve=[list(p) for p in r.curve]) for r in results]}
    write_atomic(files["json"], (json.dumps(payload, indent=1) + "\n").encode())
    train_plot, inference_plot = write_plots(results, sweep_dir, budget)
    files.update(train_plot=train_plot, inference_plot=inference_plot)
    return files
