"""experiments/paper_ordering.py and the study it runs (bltjax/sweep/study.py, study_report.py):
seeds put together, claims judged against the seed noise, the page written from the numbers."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import pathlib

import pytest
from test_sweep import TINY_SWEEP

from bltjax.models import flops
from bltjax.sweep import plan, spec, study, study_report
from bltjax.sweep.study import Claim, GroupResult

REPO = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "experiments" / "paper_ordering.py"


def _experiment():
    module_spec = importlib.util.spec_from_file_location("paper_ordering", EXPERIMENT)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _group(name: str, bpb: tuple[float, ...], mode: str = "entropy") -> GroupResult:
    return GroupResult(
        group=name, mode=mode, patch_size=6.0, seeds=tuple(range(len(bpb))), bpb=bpb, realised_patch_size=6.1,
        inference_flops_per_byte=1e6, planned_train_flops=2e12, flops_spent=2.2e12, non_embedding_parameters=10**6,
        stack="5 x 192", wall_time_s=60.0,
    )  # fmt: skip


def test_seed_statistics_are_the_sample_mean_and_std():
    g = _group("a", (3.0, 3.1, 3.2))
    assert g.mean == pytest.approx(3.1)
    assert g.std == pytest.approx(0.1)  # n - 1 in the denominator
    assert _group("b", (3.0,)).std is None and _group("c", ()).mean is None


@pytest.mark.parametrize(
    "better, other, status",
    [
        ((3.00, 3.01, 3.02), (3.20, 3.21, 3.22), "agrees"),  # gap -0.2, 2 se ~ 0.016
        ((3.20, 3.21, 3.22), (3.00, 3.01, 3.02), "disagrees"),
        ((3.00, 3.10, 3.20), (3.05, 3.15, 3.25), "inside the seed noise"),  # gap -0.05, 2 se ~ 0.16
        ((3.0,), (3.2,), "one seed: no noise estimate"),
        ((), (3.2, 3.3), "not measured"),
    ],
)
def test_a_claim_is_judged_against_two_standard_errors(better, other, status):
    claim = Claim("k", "a beats b", "somewhere", "a", "b")
    verdict = study.judge(claim, {"a": _group("a", better), "b": _group("b", other)})
    assert verdict.status == status
    if len(better) >= 2 and len(other) >= 2:
        se = math.sqrt(_group("a", better).std ** 2 / 3 + _group("b", other).std ** 2 / 3)
        assert verdict.standard_error == pytest.approx(se)
        assert verdict.gap == pytest.approx(sum(better) / 3 - sum(other) / 3)
    assert study.judge(Claim("k", "s", "w", "a", "missing"), {"a": _group("a", better)}).status == "not measured"


def test_the_page_is_written_from_the_numbers(tmp_path):
    groups = [_group("entropy-ps6", (2.90, 2.91, 2.92)), _group("static-ps6", (3.10, 3.11, 3.12), mode="static")]
    claim = Claim("k", "Entropy beats static", "arXiv 2412.09871, §2", "entropy-ps6", "static-ps6")
    verdicts = [study.judge(claim, {g.group: g for g in groups})]
    plots = study_report.write_plots(groups, tmp_path / "results")
    assert [p.name for p in plots] == [study_report.PLOT_FINAL, study_report.PLOT_PATCH_SIZES, study_report.PLOT_CURVES]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in plots)
    page = study_report.Page("T", "python x", "setup text", "caveat text", "scale text", "2026-12-04", "2 cores", "abc")
    text = study_report.render(page, groups, verdicts, plots, tmp_path / "results.md", {"training": 600.0})
    assert "| entropy-ps6 | BLT, entropy (global) | 6 / 6.10 | 5 x 192 | 1.00M |" in text
    assert "2.9100 ± 0.0100" in text and "3.1100 ± 0.0100" in text
    assert "| Entropy beats static | arXiv 2412.09871, §2 | entropy-ps6 vs static-ps6 | -0.2000 |" in text
    assert "**agrees** with the paper" in text
    assert "![final_bpb](results/final_bpb.png)" in text
    assert "10 min in all (training 10.0 min)" in text
    assert "at commit abc; 10 min in all" in text  # trained at an unknown commit: nothing more to say
    # A page written at other code than its runs trained with names both.
    later = dataclasses.replace(page, commit="def", trained_at=("abc", "0a1"))
    text = study_report.render(later, groups, verdicts, plots, tmp_path / "results.md", {"training": 600.0})
    assert "at commit def (runs trained at commit abc, 0a1); 10 min in all" in text
    same = dataclasses.replace(page, trained_at=("abc",))
    text = study_report.render(same, groups, verdicts, plots, tmp_path / "results.md", {"training": 600.0})
    assert "at commit abc; 10 min in all" in text


def test_the_default_study_plans_every_model_at_one_budget_with_three_seeds(tmp_path):
    sweep = spec.load_sweep(f"{EXPERIMENT}:default")
    sweep.space_patch_size = 6.26  # the data's mean (measured when unset; kept fixed here to stay fast)
    sweep.token_baseline = ""  # the BPE stage trains a tokenizer; its job is tested in tests/test_token_lm.py
    jobs = plan.make_plan(sweep, tmp_path / "po")["jobs"]
    groups = {}
    for job in jobs:
        groups.setdefault(job["group"], []).append(job["seed"])
    assert groups == {
        name: [0, 1, 2]
        for name in (
            "entropy-ps4",
            "entropy-ps6",
            "entropy-ps8",
            "monotonic-ps6",
            "space",
            "static-ps6",
            "megabyte-ps6",
            "byte",
        )  # fmt: skip
    }
    for job in jobs:  # matched inference and training FLOPs
        assert abs(job["flops_per_byte"]["total_forward"] / 1.0e6 - 1) <= 0.05
        assert job["schedule"]["train_flops"] == pytest.approx(float(sweep.budget_train_flops), rel=0.01)
        if job["kind"] == "blt":
            assert job["config"]["data"]["rows"] == "packed"
    claimed = {name for c in _experiment().claims() for name in (c.better, c.other)}
    assert claimed <= set(groups) | {"bpe"}


def test_the_gpu_study_plans_100m_models(tmp_path):
    """The scale-up config of docs/results.md: every BLT's latent model has 100M+ parameters."""
    sweep = spec.load_sweep(f"{EXPERIMENT}:gpu")
    sweep.space_patch_size = 4.5
    sweep.token_baseline = ""
    made = plan.make_plan(sweep, tmp_path / "gpu")
    blts = [job for job in made["jobs"] if job["kind"] == "blt"]
    assert blts and all(job["parameters"]["global"] >= 100e6 for job in blts)
    base = _experiment().get_config("blt_gpu")
    assert made["budget"]["inference_flops_per_byte"] == pytest.approx(
        flops.analytic_flops_per_byte(base).total_forward
    )
    assert all(job["config"]["data"]["seq_len"] == 4096 for job in blts)


