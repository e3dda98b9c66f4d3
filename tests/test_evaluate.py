"""Evaluation: restore onto any devices, every byte counted once, the CLI, and bad input.

One real training run on a (2, 2, 2) mesh (the program of test_trainer's sharded test, so the
persistent compilation cache serves both) provides the BLT checkpoint; a randomly initialised
byte LM exported with `checkpoints.save_model` provides the model folder, and is small
enough to score by hand with a full forward pass.
"""

from __future__ import annotations

import io
import json
import math
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import test_trainer

from bltjax import checkpoints
from bltjax.config import ConfigError, load_config
from bltjax.data import pipeline, prepare
from bltjax.inference.evaluate import evaluate, evaluate_and_write
from bltjax.inference.restore import RestoreError, load_for_inference
from bltjax.models.factory import build_model, example_inputs
from bltjax.tokenizer import OFFSET
from bltjax.training import sharding, wandb_tracker
from bltjax.training.metrics import read_jsonl

REPO = pathlib.Path(__file__).resolve().parents[1]
BYTE_LM = str(REPO / "experiments" / "byte_lm.py")
data_dir = test_trainer.data_dir  # the training tests' module fixture: two real corpus files, prepared
tiny_config = test_trainer.tiny_config


def split_counts(data: pathlib.Path, split: str) -> tuple[int, int]:
    """(targets, byte targets) of a split, read straight from the shard files: every token but
    the first of each shard is predicted once."""
    manifest = json.loads((data / "manifest.json").read_text())
    targets = byte_targets = 0
    for shard in manifest["splits"][split]:
        tokens = np.fromfile(data / f"{shard['name']}.tokens", dtype="<u2")
        assert tokens.size == shard["tokens"]
        targets += tokens.size - 1
        byte_targets += int(np.count_nonzero(tokens[1:] >= OFFSET))
    return targets, byte_targets


@pytest.fixture(scope="module")
def run_dir(data_dir, trained_run):
    """A BLT trained for 6 steps on the (data, fsdp, tensor) = (2, 2, 2) mesh; checkpoint at step 6.

    test_trainer's sharded run: conftest's `trained_run` trains it once for both files.
    """
    run = trained_run(test_trainer.cube_config(data_dir))
    return run.workdir, jax.device_get(run.result.state.params)


@pytest.fixture(scope="module")
def eval_all_devices(run_dir, data_dir):
    return evaluate(load_for_inference(run_dir[0]), data_dir, batch_size=8)


@pytest.mark.slow
def test_checkpoint_from_a_cube_mesh_evaluates_identically_on_one_device(
    run_dir, data_dir, eval_all_devices, monkeypatch
):
    workdir, trained = run_dir
    restored_trees = []
    real_restore = ocp.PyTreeCheckpointer.restore

    def spying_restore(self, *args, **kwargs):
        tree = real_restore(self, *args, **kwargs)
        restored_trees.append(tree)
        return tree

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "restore", spying_restore)
    one = load_for_inference(workdir, devices=jax.devices()[:1])
    monkeypatch.undo()
    # Parameters only: orbax materialised no optimizer state and no step counter.
    assert len(restored_trees) == 1 and list(restored_trees[0]) == ["params"]
    assert one.step == 6 and one.mesh.devices.size == 1 and one.source.endswith("checkpoints/6")
    assert one.config.model.hash_rows_multiple == 4  # the padding of the (2, 2, 2) run is kept
    flat_one = jax.tree_util.tree_flatten_with_path(one.params)[0]
    flat_trained = jax.tree_util.tree_flatten_with_path(trained)[0]
    assert [k for k, _ in flat_one] == [k for k, _ in flat_trained]
    for (name, a), (_, b) in zip(flat_one, flat_trained, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(name))

    result = evaluate(one, data_dir, batch_size=8)
    full = eval_all_devices
    assert full.devices == 8 and result.devices == 1
    np.testing.assert_allclose(result.bpb, full.bpb, rtol=1e-5)
    np.testing.assert_allclose(result.bpb_bytes, full.bpb_bytes, rtol=1e-5)
    assert (result.n_targets, result.n_bytes, result.n_patches) == (full.n_targets, full.n_bytes, full.n_patches)
    assert 1.5 < full.mean_patch_size < 10 and 0 < full.bpb < 9

    # Another mesh on request: hash-table rows split over fsdp, the padded shapes kept.
    fsdp = load_for_inference(workdir, mesh_overrides={"data": 2, "fsdp": 4})
    tables = fsdp.params["local_encoder"]["hash_embedding"]["tables"]
    assert sharding.addressable_fraction(tables) == pytest.approx(1 / 4)


