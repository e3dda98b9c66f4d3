"""Sweeps: the budget rules, plan determinism, launch commands, and a tiny sweep that is killed,
resumed and reported (runs `python -m bltjax.sweep run` in subprocesses, as a user does)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import pytest

from bltjax.config import ConfigError, load_config, model_config
from bltjax.models import flops
from bltjax.models.configs import TransformerConfig
from bltjax.sweep import job_config, launchers, plan, runner, scaling, spec, stages
from bltjax.sweep.__main__ import main as sweep_main
from bltjax.training.metrics import read_jsonl

REPO = pathlib.Path(__file__).resolve().parents[1]

TINY_SWEEP = """
from ml_collections import ConfigDict
from bltjax.config import base_blt_config, base_byte_lm_config, stack_config


def _train(config):
    config.data.seq_len = 64
    config.data.batch_size = 8
    config.train.steps = 40
    config.train.log_every = 1
    config.train.eval_batches = 1
    config.train.async_checkpoint = False
    config.optimizer.warmup_steps = 2
    config.optimizer.learning_rate = 3e-3
    return config


def blt():
    config = base_blt_config()
    config.model.encoder = stack_config(32, 1, 2, window=16)
    config.model.latent = stack_config(64, 1, 2)
    config.model.decoder = stack_config(32, 1, 2, window=16)
    config.model.hash_sizes = [3]
    config.model.hash_vocab = 256
    config.patching.mode = "static"
    config.patching.threshold = None
    config.patching.patch_size = 4.0
    config.data.max_patches = 17
    return _train(config)


def byte():
    config = base_byte_lm_config()
    config.model.stack = stack_config(32, 1, 2)
    return _train(config)


def get_config(arg=None):
    return {"blt": blt, "byte": byte}[arg or "blt"]()


def get_sweep(arg=None):
    sweep = ConfigDict(dict(
        base=__file__ + ":blt",
        baseline=__file__ + ":byte",
        modes=["static"],
        patch_sizes=[4.0],
        evals=4,
        data=dict(corpus=["jargon_file_4.4.7_appendix_a.txt", "zh_tang_song_poems.jsonl"], val_fraction=0.1,
                  shard_bytes=64 * 1024),
    ))
    if arg == "wide":  # static and space at two sizes, a training budget, no baseline
        sweep.modes = ["static", "space"]
        sweep.patch_sizes = [4.0, 8.0]
        sweep.baseline = ""
        sweep.budget_flops_per_byte = 2.0e5
        sweep.budget_train_flops = 3.0e10
    return sweep