def test_the_gpu_study_needs_a_data_folder(capsys):
    assert _experiment().main(["--variant", "gpu"]) == 1
    assert "--data: expected a prepared data folder for the gpu study" in capsys.readouterr().err


@pytest.mark.slow
def test_a_study_trains_every_seed_scores_it_and_writes_the_page(tmp_path):
    """The study's machinery end to end on a tiny sweep (two groups, two seeds, two jobs at a time): each run
    trains, is scored over the whole validation split, the seeds are put together and judged, and a relaunch
    redoes nothing. (The paper_ordering plan itself: the tests above; its smoke study: docs/results.md.)"""
    sweep_file = tmp_path / "tiny_sweep.py"
    sweep_file.write_text(TINY_SWEEP)  # static BLT at 4 and the byte LM, 40 steps of 8 x 64 bytes
    sweep = spec.load_sweep(str(sweep_file))
    sweep.seeds, sweep.evals = [0, 1], 2
    out = tmp_path / "study_sweep"
    made = plan.make_plan(sweep, out)
    plan.write_plan(made, out)
    assert study.train_all(out, parallel=2, version="abc1234") == [] and study.evaluate_all(out, parallel=2) == []
    assert study.read_training_versions(out) == ["abc1234"]
    claim = Claim("k", "a BLT beats the byte LM", "nowhere", "static-ps4", "byte")
    groups, verdicts = study.write_study(out, [claim])
    assert [(g.group, g.seeds) for g in groups] == [("static-ps4", (0, 1)), ("byte", (0, 1))]
    for g in groups:
        for seed, bpb in zip(g.seeds, g.bpb, strict=True):
            evaluation = json.loads(next((out / "study" / "eval").glob(f"{g.group}-s{seed}-*.json")).read_text())
            assert evaluation["split"] == "validation" and evaluation["bpb_bytes"] == bpb
        assert g.bpb[0] != g.bpb[1]  # the seeds differ (initialisation and data order)
        assert g.flops_spent is not None and g.flops_spent > 0 and len(g.curve) == 2
    assert verdicts[0].status in ("agrees", "disagrees", "inside the seed noise")
    assert verdicts[0].gap == pytest.approx(groups[0].mean - groups[1].mean)
    record = json.loads((out / "study" / "study.json").read_text())
    assert record["claims"][0]["status"] == verdicts[0].status and set(record["timing"]) >= {"stages", "training"}
    page = study_report.Page("t", "python x.py", "", "", "", "2026-12-04 09:00 UTC", "2 CPU cores", "abc1234")
    published = json.loads(study_report.write_record(out, page, tmp_path / "results").read_text())
    assert published == dict(record, date=page.date, machine=page.machine, commit="abc1234", command="python x.py")
    trained = record["timing"]["training"]
    assert study.train_all(out, parallel=2, version="def5678") == [] and study.evaluate_all(out, parallel=2) == []
    assert study.read_timing(out)["training"] - trained < 2.0  # every run was done: nothing started
    assert study.read_training_versions(out) == ["abc1234"]  # so the runs still trained at the first version


def test_the_committed_results_page_matches_its_study_json():
    """docs/results.md is written whole from docs/results/study.json: its tables, verdict sentences and
    run line render again from that JSON, so a number edited by hand in either one fails here."""
    record = json.loads((REPO / "docs" / "results" / "study.json").read_text())
    groups = [
        GroupResult(**{k: tuple(v) if isinstance(v, list) else v for k, v in g.items() if k not in ("mean", "std")})
        for g in record["groups"]
    ]
    verdicts = [
        study.Verdict(
            Claim(v["key"], v["statement"], v["source"], v["better"], v["other"]),
            v["gap"],
            v["standard_error"],
            v["outside_spread"],
            v["status"],
        )
        for v in record["claims"]
    ]
    page = (REPO / "docs" / "results.md").read_text()
    assert study_report.format_groups(groups) in page
    assert study_report.format_verdicts(verdicts) in page
    for verdict in verdicts:
        assert study_report._sentence(verdict) in page
    total = sum(record["timing"].values()) / 60
    writer = study_report.Page("", record["command"], "", "", "", record["date"], record["machine"], record["commit"],
                               tuple(record.get("trained_at", ())))  # fmt: skip
    trained = study_report._trained_at(writer)
    run = f"Run on {record['date']} on {record['machine']} at commit {record['commit']}{trained}; {total:.0f} min"
    assert run in page
    assert f"    {record['command']}\n" in page