@pytest.mark.slow
def test_every_byte_of_the_split_is_counted_once(run_dir, data_dir, eval_all_devices):
    result = eval_all_devices
    targets, byte_targets = split_counts(data_dir, "validation")
    assert (result.n_targets, result.n_bytes) == (targets, byte_targets)
    assert result.n_windows == sum(math.ceil((t - 1) / 128) for t in _shard_sizes(data_dir, "validation"))
    assert result.bpb == pytest.approx(result.nats / (math.log(2) * targets), rel=1e-12)

    # One patch per byte needs 129 patch columns where the run had 64: evaluation widens them
    # instead of truncating rows, so every target is still counted, each its own patch.
    per_byte = evaluate(
        load_for_inference(run_dir[0]), data_dir, batch_size=8, patching_overrides={"mode": "static", "patch_size": 1}
    )
    assert per_byte.max_patches == 129 and per_byte.patching["mode"] == "static"
    assert (per_byte.n_targets, per_byte.n_bytes) == (targets, byte_targets)
    assert per_byte.n_patches == targets and per_byte.mean_patch_size == 1.0
    assert per_byte.bpb != pytest.approx(result.bpb, rel=1e-4)  # the patching really changed


def _shard_sizes(data: pathlib.Path, split: str) -> list[int]:
    manifest = json.loads((data / "manifest.json").read_text())
    return [shard["tokens"] for shard in manifest["splits"][split]]