"""


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("sweep_def") / "tiny_sweep.py"
    path.write_text(TINY_SWEEP)
    return path


# --- the budget rules -----------------------------------------------------------------------------


def _blt_cost(record, seq_len: int, n_p: float):
    def cost(stack: TransformerConfig) -> float:
        candidate = dataclasses.replace(record, latent=stack)
        return flops.blt_flops_per_byte(candidate, context_bytes=seq_len, mean_patch_size=n_p).total_forward

    return cost


def test_larger_patches_buy_a_larger_latent_at_the_same_budget():
    record = model_config(load_config(str(REPO / "experiments" / "patch_sweep.py:blt")))
    budget = 1.0e6
    fits = {n_p: scaling.fit_stack(record.latent, _blt_cost(record, 256, n_p), budget) for n_p in (4.0, 6.0, 8.0)}
    latent_params = []
    for n_p, fit in fits.items():
        assert fit.within_tolerance and abs(fit.mismatch) <= 0.05, (n_p, fit)
        assert fit.stack.resolved_head_dim == record.latent.resolved_head_dim  # head_dim kept
        assert fit.flops_per_byte == _blt_cost(record, 256, n_p)(fit.stack)  # the reported FLOPs are the fit's
        latent_params.append(flops.block_parameters(fit.stack) * fit.stack.n_layers)
    assert latent_params == sorted(latent_params) and latent_params[-1] > 1.5 * latent_params[0]


def test_fit_prefers_the_base_shape_and_keeps_grouped_heads():
    record = model_config(load_config(str(REPO / "experiments" / "patch_sweep.py:blt")))
    cost = _blt_cost(record, 256, 4.0)
    same = scaling.fit_stack(record.latent, cost, cost(record.latent))
    assert same.stack == record.latent and same.mismatch == 0.0  # the base's own budget gives the base back
    grouped = dataclasses.replace(record.latent, n_heads=6, n_kv_heads=2)
    fit = scaling.fit_stack(grouped, cost, 2.0e6)
    assert fit.stack.n_heads % 3 == 0 and fit.stack.n_kv_heads == fit.stack.n_heads // 3


def test_budget_below_the_local_modules_is_refused():
    record = model_config(load_config(str(REPO / "experiments" / "patch_sweep.py:blt")))
    with pytest.raises(scaling.BudgetError, match="budget_flops_per_byte: 1e\\+05 is below the cheapest model"):
        scaling.fit_stack(record.latent, _blt_cost(record, 256, 4.0), 1.0e5)


def test_training_schedule_spends_the_budget():
    per_byte, seq_len = 3.0e6, 256
    schedule = scaling.training_schedule(per_byte, seq_len, 8, 100, 1.5e12, min_steps=10, batch_multiple=8)
    assert schedule.batch_size == 8 and schedule.steps == round(1.5e12 / (8 * 256 * 3.0e6))
    assert schedule.train_flops == pytest.approx(1.5e12, rel=1 / schedule.steps)
    small = scaling.training_schedule(per_byte, seq_len, 64, 100, 1.0e11, min_steps=10, batch_multiple=8)
    assert small.batch_size == 8 and small.steps >= 10  # 64 rows would have left 2 steps
    kept = scaling.training_schedule(per_byte, seq_len, 8, 100, None)
    assert (kept.steps, kept.batch_size, kept.budget) == (100, 8, None)
    with pytest.raises(scaling.BudgetError, match="budget_train_flops"):
        scaling.training_schedule(per_byte, seq_len, 8, 100, 1.0e6, batch_multiple=8)


# --- plans ---------------------------------------------------------------------------------------


def test_plan_is_deterministic_and_names_follow_the_config(sweep_file, tmp_path, capsys):
    for out in ("a", "b"):
        assert sweep_main(["plan", "--sweep", f"{sweep_file}:wide", "--out", str(tmp_path / out)]) == 0
    first, second = (tmp_path / "a" / "plan.json").read_bytes(), (tmp_path / "b" / "plan.json").read_bytes()
    assert first == second
    loaded = json.loads(first)
    names = [job["name"] for job in loaded["jobs"]]
    assert [n.rsplit("-", 1)[0] for n in names] == ["static-ps4", "static-ps8", "space"]
    for name in names:
        assert (tmp_path / "a" / "jobs" / f"{name}.json").read_bytes() == (
            tmp_path / "b" / "jobs" / f"{name}.json"
        ).read_bytes()
    for job in loaded["jobs"]:  # the training budget: steps x batch x seq_len x train FLOPs/byte
        s = job["schedule"]
        assert s["train_flops"] == pytest.approx(s["steps"] * s["batch_size"] * 64 * job["flops_per_byte"]["train"])
        assert abs(s["train_flops"] / 3.0e10 - 1) <= 0.5 / s["steps"] + 1e-9
        assert job["config"]["train"]["steps"] == s["steps"] and job["config"]["data"]["batch_size"] == s["batch_size"]
    space = loaded["stages"]["space"]
    assert space["source"].startswith("measured") and 2 < space["mean_patch_size"] < 10
    table = (tmp_path / "a" / "plan.md").read_text()
    assert all(f"| {name} |" in table for name in names)

    # Same inputs again: accepted and unchanged; a different budget: new names, refused without --force.
    assert sweep_main(["plan", "--sweep", f"{sweep_file}:wide", "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "plan.json").read_bytes() == first
    capsys.readouterr()
    assert (
        sweep_main(
            ["plan", "--sweep", f"{sweep_file}:wide", "--out", str(tmp_path / "a"), "--budget-flops-per-byte", "3e5"]
        )
        == 1
    )
    assert "holds a different plan" in capsys.readouterr().err
    assert (
        sweep_main(
            [
                "plan",
                "--sweep",
                f"{sweep_file}:wide",
                "--out",
                str(tmp_path / "a"),
                "--budget-flops-per-byte",
                "3e5",
                "--force",
            ]
        )
        == 0
    )
    renamed = [job["name"] for job in plan.load_plan(tmp_path / "a")["jobs"]]
    assert set(renamed).isdisjoint(names)


def test_the_bundled_patch_sweep_plans_eight_runs(tmp_path):
    sweep = spec.load_sweep(str(REPO / "experiments" / "patch_sweep.py"))
    result = plan.make_plan(sweep, tmp_path)
    jobs = result["jobs"]
    assert [(j["mode"], j["patch_size"]) for j in jobs] == [
        ("entropy", 4.0),
        ("entropy", 6.0),
        ("entropy", 8.0),
        ("space", None),
        ("static", 4.0),
        ("static", 6.0),
        ("static", 8.0),
        ("byte", None),
    ]
    budget = result["budget"]["inference_flops_per_byte"]
    for job in jobs:
        assert job["fit"]["within_tolerance"], job["name"]
        assert job["flops_per_byte"]["total_forward"] == pytest.approx(budget, rel=0.05)
    by_mode = {}
    for job in jobs:
        by_mode.setdefault(job["mode"], []).append(job["parameters"]["global"])
    assert by_mode["static"] == sorted(by_mode["static"]) and by_mode["entropy"] == sorted(by_mode["entropy"])
    assert result["stages"]["entropy"]["targets"] == [4.0, 6.0, 8.0]
    table = "\n".join(line for line in plan.format_plan(result).splitlines() if line.startswith("|"))
    assert table in (REPO / "docs" / "sweeps.md").read_text(), "docs/sweeps.md: paste this plan's table:\n" + table


def test_bad_sweeps_name_the_field(sweep_file, tmp_path, capsys):
    sweep = spec.load_sweep(str(sweep_file))
    sweep.modes = ["static", "bpe"]
    with pytest.raises(ConfigError, match="sweep.modes"):
        spec.validate_sweep(sweep)
    sweep = spec.load_sweep(str(sweep_file))
    sweep.patch_sizes = [4.5]
    with pytest.raises(ConfigError, match="sweep.patch_sizes: expected whole numbers"):
        spec.validate_sweep(sweep)
    sweep = spec.load_sweep(str(sweep_file))
    sweep.modes = ["entropy"]
    sweep.entropy.config = ""
    with pytest.raises(ConfigError, match="sweep.entropy"):
        spec.validate_sweep(sweep)
    assert sweep_main(["plan", "--sweep", str(sweep_file), "--out", str(tmp_path), "--base", "nowhere.py"]) == 1
    assert "sweep.base: expected an experiment file" in capsys.readouterr().err


def test_sweep_file_paths_resolve_from_the_current_folder_or_beside_the_file(sweep_file, tmp_path, monkeypatch):
    sibling = sweep_file.parent / "sibling_sweep.py"
    sibling.write_text(TINY_SWEEP.replace('__file__ + ":', '"tiny_sweep.py:'))
    monkeypatch.chdir(tmp_path)  # neither file is here, and no experiments/ folder either
    sweep = spec.load_sweep(str(sibling))
    assert (sweep.base, sweep.baseline) == (f"{sweep_file}:blt", f"{sweep_file}:byte")
    assert spec.load_experiment(sweep.base, "base").model_type == "blt"
    # The default entropy experiment is an experiments/ path: only found from the repository root.
    assert sweep.entropy.config == "experiments/entropy_model.py:tiny"
    with pytest.raises(ConfigError, match=r"sweep\.entropy\.config: expected an experiment file .*relative paths are "
                       r"read from the current folder"):  # fmt: skip
        spec.load_experiment(sweep.entropy.config, "entropy.config")
    monkeypatch.chdir(REPO)
    assert spec.load_experiment(sweep.entropy.config, "entropy.config").model_type == "byte_lm"


# --- launch commands ------------------------------------------------------------------------------


def test_print_commands_for_every_launcher(sweep_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "sw"
    assert sweep_main(["plan", "--sweep", str(sweep_file), "--out", str(out)]) == 0
    names = [job["name"] for job in plan.load_plan(out)["jobs"]]
    capsys.readouterr()

    def printed(*args: str) -> list[str]:
        assert sweep_main(["run", str(out), "--print-commands", *args]) == 0
        return [line for line in capsys.readouterr().out.splitlines() if line and not line.startswith("#")]

    local = printed()
    assert local[0] == f"python -m bltjax.sweep run {out} --stages-only"
    assert local[1] == (
        f"bash launch/local.sh --processes 1 --devices-per-process 1 -- python -m bltjax.train "
        f"--config bltjax/sweep/job_config.py:{out}/jobs/{names[0]}.json --workdir {out}/runs/{names[0]}"
    )
    xpk = printed("--launcher", "xpk", "--only", names[1], "--", "--cluster", "c1", "--tpu-type", "v5p-128")
    assert len(xpk) == 2 and xpk[1].startswith(
        f"bash launch/xpk.sh --cluster c1 --tpu-type v5p-128 --workload {launchers.kubernetes_name(names[1])} -- "
    )
    slurm = printed("--launcher", "slurm", "--", "--nodes=2")
    assert slurm[1].startswith(
        f"sbatch --job-name={launchers.kubernetes_name(names[0])} --nodes=2 launch/slurm.sbatch python -m bltjax.train"
    )
    tpu = printed("--launcher", "tpu_vm", "--", "--name", "vm", "--zone", "z", "--accelerator", "v5p-128", "--dry-run")
    assert tpu[1].startswith("bash launch/tpu_vm.sh --name vm --zone z --accelerator v5p-128 --dry-run -- python -m")
    assert sweep_main(["run", str(out), "--print-commands", "--launcher", "tpu_vm"]) == 1
    assert "--name" in capsys.readouterr().err
    assert launchers.kubernetes_name("Entropy-PS4.5-1a2b3c4d") == "entropy-ps4-5-1a2b3c4d"
    assert len(launchers.kubernetes_name("x" * 80 + "-1a2b3c4d")) <= 40


# --- a tiny sweep, killed, resumed, reported -------------------------------------------------------


def _env() -> dict[str, str]:
    return dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        BLTJAX_COMPILE_CACHE=str(REPO / ".pytest_cache" / "jax_sweep"),
    )


def _train_records(workdir: pathlib.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [r for r in read_jsonl(path) if r["split"] == "train"] if path.is_file() else []


@pytest.mark.slow
def test_tiny_sweep_is_killed_resumes_and_reports(sweep_file, tmp_path):
    out = tmp_path / "sweep"
    assert sweep_main(["plan", "--sweep", str(sweep_file), "--out", str(out)]) == 0
    jobs = plan.load_plan(out)["jobs"]
    assert [j["mode"] for j in jobs] == ["static", "byte"]
    first = runner.run_dir(out, jobs[0]["name"])
    command = [sys.executable, "-m", "bltjax.sweep", "run", str(out)]

    # Launch 1: SIGKILL the first job's training process once a checkpoint exists and it has gone past it.
    sweep = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        records = _train_records(first)
        if records and records[-1]["step"] >= 12:
            break
        assert sweep.poll() is None, sweep.stdout.read()[-3000:]
        time.sleep(0.02)
    else:
        sweep.kill()
        pytest.fail("the first job never reached step 12")
    starts = [e for e in read_jsonl(first / "launches.jsonl") if e["event"] == "start"]
    os.kill(starts[-1]["pid"], signal.SIGKILL)
    output = sweep.communicate(timeout=60)[0]
    assert sweep.returncode == 1, output[-3000:]
    assert "killed by signal 9" in output and "Relaunch the same command" in output
    before_kill = {r["step"]: r["loss"] for r in _train_records(first)}
    assert max(before_kill) < 40 and not (first / "done.json").exists()
    shutil.copy(first / "metrics.jsonl", tmp_path / "killed-metrics.jsonl")

    # Launch 2: the same command resumes the first job from its checkpoint, then runs the second.
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (first / "train.log").read_text()
    resumed_at = int(log.split(" at step ")[1].split()[0]) if " at step " in log else 0
    assert resumed_at in (10, 20, 30) and resumed_at <= max(before_kill), log[-2000:]
    after = {r["step"]: r["loss"] for r in _train_records(first)}
    assert sorted(after) == list(range(1, 41))  # one record per step: no restart, no duplicates
    for step in range(resumed_at + 1, max(before_kill) + 1):  # recomputed after the kill: bit for bit
        assert after[step] == before_kill[step], step
    starts = [e for e in read_jsonl(first / "launches.jsonl") if e["event"] == "start"]
    assert len(starts) == 2
    for job in jobs:
        done = json.loads((runner.run_dir(out, job["name"]) / "done.json").read_text())
        assert done["hash"] == job["hash"] and 0 < done["validation_bpb"] < 12

    # Launch 3: nothing left to do.
    again = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.count(": done (validation bpb") == 2, again.stdout[-2000:]

    assert sweep_main(["report", str(out)]) == 0
    table = (out / "report.md").read_text()
    for job in jobs:
        row = next(line for line in table.splitlines() if line.startswith(f"| {job['name']} |"))
        assert "| 40/40 |" in row and row.endswith("| done |")
    csv_rows = (out / "report.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 3 and csv_rows[0].startswith("name,mode,patch_size,status")
    report = json.loads((out / "report.json").read_text())
    static, byte = report["runs"]
    assert static["realised_patch_size"] == pytest.approx(65 / 17)  # static 4 over 64 bytes: (N + 1) / (1 + N / 4)
    assert byte["realised_patch_size"] == 1.0
    for run, job in zip(report["runs"], jobs, strict=True):
        assert run["train_flops"] == pytest.approx(job["schedule"]["train_flops"], rel=0.05)
        assert run["wall_time_s"] > 0 and len(run["curve"]) == 4
        assert math.isclose(run["curve"][-1][1], run["final_bpb"])
    for name in ("bpb_vs_train_flops.png", "bpb_vs_inference_flops.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_entropy_jobs_read_the_calibrated_threshold(sweep_file, tmp_path, capsys):
    out = tmp_path / "sw"
    assert sweep_main(["plan", "--sweep", str(sweep_file), "--out", str(out), "--modes", "entropy", "bpe"]) == 1
    assert "sweep.modes: expected distinct modes" in capsys.readouterr().err
    sweep = spec.load_sweep(str(sweep_file))
    sweep.modes, sweep.patch_sizes, sweep.baseline = ["entropy"], [4.0, 6.0], ""
    sweep.entropy.model = str(tmp_path / "exported_entropy_model")
    made = plan.make_plan(sweep, out)
    plan.write_plan(made, out)
    job = made["jobs"][1]
    assert job["patch_size"] == 6.0 and job["config"]["patching"]["threshold"] is None
    path = str(plan.job_file(out, job["name"]))
    with pytest.raises(ConfigError, match="--stages-only"):
        job_config.get_config(path)
    record = {"identity": {}, "targets": {"4": {"threshold": 1.5}, "6": {"threshold": 2.25}}}
    (out / "stages").mkdir()
    (out / "stages" / "entropy.json").write_text(json.dumps(record))
    config = job_config.get_config(path)
    assert config.patching.threshold == 2.25 and config.data.path == str(out.absolute() / "data")
    with pytest.raises(stages.StageError, match="another entropy model"):  # a record from other stages
        runner.run_stages(out.absolute(), made, made["jobs"], log=sys.stdout)


def test_plan_from_flags_alone(sweep_file, tmp_path, capsys):
    """The issue's command line: no sweep file, the defaults (bundled corpus, no baseline) fill the rest."""
    out = tmp_path / "flags"
    command = ["plan", "--budget-flops-per-byte", "2e5", "--patch-sizes", "4", "8", "--base", f"{sweep_file}:blt",
               "--out", str(out)]  # fmt: skip
    assert sweep_main(command) == 0
    printed = capsys.readouterr().out
    jobs = plan.load_plan(out)["jobs"]
    assert [(j["mode"], j["patch_size"]) for j in jobs] == [("static", 4.0), ("static", 8.0)]
    assert all(f"| {j['name']} |" in printed for j in jobs)
    assert plan.load_plan(out)["stages"]["data"]["corpus"] == list(spec.DEFAULT_CORPUS)
    assert sweep_main(["plan", "--patch-sizes", "4", "--out", str(out / "x")]) == 1
    assert "sweep.base: expected a BLT experiment path.py[:variant] (--base or --sweep)" in capsys.readouterr().err


