"""Training: loss goes down, sharding is real and exact, resume is bit for bit, signals and bad input.

The subprocess tests run `python -m bltjax.train` exactly as a user does, on 8 fake CPU
devices, and compare the per-step losses that land in each workdir's metrics.jsonl.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bltjax.checkpoints import Checkpointer
from bltjax.config import ConfigError, load_config
from bltjax.training import sharding
from bltjax.training.metrics import read_jsonl
from bltjax.training.state import create_train_state
from bltjax.training.trainer import Trainer, TrainingDivergedError, WorkdirError, train

REPO = pathlib.Path(__file__).resolve().parents[1]
CORPUS = REPO / "bltjax" / "data" / "corpus"
TINY = str(REPO / "experiments" / "blt_tiny.py")


@pytest.fixture(scope="module")
def data_dir(corpus_data) -> pathlib.Path:
    return corpus_data  # conftest's session folder: two real corpus files, prepared once


# Most tests run this exact program (30 steps on the 8-device data-parallel mesh), in process or
# through the CLI: the persistent compilation cache then compiles it once for the whole module.
OVERRIDES = {
    "train.steps": 30,
    "train.log_every": 1,
    "train.eval_every": 0,
    "train.eval_batches": 1,
    "train.checkpoint_every": 0,
    "optimizer.warmup_steps": 2,
    "optimizer.learning_rate": 3e-3,
    "data.batch_size": 8,
}


def tiny_config(data: pathlib.Path, **changes):
    config = load_config(TINY)
    config.data.path = str(data)
    for name, value in {**OVERRIDES, **changes}.items():
        section, key = name.split(".")
        config[section][key] = value
    return config


def train_losses(workdir: pathlib.Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(workdir / "metrics.jsonl") if r["split"] == "train"}


def reference_run(trained_run, data_dir):
    """The uninterrupted 30-step run (validation at steps 15 and 30), trained once per session."""
    return trained_run(tiny_config(data_dir, **{"train.eval_every": 15}))


@pytest.mark.slow
def test_loss_decreases_and_workdir_is_complete(data_dir, trained_run):
    run = reference_run(trained_run, data_dir)
    result, workdir = run.result, run.workdir
    losses = train_losses(workdir)
    assert sorted(losses) == list(range(1, 31))
    first, last = np.mean([losses[s] for s in range(1, 6)]), np.mean([losses[s] for s in range(26, 31)])
    assert last < first - 0.5, (first, last)
    assert result.validation_bpb is not None and result.validation_bpb < 8.0
    records = read_jsonl(workdir / "metrics.jsonl")
    validation = [r for r in records if r["split"] == "validation"]
    assert [r["step"] for r in validation] == [15, 30]
    train_record = [r for r in records if r["split"] == "train"][-1]
    for key in ("bpb", "learning_rate", "grad_norm", "bytes_per_sec", "patches_per_sec", "mean_patch_size", "mfu"):
        assert np.isfinite(train_record[key]), key
    assert (workdir / "config.json").is_file()
    assert list((workdir / "tensorboard").rglob("events.out.tfevents.*"))
    assert "| bpb" in run.console
    assert Checkpointer(workdir / "checkpoints").latest_complete_step() == 30
    stored = json.loads((workdir / "config.json").read_text())
    assert stored["model"]["hash_rows_multiple"] == 1  # data parallel only: nothing to pad for
    assert "mesh {" in (workdir / "shardings.txt").read_text()


def cube_config(data: pathlib.Path):
    """6 steps on the (data, fsdp, tensor) = (2, 2, 2) mesh: test_evaluate evaluates the same run."""
    config = tiny_config(data, **{"train.steps": 6})
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    return config


@pytest.mark.slow
def test_sharded_run_matches_one_device_and_shards_parameters(data_dir, trained_run, tmp_path):
    one = tiny_config(data_dir, **{"train.steps": 6})
    train(one, tmp_path / "one", console=io.StringIO(), devices=jax.devices()[:1])
    cube = cube_config(data_dir)
    a, b = train_losses(tmp_path / "one"), train_losses(trained_run(cube).workdir)
    np.testing.assert_allclose([a[s] for s in range(1, 7)], [b[s] for s in range(1, 7)], rtol=2e-5)

    trainer = Trainer(cube, tmp_path / "inspect", console=io.StringIO())
    state, _ = create_train_state(trainer.model, trainer.optimizer, trainer.config, trainer.mesh, jax.random.key(0))
    params = state.params
    tables = params["local_encoder"]["hash_embedding"]["tables"]
    assert sharding.addressable_fraction(tables) == pytest.approx(1 / 4)  # rows over fsdp x tensor
    ffn = params["latent"]["transformer"]["layers_0"]["ffn"]["gate"]["kernel"]
    assert sharding.addressable_fraction(ffn) == pytest.approx(1 / 4)  # embed over fsdp, mlp over tensor
    mu = state.opt_state[1][0].mu["latent"]["transformer"]["layers_0"]["ffn"]["gate"]["kernel"]
    assert mu.sharding == ffn.sharding


def _cli(workdir: pathlib.Path, data: pathlib.Path, steps: int, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "bltjax.train", "--config", TINY, "--workdir", str(workdir)]
    overrides = {**OVERRIDES, "train.steps": steps}
    args += [f"--config.{k}={v}" for k, v in overrides.items()] + [f"--config.data.path={data}", *extra]
    return args


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    # The CLI then compiles exactly what the in-process tests compiled: one cache serves both.
    env["BLTJAX_COMPILE_CACHE"] = jax.config.jax_compilation_cache_dir
    env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
    return env


def _complete(step_dir: pathlib.Path) -> bool:
    return (step_dir / "_CHECKPOINT_METADATA").is_file() and all(
        (step_dir / i).is_dir() for i in ("state", "data", "meta")
    )


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(data_dir, trained_run, tmp_path):
    steps = 30

    killed_dir = tmp_path / "killed"
    cmd = _cli(
        killed_dir, data_dir, steps, "--config.train.checkpoint_every=4", "--config.train.async_checkpoint=False"
    )
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not _complete(killed_dir / "checkpoints" / "8") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: a real crash
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    interrupted_at = max(r["step"] for r in read_jsonl(killed_dir / "metrics.jsonl"))
    assert interrupted_at < steps

    resumed = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_at = int(resumed.stdout.split("at step ")[1].split()[0])
    assert 8 <= resumed_at < steps
    # Against the uninterrupted in-process run: the same program, so the same bits (validation
    # steps leave the training state alone).
    expected, got = train_losses(reference_run(trained_run, data_dir).workdir), train_losses(killed_dir)
    assert sorted(got) == list(range(1, steps + 1))  # each step once: the lines after the checkpoint were replaced
    assert [got[s] for s in sorted(got)] == [expected[s] for s in sorted(expected)]  # bit for bit


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_relaunch_continues(data_dir, tmp_path):
    workdir = tmp_path / "run"
    cmd = _cli(workdir, data_dir, 30)  # the program of the SIGKILL test: compiled once for both
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step") and "/30" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    saved = int(out.split("pre-empted: saved step ")[1].split(";")[0])
    assert saved >= 1 and _complete(workdir / "checkpoints" / str(saved))
    assert saved < 30, "the run finished before SIGTERM arrived"
    relaunch = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    assert f"at step {saved}" in relaunch.stdout
    assert sorted(train_losses(workdir)) == list(range(1, 31))


def test_half_written_checkpoints_are_skipped(tmp_path):
    directory = tmp_path / "checkpoints"
    checkpointer = Checkpointer(directory, async_save=False)
    iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
    for step in (1, 2):
        next(iterator)
        checkpointer.save(step, {"w": jnp.full((4,), float(step))}, iterator, {"step": step})
    checkpointer.close()
    # A save killed mid-write (orbax's temporary name) and a step directory missing an item.
    (directory / "3.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)
    partial = directory / "4"
    (partial / "state").mkdir(parents=True)
    (partial / "_CHECKPOINT_METADATA").write_text("{}")
    reopened = Checkpointer(directory, async_save=False)
    assert reopened.latest_complete_step() == 2
    fresh = iter(grain.MapDataset.range(10).to_iter_dataset())
    target = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
    state, meta = reopened.restore(2, target, fresh)
    assert np.asarray(state["w"]).tolist() == [2.0] * 4 and meta["step"] == 2
    assert next(fresh) == 2  # the data position came back with the state


@pytest.mark.slow
def test_bad_config_is_rejected_before_any_device_work(data_dir, tmp_path):
    config = tiny_config(data_dir)
    config.train.not_a_field = 1
    with pytest.raises(ConfigError, match=r"config\.train\.not_a_field: unknown key"):
        Trainer(config, tmp_path / "a")
    config = tiny_config(data_dir)
    config.model.decoder.dim = 32  # the decoder reads encoder states unprojected
    with pytest.raises(ConfigError, match=r"config\.model\.decoder\.dim"):
        Trainer(config, tmp_path / "b")
    config = tiny_config(data_dir, **{"train.grad_accum": 3})
    with pytest.raises(ConfigError, match=r"config\.train\.grad_accum"):
        Trainer(config, tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()

    result = subprocess.run(_cli(tmp_path / "d", data_dir, 2, "--config.model.encodr.dim=8"), env=_env(),
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode != 0 and "encodr" in result.stderr
    assert not (tmp_path / "d").exists()


def test_relaunch_with_a_different_model_is_refused(data_dir, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(tiny_config(data_dir).to_json())  # as a first launch leaves it
    changed = tiny_config(data_dir, **{"train.steps": 3})
    changed.model.latent.n_layers = 3
    with pytest.raises(WorkdirError, match=r"config\.model\.latent\.n_layers"):
        Trainer(changed, tmp_path / "run")


@pytest.mark.slow
def test_nan_loss_stops_without_saving(data_dir, tmp_path):
    trainer = Trainer(tiny_config(data_dir, **{"train.checkpoint_every": 2}), tmp_path / "run", console=io.StringIO())
    real_step = trainer.train_step

    def diverging_step(state, batch):  # the real step; its loss turns NaN from step 3 on
        new_state, metrics = real_step(state, batch)
        metrics["loss"] = jnp.where(new_state.step >= 3, jnp.nan, metrics["loss"])
        return new_state, metrics

    trainer.train_step = diverging_step
    with pytest.raises(TrainingDivergedError, match="step 3: loss nan .* not finite; stopped without saving. The last "
                       "good checkpoint is step 2"):  # fmt: skip
        trainer.run()
    assert Checkpointer(tmp_path / "run" / "checkpoints").steps() == [2]


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch(data_dir, tmp_path):
    short = {"data.batch_size": 16, "train.steps": 2, "optimizer.warmup_steps": 1}  # warm-up ends before the run
    whole = tiny_config(data_dir, **short)
    split = tiny_config(data_dir, **short, **{"train.grad_accum": 2})
    train(whole, tmp_path / "whole", console=io.StringIO())
    train(split, tmp_path / "split", console=io.StringIO())
    a, b = train_losses(tmp_path / "whole"), train_losses(tmp_path / "split")
    # Step 1 sees the same parameters; the update differs only by how micro-batch means weigh rows.
    assert a[1] == pytest.approx(b[1], rel=1e-5)
    assert b[2] == pytest.approx(a[2], rel=2e-2)


def test_optimizer_defaults_warm_up_cosine_decay_and_decay_mask():
    """docs/architecture.md §13: AdamW settings, linear warm-up, cosine decay to final_lr_ratio x peak, and the
    parameters that decay_all=False exempts."""
    from bltjax.config import base_blt_config
    from bltjax.training.optimizer import learning_rate_schedule, weight_decay_mask

    config = base_blt_config()
    opt = config.optimizer
    assert (opt.b1, opt.b2, opt.eps, opt.weight_decay, opt.learning_rate) == (0.9, 0.95, 1e-8, 0.1, 4e-4)
    assert (opt.schedule, opt.final_lr_ratio, opt.clip_norm, opt.decay_all) == ("cosine", 0.0, 1.0, True)
    config.train.steps, opt.warmup_steps = 1000, 100
    lr = learning_rate_schedule(config)
    assert float(lr(0)) == 0.0
    assert float(lr(50)) == pytest.approx(2e-4, rel=1e-5)  # linear warm-up
    assert float(lr(100)) == pytest.approx(4e-4, rel=1e-5)
    assert float(lr(550)) == pytest.approx(2e-4, rel=1e-5)  # half-way through the cosine
    assert float(lr(1000)) == pytest.approx(0.0, abs=1e-12)
    opt.final_lr_ratio = 0.1  # the official default
    assert float(learning_rate_schedule(config)(1000)) == pytest.approx(4e-5, rel=1e-5)
    params = {
        "local_encoder": {"byte_embedding": 0, "hash_embedding": {"tables": 0}, "layers_0": {"ffn_norm": {"scale": 0}}},
        "latent": {"layers_0": {"ffn": {"up": {"kernel": 0}}}},
        "embedding": 0,  # the byte LM's
    }
    assert weight_decay_mask(params) == {
        "local_encoder": {
            "byte_embedding": False,
            "hash_embedding": {"tables": False},
            "layers_0": {"ffn_norm": {"scale": False}},
        },
        "latent": {"layers_0": {"ffn": {"up": {"kernel": True}}}},
        "embedding": False,
    }