@pytest.fixture(scope="module")
def byte_lm_dir(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """(tiny data folder with several short shards, a random byte LM saved with save_model)."""
    root = tmp_path_factory.mktemp("byte_lm")
    text = root / "docs.jsonl"
    documents = ["short", "a somewhat longer document about patches", "é ü 中文", "x" * 70, "bytes, bytes", "the end"]
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    data = root / "data"
    prepare.prepare([text], data, shard_bytes=40, val_fraction=0.0, progress=False)
    config = load_config(f"{BYTE_LM}:tiny")
    config.data.seq_len = 32
    config.data.batch_size = 3
    model = build_model(config)
    params = jax.jit(model.init)(jax.random.key(7), *example_inputs(config))["params"]
    model_dir = checkpoints.save_model(root / "model", config, params)
    return data, model_dir


def test_save_model_folder_matches_a_hand_computed_full_forward_pass(byte_lm_dir):
    data, model_dir = byte_lm_dir
    loaded = load_for_inference(model_dir)
    assert loaded.step is None and loaded.config.model_type == "byte_lm"
    result = evaluate(loaded, data, split="train", batch_size=3)
    assert result.batch_size == 8  # 3 rows rounded up to the 8 batch shards, the rest masked
    assert result.n_patches is None and result.mean_patch_size is None and result.max_patches is None

    # By hand: windows [wN, wN + N + 1) of every shard, BOE-padded, one forward pass each.
    n = 32
    windows, real = [], []
    manifest = json.loads((data / "manifest.json").read_text())
    assert len(manifest["splits"]["train"]) >= 3  # several shards, most ending in a partial window
    for shard in manifest["splits"]["train"]:
        tokens = np.fromfile(data / f"{shard['name']}.tokens", dtype="<u2").astype(np.int32)
        for offset in range(0, tokens.size - 1, n):
            chunk = tokens[offset : offset + n + 1]
            windows.append(np.pad(chunk, (0, n + 1 - chunk.size)))
            real.append(chunk.size - 1)
    windows = np.stack(windows)
    logits = np.asarray(jax.jit(loaded.model.apply)({"params": loaded.params}, windows[:, :-1]), np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, windows[:, 1:, None], axis=-1)[..., 0]
    mask = np.arange(n)[None, :] < np.array(real)[:, None]
    byte_mask = mask & (windows[:, 1:] >= OFFSET)
    assert result.n_windows == len(windows) and result.n_targets == int(mask.sum()) == split_counts(data, "train")[0]
    assert result.n_bytes == int(byte_mask.sum())
    np.testing.assert_allclose(result.nats, nll[mask].sum(), rtol=1e-5)
    np.testing.assert_allclose(result.bpb, nll[mask].sum() / (math.log(2) * mask.sum()), rtol=1e-5)
    np.testing.assert_allclose(result.bpb_bytes, nll[byte_mask].sum() / (math.log(2) * byte_mask.sum()), rtol=1e-5)


def test_incomplete_or_mismatched_model_folder_is_refused_naming_the_file(byte_lm_dir, tmp_path):
    """load_for_inference runs the format module's checks: the missing file or the bad parameter is named."""
    assert RestoreError is checkpoints.CheckpointError  # one error type for every unreadable folder
    model_dir = byte_lm_dir[1]
    copy = pathlib.Path(shutil.copytree(model_dir, tmp_path / "model"))
    (copy / "params" / "_CHECKPOINT_METADATA").unlink()
    with pytest.raises(RestoreError, match=f"{copy}/params/_CHECKPOINT_METADATA: no such file"):
        load_for_inference(copy)
    shutil.rmtree(copy / "params")
    with pytest.raises(RestoreError, match=f"{copy} holds config.json without params/"):
        load_for_inference(copy)
    wider = pathlib.Path(shutil.copytree(model_dir, tmp_path / "wider"))
    config = json.loads((wider / "config.json").read_text())
    dim = config["model"]["stack"]["dim"]
    config["model"]["stack"]["dim"] = 2 * dim
    (wider / "config.json").write_text(json.dumps(config))
    expected = rf"wider/params: parameter 'embedding' is float32\[260, {dim}\] in the checkpoint, but the model "
    with pytest.raises(
        RestoreError, match=expected + rf"built from .*wider/config.json expects float32\[260, {2 * dim}\]"
    ):
        load_for_inference(wider)
    with pytest.raises(RestoreError, match="a model folder holds one model, not training steps"):
        load_for_inference(model_dir, step=1)


def test_a_dtype_difference_is_refused_not_cast(tmp_path):
    """`check_params` (run before anything is read) refuses a stored dtype the model does not expect,
    naming the parameter and both dtypes, where orbax would cast it silently."""
    want = {"latent": {"embedding": jax.ShapeDtypeStruct((4, 8), np.float32)}}
    stored = {"latent": {"embedding": jax.ShapeDtypeStruct((4, 8), jax.numpy.bfloat16)}}
    checkpoints.check_params(want, want, tmp_path, "config.json")  # the same tree passes
    with pytest.raises(checkpoints.CheckpointError, match=r"parameter 'latent/embedding' is bfloat16\[4, 8\] in the "
                       r"checkpoint, but the model built from config.json expects float32\[4, 8\]"):  # fmt: skip
        checkpoints.check_params(stored, want, tmp_path, "config.json")


@pytest.mark.slow
def test_reading_a_workdir_never_opens_a_checkpoint_manager(run_dir, monkeypatch, tmp_path):
    """Opening a `CheckpointManager` would create folders and delete the temporary folder of a save a
    running trainer is writing: inference reads the newest complete step without one."""
    workdir = tmp_path / "run"
    shutil.copytree(run_dir[0], workdir)
    saving = workdir / "checkpoints" / "7.orbax-checkpoint-tmp-1234"  # a save in progress
    saving.mkdir()

    def refuse(*args, **kwargs):
        raise AssertionError("inference opened a CheckpointManager")

    monkeypatch.setattr(ocp, "CheckpointManager", refuse)
    loaded = load_for_inference(workdir)
    assert loaded.step == 6 and saving.is_dir()
    leaves = zip(jax.tree.leaves(jax.device_get(loaded.params)), jax.tree.leaves(run_dir[1]), strict=True)
    assert all(np.array_equal(a, b) for a, b in leaves)


@pytest.mark.slow
def test_entropy_patching_reads_the_sidecar_bits_of_each_window(run_dir, byte_lm_dir, tmp_path):
    """The space-patched BLT evaluated with entropy patches from sidecars (written by the random
    byte LM): the patches counted are those of the stored start bits, window by window."""
    from bltjax.data import entropy, sidecars

    text = (REPO / "bltjax" / "data" / "corpus" / "jargon_file_4.4.7_appendix_a.txt").read_text()[:6000]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": text[i : i + 500]}) + "\n" for i in range(0, len(text), 500)))
    data = tmp_path / "data"
    prepare.prepare([source], data, shard_bytes=2500, val_fraction=0.0, progress=False)
    summary = entropy.run(data, byte_lm_dir[1], target_patch_size=4.0, log=io.StringIO())
    override = {"mode": "entropy", "threshold": summary.threshold}
    result = evaluate(load_for_inference(run_dir[0]), data, split="train", batch_size=8, patching_overrides=override)

    n, expected = 128, 0
    manifest = json.loads((data / "manifest.json").read_text())
    assert len(manifest["splits"]["train"]) >= 2
    for shard in manifest["splits"]["train"]:
        bits = sidecars.read_starts(data, shard["name"], summary.tag, shard["tokens"])
        for offset in range(0, shard["tokens"] - 1, n):
            real = min(n, shard["tokens"] - 1 - offset)  # inputs of this window with a real target
            expected += 1 + (real >= 2) + int(bits[offset + 2 : offset + real].sum())  # 0 and 1 forced
    assert result.n_patches == expected and result.n_targets == split_counts(data, "train")[0]
    assert 2.5 < result.mean_patch_size < 8 and result.patching["threshold"] == summary.threshold


def _eval_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bltjax.eval", *args], env=test_trainer._env(), capture_output=True, text=True
    )