@pytest.mark.slow
def test_a_plan_with_packed_rows_trains_its_jobs_on_packed_rows(sweep_file, tmp_path, capsys):
    """--rows packed: every BLT job packs 1 + ceil(seq_len / expected) patches under the seq_len cap
    (docs/sweeps.md), and the job's config trains on packed rows."""
    out = tmp_path / "packed"
    assert sweep_main(["plan", "--sweep", f"{sweep_file}:wide", "--rows", "packed", "--out", str(out)]) == 0
    windows = tmp_path / "windows"
    assert sweep_main(["plan", "--sweep", f"{sweep_file}:wide", "--out", str(windows)]) == 0
    jobs, window_jobs = plan.load_plan(out)["jobs"], plan.load_plan(windows)["jobs"]
    assert [j["mode"] for j in jobs] == ["static", "static", "space"]
    assert {j["name"] for j in jobs}.isdisjoint(j["name"] for j in window_jobs)  # the rows are part of the name
    for job, window_job in zip(jobs, window_jobs, strict=True):
        data = job["config"]["data"]
        assert data["rows"] == "packed" and window_job["config"]["data"]["rows"] == "windows"
        if job["mode"] == "space":
            assert data["max_patches"] == 1 + math.ceil(64 / job["expected_patch_size"])
            assert data["max_patches"] < window_job["config"]["data"]["max_patches"]  # no room for outliers needed
        else:
            assert data["max_patches"] == window_job["config"]["data"]["max_patches"]
    assert sweep_main(["plan", "--sweep", f"{sweep_file}:wide", "--rows", "bins", "--out", str(tmp_path / "x")]) == 1
    assert "sweep.rows: expected one of ('windows', 'packed'), got 'bins'" in capsys.readouterr().err

    space = next(j for j in jobs if j["mode"] == "space")
    config = job_config.get_config(str(plan.job_file(out, space["name"])))
    config.train.steps, config.train.eval_every, config.train.checkpoint_every = 3, 0, 0
    config.optimizer.warmup_steps = 1
    config.mesh.data = 1
    from bltjax.training.trainer import train

    result = train(config, tmp_path / "run", console=io.StringIO(), devices=jax.devices()[:1])
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    assert result.final_step == 3 and records[-1]["padded_byte_fraction"] > 0


