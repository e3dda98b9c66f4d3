"""A study's results as a Markdown page and three plots (bltjax/sweep/study.py gathers the numbers).

The page is generated, never edited by hand: its table, its verdicts and its plots come from
SWEEP/study/study.json, so rerunning the study rewrites every figure and every sentence that
depends on one. What cannot be computed (what the paper says, what the budget cannot show)
comes from the experiment file as text.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence

from etils import epath

from bltjax.runtime.atomic import write_atomic
from bltjax.sweep.study import NOISE_SIGMAS, GroupResult, Verdict, study_dir

PLOT_FINAL = "final_bpb.png"
PLOT_PATCH_SIZES = "entropy_patch_sizes.png"
PLOT_CURVES = "bpb_vs_train_flops.png"
RECORD = "study.json"


@dataclasses.dataclass(frozen=True)
class Page:
    """The text the experiment supplies around the generated parts."""

    title: str
    command: str
    setup: str  # the budget, the data, the seeds, how scores are measured
    caveats: str  # what this study cannot show
    scale_up: str  # the same study at 100M+ parameters
    date: str
    machine: str
    commit: str  # the code that wrote the page
    trained_at: tuple[str, ...] = ()  # the code its runs trained with (study.read_training_versions), if known


def _g(value: float | None, spec: str, missing: str = "–") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _label(g: GroupResult) -> str:
    names = {"byte": "byte LM", "bpe": "BPE token LM", "megabyte": "MegaByte", "space": "BLT, space patching",
             "static": "BLT, static patches", "entropy": "BLT, entropy (global)",
             "monotonic": "BLT, entropy (monotonic)"}  # fmt: skip
    return names.get(g.mode, g.mode)


def _score(g: GroupResult) -> str:
    if g.mean is None:
        return "not evaluated"
    return f"{g.mean:.4f}" if g.std is None else f"{g.mean:.4f} ± {g.std:.4f}"


def format_groups(groups: Sequence[GroupResult]) -> str:
    rows = [
        "| run | model | target / realised patch (bytes) | latent or stack | non-embedding params | inference "
        "FLOPs/byte | training FLOPs planned | spent, padding included | seeds | validation bpb, mean ± std |",
        "|---|---|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for g in groups:
        patch = f"{_g(g.patch_size, 'g')} / {_g(g.realised_patch_size, '.2f')}"
        seeds = ", ".join(str(s) for s in g.seeds) or "–"
        rows.append(
            f"| {g.group} | {_label(g)} | {patch} | {g.stack} | {g.non_embedding_parameters / 1e6:.2f}M | "
            f"{_g(g.inference_flops_per_byte, '.3g')} | {g.planned_train_flops:.3g} | {_g(g.flops_spent, '.3g')} | "
            f"{seeds} | {_score(g)} |"
        )
    return "\n".join(rows)


def format_verdicts(verdicts: Sequence[Verdict]) -> str:
    rows = [
        "| the paper | where | compared | gap (bpb) | 2 standard errors | gap > each seed spread | here |",
        "|---|---|---|---:|---:|---|---|",
    ]
    for v in verdicts:
        c = v.claim
        outside = {True: "yes", False: "no", None: "–"}[v.outside_spread]
        two_se = None if v.standard_error is None else NOISE_SIGMAS * v.standard_error
        rows.append(
            f"| {c.statement} | {c.source} | {c.better} vs {c.other} | {_g(v.gap, '+.4f')} | {_g(two_se, '.4f')} | "
            f"{outside} | **{v.status}** |"
        )
    return "\n".join(rows)


def _sentence(v: Verdict) -> str:
    c = v.claim
    if v.gap is None:
        return f"* {c.statement} ({c.source}): not measured (a group has no final score)."
    lower = c.better if v.gap < 0 else c.other
    noise = (
        "no noise estimate (one seed)"
        if v.standard_error is None
        else f"{NOISE_SIGMAS:g} standard errors are {NOISE_SIGMAS * v.standard_error:.4f}"
    )
    return (
        f"* {c.statement} ({c.source}): here {lower} is lower by {abs(v.gap):.4f} bpb; {noise}, so the result "
        f"**{v.status}** with the paper."
        if v.status in ("agrees", "disagrees")
        else f"* {c.statement} ({c.source}): here {lower} is lower by {abs(v.gap):.4f} bpb; {noise}: "
        f"**{v.status}**, no ordering can be claimed."
    )


def write_plots(groups: Sequence[GroupResult], folder: epath.Path) -> list[epath.Path]:
    """Final bpb per group (error bars = seed std), entropy bpb over patch sizes, and the mean curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    scored = [g for g in groups if g.mean is not None]
    written = []

    def save(figure, name: str) -> None:
        path = folder / name
        write_atomic(path, lambda temp: figure.savefig(temp, format="png", dpi=120, bbox_inches="tight"))
        plt.close(figure)
        written.append(path)

    figure, axis = plt.subplots(figsize=(7.5, 0.45 * len(scored) + 1.5))
    order = sorted(scored, key=lambda g: g.mean)
    axis.barh(range(len(order)), [g.mean for g in order], xerr=[g.std or 0.0 for g in order], color="tab:blue",
              alpha=0.7, capsize=3)  # fmt: skip
    axis.set_yticks(range(len(order)), [g.group for g in order], fontsize=8)
    low = min(g.mean - (g.std or 0) for g in order) if order else 0.0
    high = max(g.mean + (g.std or 0) for g in order) if order else 1.0
    axis.set_xlim(low - 0.1 * (high - low + 1e-3), high + 0.1 * (high - low + 1e-3))
    axis.set_xlabel("validation bits per byte (whole split), mean ± seed std")
    axis.set_title("At one training and one inference budget (lower is better)")
    axis.grid(True, axis="x", alpha=0.3)
    save(figure, PLOT_FINAL)

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for mode, style in (("entropy", "o-"), ("monotonic", "P--"), ("static", "^:"), ("megabyte", "v:")):
        points = sorted((g.patch_size, g.mean, g.std or 0.0) for g in scored if g.mode == mode)
        if points:
            xs, ys, es = zip(*points, strict=True)
            axis.errorbar(xs, ys, yerr=es, fmt=style, capsize=3, label=mode)
    for mode, colour in (("space", "tab:green"), ("byte", "black"), ("bpe", "dimgray")):
        for g in (g for g in scored if g.mode == mode):
            axis.axhline(g.mean, color=colour, linestyle="-.", linewidth=1, label=f"{g.group} (no patch size)")
    axis.set_xlabel("target mean patch size (bytes)")
    axis.set_ylabel("validation bits per byte, mean ± seed std")
    axis.set_title("Fixed inference budget: bigger patches, bigger latent model")
    axis.grid(True, alpha=0.3)
    if axis.lines:
        axis.legend(fontsize=7)
    save(figure, PLOT_PATCH_SIZES)

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for g in groups:
        if g.curve:
            xs, ys = zip(*g.curve, strict=True)
            axis.plot(xs, ys, marker="o", markersize=3, label=g.group)
    axis.set_xscale("log")
    axis.set_xlabel("training FLOPs spent (analytic, at the realised patch size)")
    axis.set_ylabel("validation bpb (the trainer's batches), mean over seeds")
    axis.set_title("Learning curves")
    axis.grid(True, which="both", alpha=0.3)
    if axis.lines:
        axis.legend(fontsize=7, ncol=2)
    save(figure, PLOT_CURVES)
    return written