@pytest.mark.slow
def test_cli_prints_the_table_and_writes_json(run_dir, data_dir, eval_all_devices, byte_lm_dir):
    workdir = run_dir[0]
    # The README's command.
    done = _eval_cli("--model", str(workdir), "--data", str(data_dir), "--batch-size", "8")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| bits per byte (all targets, BOS/EOS incl.) |" in done.stdout and "| patches |" in done.stdout
    written = json.loads((workdir / "eval" / "validation-step6.json").read_text())
    assert written["step"] == 6 and written["n_targets"] == eval_all_devices.n_targets
    np.testing.assert_allclose(written["bpb"], eval_all_devices.bpb, rtol=1e-5)
    assert not list((workdir / "eval").glob(".*.tmp"))  # written through a temporary sibling

    data, model_dir = byte_lm_dir
    out = model_dir.parent / "scores" / "byte_lm.json"
    done = _eval_cli("--model", str(model_dir), "--data", str(data), "--split", "train", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| patches | n/a |" in done.stdout
    assert json.loads(out.read_text())["n_patches"] is None

    failed = _eval_cli("--model", str(workdir), "--data", str(data_dir), "--step", "99")
    assert failed.returncode == 1
    assert f"{workdir / 'checkpoints'}: no complete checkpoint for step 99; available steps: [6]" in failed.stderr
    assert "Traceback" not in failed.stderr
    failed = _eval_cli("--model", str(workdir), "--data", str(data_dir), "--patching.threshold", "1.3")
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert "config.patching.threshold: expected None when patching.mode='space'" in failed.stderr


@pytest.mark.slow
def test_bad_input_is_refused_with_the_path_or_field_named(run_dir, data_dir, tmp_path):
    workdir = run_dir[0]
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(RestoreError, match=r"empty_run/checkpoints: no complete checkpoint"):
        load_for_inference(empty)
    with pytest.raises(RestoreError, match=r"nowhere: no such directory"):
        load_for_inference(tmp_path / "nowhere")
    with pytest.raises(RestoreError, match=r"data: neither a training workdir .* nor a model folder"):
        load_for_inference(data_dir)
    with pytest.raises(RestoreError, match=r"no complete checkpoint for step 3; available steps: \[6\]"):
        load_for_inference(workdir, step=3)

    # Configs saved with the checkpoint that this bltjax cannot build, or that build other shapes.
    def edited_copy(name: str, edit) -> pathlib.Path:
        copy = tmp_path / name
        shutil.copytree(workdir / "checkpoints", copy / "checkpoints")
        meta_file = copy / "checkpoints" / "6" / "meta" / "metadata"
        meta = json.loads(meta_file.read_text())
        edit(meta["config"])
        meta_file.write_text(json.dumps(meta))
        return copy

    unknown = edited_copy("unknown", lambda c: c["model"].update(bogus=1))
    with pytest.raises(RestoreError, match=r"meta.*cannot be built by this bltjax: config\.model\.bogus: unknown key"):
        load_for_inference(unknown)
    inconsistent = edited_copy("inconsistent", lambda c: c["model"]["decoder"].update(dim=32))
    with pytest.raises(RestoreError, match=r"config\.model\.decoder\.dim: expected the encoder width 64"):
        load_for_inference(inconsistent)
    wider = edited_copy("wider", lambda c: c["model"]["latent"].update(dim=256))  # adds a projection
    with pytest.raises(RestoreError, match=r"6/state: parameter 'latent/input_projection/kernel' is missing"):
        load_for_inference(wider)
    more_rows = edited_copy("more_rows", lambda c: c["model"].update(hash_vocab=2048))
    with pytest.raises(RestoreError, match=r"6/state: parameter 'local_encoder/hash_embedding/tables' is float32\[.*"
                       r"1024.*\] in the checkpoint, but the model built from .*meta \(field 'config'\) expects "
                       r"float32\[.*2048.*\]"):  # fmt: skip
        load_for_inference(more_rows)

    # Data: a missing folder, a missing split, a bad override; each before any device work.
    with pytest.raises(pipeline.DataError, match=r"no_data: no such data folder"):
        evaluate_and_write(workdir=workdir, model_dir=None, data_dir=tmp_path / "no_data")
    with pytest.raises(pipeline.DataError, match=r"manifest\.json: no split 'test'; found splits"):
        evaluate_and_write(workdir=workdir, model_dir=None, data_dir=data_dir, split="test")
    with pytest.raises(ConfigError, match=r"config\.patching\.treshold: unknown key"):
        evaluate(load_for_inference(workdir), data_dir, patching_overrides={"treshold": 1.0})
    assert not (workdir / "eval" / "test-step6.json").exists()


def test_hugging_face_folder_evaluates_like_its_saved_import(byte_lm_dir, fixtures_dir, tmp_path):
    """A `transformers` BLT folder is read directly, with its own entropy patcher and threshold:
    the same bits-per-byte as the same weights imported and saved with save_model."""
    from bltjax.convert import hf
    from bltjax.data import entropy

    hf_dir = fixtures_dir / "hf_blt_tiny_b"
    data = tmp_path / "data"
    shutil.copytree(byte_lm_dir[0], data)
    entropy.run(data, hf_dir, log=io.StringIO())  # sidecars from the folder's patcher, at its threshold
    direct = load_for_inference(hf_dir)
    assert direct.step is None and direct.config.patching.mode == "entropy"
    assert direct.config.patching.threshold == pytest.approx(2.494)
    assert direct.config.patching.max_patch_length == 5
    model, params = hf.load_hf_blt(hf_dir)
    saved = load_for_inference(checkpoints.save_model(tmp_path / "imported", direct.config, params))
    assert saved.model.config == direct.model.config == model.config
    a = evaluate(direct, data, split="train", batch_size=8)
    b = evaluate(saved, data, split="train", batch_size=8)
    assert a.n_patches == b.n_patches and a.n_patches > a.n_windows  # real entropy patches, not one per window
    assert math.isfinite(a.bpb) and a.bpb == pytest.approx(b.bpb, rel=1e-6)
    with pytest.raises(RestoreError, match="Hugging Face folder holds one model"):
        load_for_inference(hf_dir, step=3)


@pytest.mark.slow
def test_a_workdir_evaluation_lands_in_the_run_writers_with_progress(run_dir, data_dir, eval_all_devices, tmp_path,
                                                                     capsys):  # fmt: skip
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    workdir = tmp_path / "run"
    shutil.copytree(run_dir[0], workdir)  # the shared run stays as it is
    shutil.rmtree(workdir / "tensorboard" / "eval", ignore_errors=True)  # written by an earlier test's eval
    before = len(read_jsonl(workdir / "metrics.jsonl"))
    result, _ = evaluate_and_write(workdir=workdir, model_dir=None, data_dir=data_dir, batch_size=8)
    progress = capsys.readouterr().err
    targets = f"{result.n_targets / 1000:.1f}k/{result.n_targets / 1000:.1f}k"  # tqdm's SI units
    assert re.search(rf"eval validation: 100%.*{re.escape(targets)} \[\d+:\d\d<\d+:\d\d, ", progress), progress  # ETA

    (record,) = read_jsonl(workdir / "metrics.jsonl")[before:]
    assert record["split"] == "eval/validation"
    assert record["step"] == 6 and record["n_targets"] == eval_all_devices.n_targets
    assert record["bpb"] == pytest.approx(eval_all_devices.bpb, rel=1e-5)
    events = EventAccumulator(str(workdir / "tensorboard" / "eval" / "validation"))
    events.Reload()
    assert [(e.step, pytest.approx(e.value, rel=1e-5)) for e in events.Scalars("bpb")] == [(6, result.bpb)]


def test_eval_results_reach_wandb_as_an_eval_run_of_the_training_run(tmp_path, monkeypatch):
    """W&B offline (test_metrics reads its transaction log): keys eval/<split>/..., one run per (split, step)."""
    import test_metrics

    from bltjax.config import base_blt_config
    from bltjax.inference.evaluate import EvalResult, write_to_run

    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = base_blt_config()
    config.metrics.backends = "jsonl,wandb"
    numbers = dict(bpb=1.25, bpb_bytes=1.5, loss=0.9, nats=9.0, nats_bytes=8.0, n_targets=10, n_bytes=8)
    result = EvalResult(source=str(tmp_path / "run" / "checkpoints" / "6"), step=6, data_dir="d", split="validation",
                        model_type="blt", patching=None, n_patches=3, mean_patch_size=3.3, n_windows=1, n_shards=1,
                        steps=1, batch_size=8, seq_len=16, max_patches=8, devices=1, seconds=0.5,
                        **numbers)  # fmt: skip
    write_to_run(result, tmp_path / "run", config, {"threshold": 1.5})
    group = wandb_tracker.run_id(tmp_path / "run")
    history, _ = test_metrics._wandb_run(tmp_path, f"{group}-eval-validation-threshold1.5-step6")
    assert history[6]["eval/validation-threshold1.5/bpb"] == 1.25
    assert history[6]["eval/validation-threshold1.5/mean_patch_size"] == 3.3
    (record,) = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert record["split"] == "eval/validation-threshold1.5" and record["step"] == 6 and record["bpb"] == 1.25