def _fake_sweep(monkeypatch, tmp_path, run_job):
    """run_sweep over two planned jobs, with the plan, stages and the job launch replaced."""
    (tmp_path / "job.json").write_text("{}")
    monkeypatch.setattr(runner, "load_plan", lambda sweep_dir: {})
    monkeypatch.setattr(runner, "select_jobs", lambda plan, only: [{"name": "a"}, {"name": "b"}])
    monkeypatch.setattr(runner, "run_stages", lambda *args: None)
    monkeypatch.setattr(runner, "read_done", lambda sweep_dir, job: None)
    monkeypatch.setattr(runner, "job_file", lambda sweep_dir, name: tmp_path / "job.json")
    monkeypatch.setattr(runner, "run_job", run_job)
    return lambda **kwargs: runner.run_sweep(tmp_path, log=io.StringIO(), **kwargs)


def test_a_failing_job_stops_the_sweep_unless_keep_going(monkeypatch, tmp_path):
    started = []

    def failing(sweep_dir, job, log, forward):
        started.append(job["name"])
        return 1

    run = _fake_sweep(monkeypatch, tmp_path, failing)
    assert run() == 1 and started == ["a"]
    started.clear()
    assert run(keep_going=True) == 1 and started == ["a", "b"]


def test_sigterm_to_the_runner_goes_to_the_running_job_and_starts_nothing_new(monkeypatch, tmp_path):
    started = []
    job = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(143)); "
        "print(1, flush=True); time.sleep(60)"
    )

    def checkpointing(sweep_dir, planned, log, forward):
        started.append(planned["name"])
        forward.child = subprocess.Popen([sys.executable, "-c", job], stdout=subprocess.PIPE, text=True)
        forward.child.stdout.readline()  # its handler is installed
        os.kill(os.getpid(), signal.SIGTERM)  # the runner's handler forwards it to the job
        rc = forward.child.wait(timeout=30)
        forward.child = None
        return rc

    previous = signal.getsignal(signal.SIGTERM)
    assert _fake_sweep(monkeypatch, tmp_path, checkpointing)() == runner.PREEMPTED == 143
    assert started == ["a"]
    assert signal.getsignal(signal.SIGTERM) is previous  # the runner's handler is gone again