def render(
    page: Page,
    groups: Sequence[GroupResult],
    verdicts: Sequence[Verdict],
    plots: Sequence[epath.Path],
    page_path: epath.Path,
    timing: dict[str, float],
) -> str:
    """The results page; plot links are relative to the page's folder."""
    total = sum(timing.values())
    phases = ", ".join(f"{name} {seconds / 60:.1f} min" for name, seconds in sorted(timing.items()))
    links = "\n\n".join(f"![{p.stem}]({os.path.relpath(str(p), str(page_path.parent))})" for p in plots)
    return "\n".join(
        [
            f"# {page.title}",
            "",
            "<!-- generated by the command below from its study.json; do not edit by hand -->",
            "",
            f"    {page.command}",
            "",
            f"Run on {page.date} on {page.machine} at commit {page.commit}{_trained_at(page)}; "
            f"{total / 60:.0f} min in all ({phases}).",
            "",
            "## Setup",
            "",
            page.setup,
            "",
            "## Results",
            "",
            format_groups(groups),
            "",
            links,
            "",
            "## Against the paper",
            "",
            f"A claim agrees when its gap is beyond {NOISE_SIGMAS:g} standard errors of the difference of the "
            "two means (seed standard deviations over their seed counts), disagrees when it is beyond them the "
            "other way, and is inside the seed noise otherwise. The column before last asks the stricter "
            "question of the issue: is the gap larger than either group's seed spread?",
            "",
            format_verdicts(verdicts),
            "",
            *[_sentence(v) for v in verdicts],
            "",
            "## What this cannot show",
            "",
            page.caveats,
            "",
            "## The same study at 100M+ parameters",
            "",
            page.scale_up,
            "",
        ]
    )


def _trained_at(page: Page) -> str:
    """' (runs trained at commit X)' when the runs trained at other code than the page's."""
    if not page.trained_at or tuple(page.trained_at) == (page.commit,):
        return ""
    return f" (runs trained at commit {', '.join(page.trained_at)})"


def write_page(text: str, path: epath.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text.encode())


def write_record(sweep_dir: epath.Path, page: Page, folder: epath.Path) -> epath.Path:
    """SWEEP/study/study.json with the run's date, machine, commit and command, beside the page's plots.

    The page ships in the repository but the sweep folder does not; with the numbers beside the page,
    figures quoted elsewhere (the README) are rendered from them and checked (benchmarks/tables.py)."""
    record = json.loads((study_dir(sweep_dir) / "study.json").read_text())
    run = {"date": page.date, "machine": page.machine, "commit": page.commit, "command": page.command}
    if page.trained_at:
        run["trained_at"] = list(page.trained_at)
    path = folder / RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(dict(run, **record), indent=1, allow_nan=True) + "\n").encode())
    return path