def test_seeds_run_every_job_once_per_seed(sweep_file, tmp_path, capsys):
    """--seeds: each job once per seed, named {group}-s{seed}-{hash}; the copies differ in config.seed only,
    and a sweep without seeds keeps its names (docs/sweeps.md, "Seeds")."""
    plain, seeded = tmp_path / "plain", tmp_path / "seeded"
    assert sweep_main(["plan", "--sweep", str(sweep_file), "--out", str(plain)]) == 0
    assert sweep_main(["plan", "--sweep", str(sweep_file), "--out", str(seeded), "--seeds", "0", "1", "2"]) == 0
    before, jobs = plan.load_plan(plain)["jobs"], plan.load_plan(seeded)["jobs"]
    assert [j["name"].rsplit("-", 1)[0] for j in before] == ["static-ps4", "byte"]
    assert "seed" not in before[0]
    assert [(j["group"], j["seed"]) for j in jobs] == [
        (group, seed) for group in ("static-ps4", "byte") for seed in (0, 1, 2)
    ]
    for job in jobs:
        assert re.fullmatch(rf"{job['group']}-s{job['seed']}-[0-9a-f]{{8}}", job["name"])
        assert job["config"]["seed"] == job["seed"]
        original = next(b for b in before if b["name"].startswith(job["group"] + "-"))
        assert {**job["config"], "seed": original["config"]["seed"]} == original["config"]
        assert job["schedule"] == original["schedule"] and job["fitted_stack"] == original["fitted_stack"]
        written = json.loads((seeded / "jobs" / f"{job['name']}.json").read_text())
        assert job_config.get_config(str(seeded / "jobs" / f"{job['name']}.json")).seed == job["seed"]
        assert written["config"]["seed"] == job["seed"]
    assert len({j["name"] for j in jobs}) == 6
    capsys.readouterr()
    assert sweep_main(["plan", "--sweep", str(sweep_file), "--out", str(tmp_path / "x"), "--seeds", "1", "1"]) == 1
    assert "sweep.seeds: expected None or distinct integers >= 0" in capsys.readouterr().err


def test_monotonic_jobs_calibrate_and_read_their_own_threshold(sweep_file, tmp_path, monkeypatch):
    """Mode monotonic: an entropy BLT with the approximate-monotonic rule, whose threshold the shared stage
    calibrates for that rule (entropy.run(target_kind="monotonic")) beside the global rule's."""
    from bltjax.convert import hub
    from bltjax.data import entropy as sidecars

    out = tmp_path / "mono"
    sweep = spec.load_sweep(str(sweep_file))
    sweep.modes, sweep.patch_sizes, sweep.baseline = ["entropy", "monotonic"], [4.0], ""
    sweep.entropy.model = str(tmp_path / "exported_entropy_model")
    made = plan.make_plan(sweep, out)
    plan.write_plan(made, out)
    by_mode = {job["mode"]: job for job in made["jobs"]}
    assert by_mode["monotonic"]["config"]["patching"]["monotonicity"] is True
    assert by_mode["entropy"]["config"]["patching"]["monotonicity"] is False
    assert by_mode["monotonic"]["config"]["patching"]["mode"] == "entropy"

    calls = []

    def fake_run(data, model, *, target_patch_size, target_kind="global", **kwargs):
        calls.append((target_kind, target_patch_size))
        threshold = {"global": 1.5, "monotonic": 0.75}[target_kind]
        return types.SimpleNamespace(threshold=threshold, tag=f"{target_kind[0]}{threshold}", calibration={})

    monkeypatch.setattr(sidecars, "run", fake_run)
    monkeypatch.setattr(hub, "resolve_model_source", lambda source: pathlib.Path(source))
    monkeypatch.setattr(stages, "measure_patch_size", lambda config, data: {"overflow": 0.0, "max_patches_seen": 1})
    monkeypatch.setattr(stages, "ensure_data", lambda sweep_dir, data, log: out.absolute() / "data")
    runner.run_stages(out.absolute(), made, made["jobs"], log=sys.stdout)
    assert sorted(calls) == [("global", 4.0), ("monotonic", 4.0)]
    assert set(stages.read_thresholds(out)) == {"4", "monotonic:4"}
    for mode, threshold in (("entropy", 1.5), ("monotonic", 0.75)):
        config = job_config.get_config(str(plan.job_file(out, by_mode[mode]["name"])))
        assert config.patching.threshold == threshold
        assert config.patching.monotonicity is (mode == "monotonic")


def test_mode_patch_sizes_give_a_mode_its_own_sizes(sweep_file, tmp_path):
    """mode_patch_sizes: static at 4 only while the sweep's patch_sizes are 4 and 8; a bad list names its field."""
    sweep = spec.load_sweep(f"{sweep_file}:wide")
    sweep.mode_patch_sizes.static = [4.0]
    jobs = plan.make_plan(sweep, tmp_path / "own")["jobs"]
    assert [(j["mode"], j["patch_size"]) for j in jobs] == [("static", 4.0), ("space", None)]
    sweep.mode_patch_sizes.static = [4.5]
    with pytest.raises(ConfigError, match=r"sweep.mode_patch_sizes.static: expected whole numbers of bytes"):
        spec.validate_sweep(sweep)
