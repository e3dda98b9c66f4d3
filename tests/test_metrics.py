"""Loss / bits-per-byte arithmetic (docs/architecture.md §11) and the metrics writer (JSONL, TensorBoard, console).

TensorBoard files are read back with TensorBoard's own EventAccumulator, as TensorBoard shows them.
"""

from __future__ import annotations

import io
import json
import math
import struct
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.proto.event_pb2 import SessionLog
from tensorboard.plugins.hparams import plugin_data_pb2
from test_storage import bucket  # noqa: F401, F811 - the fixture: gs://bucket served by tests/fake_gcs.py

from bltjax.tokenizer import BOE_ID, BOS_ID, EOS_ID, OFFSET
from bltjax.training import metrics

# --- loss arithmetic ------------------------------------------------------------------------------


def test_spec_example_one_bit_per_byte():
    assert metrics.bits_per_byte(693.147, 1000) == pytest.approx(1.000, abs=1e-6)
    assert float(jax.jit(metrics.bits_per_byte)(jnp.float32(693.147), jnp.int32(1000))) == pytest.approx(1.0, 1e-6)


def test_bits_per_byte_of_nothing_is_nan():
    assert math.isnan(metrics.bits_per_byte(0.0, 0))
    assert bool(jnp.isnan(metrics.bits_per_byte(jnp.float32(0.0), jnp.int32(0))))


def test_token_nll_is_float32_negative_log_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 260)).astype(np.float32) * 3
    targets = rng.integers(0, 260, size=(2, 5))
    nll = metrics.token_nll(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets))
    assert nll.dtype == jnp.float32 and nll.shape == (2, 5)
    bf = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), np.float64)
    log_probs = bf - np.log(np.exp(bf).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(nll), expected, rtol=1e-5)
    uniform = metrics.token_nll(jnp.zeros((1, 3, 260)), jnp.array([[4, 5, 6]]))
    np.testing.assert_allclose(np.asarray(uniform), math.log(260), rtol=1e-6)  # 8.02 bits


def test_summaries_separate_special_targets_from_bytes():
    targets = jnp.array([[OFFSET + 104, OFFSET + 105, EOS_ID, BOE_ID], [BOS_ID, OFFSET, OFFSET + 255, BOE_ID]])
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 0]])
    nll = jnp.array([[1.0, 2.0, 4.0, 100.0], [8.0, 16.0, 32.0, 100.0]])
    summary = jax.jit(metrics.summarize_nll)(nll, targets, mask)
    assert float(summary["nats_sum"]) == 63.0 and int(summary["n_targets"]) == 6
    assert float(summary["nats_bytes_sum"]) == 51.0 and int(summary["n_bytes"]) == 4  # no EOS, BOS, BOE
    values = metrics.loss_metrics(summary)
    assert float(values["loss"]) == pytest.approx(63.0 / 6)
    assert float(values["bpb"]) == pytest.approx(63.0 / (6 * math.log(2)))
    assert float(values["bpb_bytes"]) == pytest.approx(51.0 / (4 * math.log(2)))


def test_summaries_add_up_before_dividing():
    a = dict(nats_sum=10.0, n_targets=4, nats_bytes_sum=6.0, n_bytes=2)
    b = dict(nats_sum=2.0, n_targets=4, nats_bytes_sum=2.0, n_bytes=2)
    total = metrics.add_summaries(a, b)
    assert total == dict(nats_sum=12.0, n_targets=8, nats_bytes_sum=8.0, n_bytes=4)
    assert metrics.loss_metrics(total)["bpb"] == pytest.approx(12 / (8 * math.log(2)))  # not the mean of two bpbs


def test_training_loss_is_the_mean_of_the_micro_batch_means():
    """docs/architecture.md §11: a micro-batch's loss is sum(mask * nll) / (sum(mask) + 1e-6), divided by the
    number of micro-batches, so the step's summed gradient is the mean of the micro-batch means."""
    import flax.linen as nn
    import optax

    from bltjax.training.state import TrainState
    from bltjax.training.step import make_train_step

    class Bias(nn.Module):  # the same 260 logits at every position
        @nn.compact
        def __call__(self, tokens):
            return jnp.broadcast_to(self.param("bias", nn.initializers.normal(1.0), (260,)), (*tokens.shape, 260))

    model = Bias()
    params = model.init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))["params"]
    targets = jnp.array([[5, 6, 7], [8, 9, 10], [11, 12, 13], [14, 15, 16]])
    mask = jnp.array([[1, 1, 1], [1, 0, 0], [1, 0, 0], [1, 1, 0]], bool)  # micro-batch a = rows a, a + 2
    batch = dict(tokens=jnp.zeros((4, 3), jnp.int32), targets=targets, loss_mask=mask)

    def mean_loss(bias, rows):
        nll = -jax.nn.log_softmax(bias)[targets[rows]]
        return jnp.sum(mask[rows] * nll) / (jnp.sum(mask[rows]) + 1e-6)

    def step_gradient(grad_accum):
        sgd = optax.sgd(1.0)  # new params = params - gradient
        step = make_train_step(model, sgd, lambda _: 1.0, model_type="byte_lm", grad_accum=grad_accum)
        state = TrainState(step=jnp.int32(0), params=params, opt_state=sgd.init(params))
        new_state, metrics = jax.jit(step)(state, batch)
        return params["bias"] - new_state.params["bias"], metrics

    means = jax.grad(lambda b: (mean_loss(b, jnp.array([0, 2])) + mean_loss(b, jnp.array([1, 3]))) / 2)
    pooled = jax.grad(lambda b: mean_loss(b, jnp.arange(4)))
    got, metrics = step_gradient(2)
    np.testing.assert_allclose(got, means(params["bias"]), atol=1e-6)
    assert not np.allclose(got, pooled(params["bias"]), atol=1e-4)  # 4 and 3 targets: not the pooled mean
    whole, _ = step_gradient(1)
    np.testing.assert_allclose(whole, pooled(params["bias"]), atol=1e-6)
    # The reported loss is the step's nats over its targets, whatever the accumulation.
    assert float(metrics["loss"]) == pytest.approx(float(mean_loss(params["bias"], jnp.arange(4))), rel=1e-5)


# --- progress line ----------------------------------------------------------------------------------


def test_format_progress_full_line():
    values = dict(
        loss=1.2341,
        bpb=1.7804,
        bytes_per_sec=12345.0,
        patches_per_sec=2730.0,
        mean_patch_size=4.523,
        mfu=0.2312,
        learning_rate=3e-4,
    )
    line = metrics.format_progress(120, 2000, values, 83.7)
    assert line == (
        "step  120/2000 | loss 1.234 | bpb 1.780 | 12.3k bytes/s | 2.73k patches/s | patch 4.52 | MFU 23.1% "
        "| lr 3.0e-4 | 0:01:23"
    )


def test_format_progress_without_patches_or_totals():
    line = metrics.format_progress(7, None, dict(loss=2.0, bytes_per_sec=2.5e6, learning_rate=1e-3), 3725)
    assert line == "step 7 | loss 2.000 | 2.5M bytes/s | lr 1.0e-3 | 1:02:05"
    assert metrics.format_progress(0, 10, {}, 0) == "step  0/10 | 0:00:00"


# --- writer -----------------------------------------------------------------------------------------


def _tensorboard_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of one run folder, with TensorBoard's purging of restarted steps."""
    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def _write_steps(writer, steps, scale=1.0):
    for step in steps:
        writer.write(step, dict(loss=scale * step, bpb=np.float32(scale * step / 2), bytes_per_sec=jnp.float32(1e4)))


def test_writer_outputs(tmp_path):
    console = io.StringIO()
    with metrics.MetricsWriter(tmp_path, console=console, total_steps=3) as writer:
        _write_steps(writer, [1, 2, 3])
        writer.write(3, dict(loss=0.5, bpb=0.7), split="validation")
    records = metrics.read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in records] == [(1, "train"), (2, "train"), (3, "train"), (3, "validation")]
    assert records[1]["loss"] == 2.0 and records[1]["bpb"] == 1.0 and records[0]["time"] > 1.6e9
    train = _tensorboard_scalars(tmp_path / "tensorboard" / "train")
    assert train["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert train["bytes_per_sec"][0] == (1, 1e4)
    assert _tensorboard_scalars(tmp_path / "tensorboard" / "validation") == {
        "loss": [(3, 0.5)],
        "bpb": [(3, pytest.approx(0.7))],
    }
    lines = console.getvalue().splitlines()
    assert lines[0].startswith("step 1/3 | loss 1.000 | bpb 0.500 | 10k bytes/s |")
    assert lines[-1].startswith("[validation] step 3/3 | loss 0.500 | bpb 0.700 |")


def test_jsonl_is_flushed_per_record(tmp_path):
    writer = metrics.MetricsWriter(tmp_path, console=None, tensorboard=False)
    writer.write(1, dict(loss=1.0))
    assert metrics.read_jsonl(tmp_path / "metrics.jsonl")[0]["loss"] == 1.0  # before close()
    writer.close()


def test_other_processes_write_nothing(tmp_path):
    console = io.StringIO()
    with metrics.MetricsWriter(tmp_path / "run", process_index=1, console=console) as writer:
        _write_steps(writer, [1, 2])
        assert writer.truncate_after(1) == 0
    assert not (tmp_path / "run").exists() and console.getvalue() == ""


def test_resume_shows_each_step_once(tmp_path):
    with metrics.MetricsWriter(tmp_path, console=None) as writer:
        _write_steps(writer, range(1, 6))
    with metrics.MetricsWriter(tmp_path, console=None) as writer:  # restored from the step-3 checkpoint
        assert writer.truncate_after(3) == 2
        _write_steps(writer, [4, 5], scale=10.0)
    records = metrics.read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    scalars = _tensorboard_scalars(tmp_path / "tensorboard" / "train")
    assert scalars["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    first, second = sorted((tmp_path / "tensorboard" / "train").glob("events.out.tfevents.*"))  # no clobbering
    starts = [e.step for e in EventFileLoader(str(second)).Load() if e.session_log.status == SessionLog.START]
    assert starts == [4]  # the purge marker that makes TensorBoard hide the first run's steps 4 and 5
    assert not [e for e in EventFileLoader(str(first)).Load() if e.HasField("session_log")]


def test_truncate_drops_a_torn_line_and_appends_cleanly(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "split": "train", "loss": 1.0}) + "\n" + '{"step": 2, "spl')
    with metrics.MetricsWriter(tmp_path, console=None, tensorboard=False) as writer:
        writer.write(2, dict(loss=2.0))  # appended after the torn line, on a line of its own
    assert [r["step"] for r in metrics.read_jsonl(path)] == [1, 2]
    with metrics.MetricsWriter(tmp_path, console=None, tensorboard=False) as writer:
        assert writer.truncate_after(1) == 2  # the torn line and step 2
    assert path.read_text() == json.dumps({"step": 1, "split": "train", "loss": 1.0}) + "\n"
    assert not list(tmp_path.glob(".*.tmp"))


def test_config_goes_to_every_backend(tmp_path):
    config = {"model": {"stack": {"n_layers": 2, "window": None}, "dtype": "bfloat16"}, "train": {"lr": 3e-4}}
    with metrics.MetricsWriter(tmp_path, console=None) as writer:
        writer.write_hparams(config)
        writer.write(1, dict(loss=1.0))
    accumulator = EventAccumulator(str(tmp_path / "tensorboard" / "train"))
    accumulator.Reload()
    content = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["model.stack.n_layers"].number_value == 2
    assert hparams["model.stack.window"].string_value == "null"
    assert hparams["model.dtype"].string_value == "bfloat16"
    assert hparams["train.lr"].number_value == pytest.approx(3e-4)
    text = accumulator.Tensors("config/text_summary")[0]  # the Text tab: the whole config as JSON
    assert text.step == 0
    shown = text.tensor_proto.string_val[0].decode()
    assert json.loads("\n".join(line.removeprefix("    ") for line in shown.splitlines())) == config
    records = metrics.read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in records] == [(0, "config"), (1, "train")]
    assert records[0]["config"] == config


def test_a_relaunch_records_its_config_at_the_step_it_starts_from(tmp_path):
    with metrics.MetricsWriter(tmp_path, console=None) as writer:
        writer.write_config({"train": {"steps": 4}})
        _write_steps(writer, [1, 2, 3])
    with metrics.MetricsWriter(tmp_path, console=None) as writer:
        writer.truncate_after(2)
        writer.write_config({"train": {"steps": 8}})
    records = metrics.read_jsonl(tmp_path / "metrics.jsonl")
    configs = [(r["step"], r["config"]["train"]["steps"]) for r in records if r["split"] == "config"]
    assert configs == [(0, 4), (2, 8)]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]


def test_backends_are_chosen_by_config(tmp_path):
    from bltjax.config import base_byte_lm_config

    config = base_byte_lm_config()
    config.metrics.backends = "jsonl"
    with metrics.MetricsWriter.from_config(config, tmp_path, console=None) as writer:
        writer.write_config(config.to_dict())
        writer.write(1, dict(loss=1.0))
    assert (tmp_path / "metrics.jsonl").is_file() and not (tmp_path / "tensorboard").exists()
    config.metrics.backends = "tensorboard"
    with metrics.MetricsWriter.from_config(config, tmp_path / "tb", console=None) as writer:
        writer.write(1, dict(loss=1.0))
    assert not (tmp_path / "tb" / "metrics.jsonl").exists()
    assert _tensorboard_scalars(tmp_path / "tb" / "tensorboard" / "train") == {"loss": [(1, 1.0)]}


def test_writer_is_a_clu_metric_writer(tmp_path):
    with metrics.MetricsWriter(tmp_path, console=None, tensorboard=False) as writer:
        assert isinstance(writer, metrics.MetricWriter)
        writer.write_scalars(4, {"loss": 0.25})  # clu's interface: the train split
        with pytest.raises(NotImplementedError, match="MetricsWriter: writes scalars only, not images"):
            writer.write_images(4, {"x": np.zeros((2, 2, 3))})
    assert metrics.read_jsonl(tmp_path / "metrics.jsonl")[0] == pytest.approx(
        {"step": 4, "split": "train", "loss": 0.25, "time": metrics.read_jsonl(tmp_path / "metrics.jsonl")[0]["time"]}
    )


def test_non_scalar_and_reserved_metrics_are_rejected(tmp_path):
    with metrics.MetricsWriter(tmp_path, console=None, tensorboard=False) as writer:
        with pytest.raises(ValueError, match="scalars"):
            writer.write(1, dict(loss=np.ones(3)))
        with pytest.raises(ValueError, match="'step' is a reserved key"):
            writer.write(1, dict(step=3))


def test_console_defaults_to_stdout(tmp_path, capsys):
    with metrics.MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(5, dict(loss=1.5))
    assert capsys.readouterr().out.startswith("step 5 | loss 1.500 | 0:00:00")


def test_backend_names_are_validated_naming_the_field():
    from bltjax.config import ConfigError, base_byte_lm_config, validate

    config = base_byte_lm_config()
    config.metrics.backends = "tensorboard, jsonl,wandb"
    validate(config)  # spaces and order do not matter
    config.metrics.backends = "tensorboard,mlflow"
    with pytest.raises(ConfigError, match=r"^config\.metrics\.backends: expected names from .*'wandb'.*mlflow"):
        validate(config)


def test_wandb_requested_but_not_installed_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(ImportError, match=r"config\.metrics\.backends: 'wandb' needs .*pip install 'bltjax\[track\]'"):
        metrics.MetricsWriter(tmp_path, console=None, backends=("jsonl", "wandb"))


# --- Weights & Biases, offline: its transaction log read back with its own protobufs -------------------------

WANDB_BLOCK, WANDB_HEADER = 32768, 7  # the LevelDB-style log format of wandb's run-<id>.wandb file


def _wandb_records(path) -> list:
    """Every record of an offline run's ``.wandb`` file (wandb ships no Python reader for it any more)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, position, pending = [], WANDB_HEADER, b""
    while position + WANDB_HEADER <= len(data):
        left = WANDB_BLOCK - position % WANDB_BLOCK
        if left < WANDB_HEADER:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + WANDB_HEADER])
        if length == 0 and kind == 0:
            position += left
            continue
        pending += data[position + WANDB_HEADER : position + WANDB_HEADER + length]
        position += WANDB_HEADER + length
        if kind in (1, 4):  # a FULL record, or the LAST chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _wandb_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _wandb_run(wandb_dir, run_id, timeout_s: float = 60.0):
    """(history rows, config) of one offline run: {step: {key: value}}, {key: value}.

    wandb-core writes the file from its own process, after `finish()` has returned: wait for
    the run's exit record.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        found = list(wandb_dir.glob(f"wandb/offline-run-*-{run_id}*/run-{run_id}.wandb"))  # "-1": same second
        records = _wandb_records(found[0]) if len(found) == 1 else []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(found) == 1, found
    history, config = {}, {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {_wandb_key(item): json.loads(item.value_json) for item in record.history.item}
            history[row.pop("_step")] = {k: v for k, v in row.items() if not k.startswith("_")}
        elif kind == "config":
            config.update({_wandb_key(item): json.loads(item.value_json) for item in record.config.update})
    return history, config


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    wandb_dir = tmp_path / "wandb_files"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return wandb_dir


def test_wandb_run_holds_the_scalars_and_config_and_a_relaunch_resumes_it(tmp_path, wandb_offline):
    workdir = tmp_path / "run"
    config = {"model": {"dim": 8}, "train": {"steps": 4}}
    options = dict(project="bltjax-test", name="tiny")
    with metrics.MetricsWriter(workdir, console=None, backends=("jsonl", "wandb"), wandb=options) as writer:
        writer.write_config(config)
        _write_steps(writer, [1, 2])
        writer.write(2, dict(bpb=0.7), split="validation")
    run_id = (workdir / "wandb_run_id").read_text().strip()
    history, logged_config = _wandb_run(wandb_offline, run_id)
    train_rows = {1: {"train/loss": 1.0, "train/bpb": 0.5}, 2: {"train/loss": 2.0, "train/bpb": 1.0}}
    for row in train_rows.values():
        row["train/bytes_per_sec"] = 1e4
    train_rows[2]["validation/bpb"] = 0.7  # keys are {split}/{name}; one row per step
    assert history == train_rows
    assert logged_config["model"] == {"dim": 8} and logged_config["train"] == {"steps": 4}
    assert [r["split"] for r in metrics.read_jsonl(workdir / "metrics.jsonl")] == ["config", "train", "train",
                                                                                   "validation"]  # fmt: skip

    with metrics.MetricsWriter(workdir, console=None, backends=("wandb",), wandb=options) as writer:  # relaunch
        writer.write(3, dict(loss=3.0))
    assert (workdir / "wandb_run_id").read_text().strip() == run_id
    runs = sorted(wandb_offline.glob("wandb/offline-run-*"))
    assert len(runs) == 2 and all((r / f"run-{run_id}.wandb").is_file() for r in runs)  # the same run, resumed


# --- a run folder in a bucket (tests/fake_gcs.py, through the clients a real job uses) ----------------------


def test_metrics_in_a_bucket_jsonl_and_tensorboard(bucket, tmp_path):  # noqa: F811 - pytest's fixture
    workdir = "gs://bucket/run"
    with metrics.MetricsWriter(workdir, console=None) as writer:
        writer.write_config({"train": {"steps": 3}})
        _write_steps(writer, [1, 2, 3])
    with metrics.MetricsWriter(workdir, console=None) as writer:  # relaunched from step 2
        assert writer.truncate_after(2) == 1
        _write_steps(writer, [3], scale=10.0)
    records = metrics.read_jsonl(f"{workdir}/metrics.jsonl")
    assert [(r["split"], r["step"], r.get("loss")) for r in records] == [
        ("config", 0, None), ("train", 1, 1.0), ("train", 2, 2.0), ("train", 3, 30.0)]  # fmt: skip
    events = [name for name in bucket.objects("bucket") if name.startswith("run/tensorboard/train/events.out")]
    assert len(events) == 2  # one event file per launch, each uploaded whole
    local = tmp_path / "events"
    local.mkdir()
    for name in events:
        (local / name.rsplit("/", 1)[1]).write_bytes(bucket.file("bucket", name).read_bytes())
    assert _tensorboard_scalars(local)["loss"] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert not list(tmp_path.parent.glob("**/gs:"))  # nothing written to a local "gs:" folder


def test_clu_writers_load_without_tensorflow():
    """clu's `metric_writers/__init__` imports TensorFlow; bltjax registers the package without running it,
    so the writers work in an environment without TensorFlow (this one)."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed here; the case under test is an environment without it")
    code = (
        "import sys\n"
        "import bltjax.training.metrics\n"
        "print('clu.metric_writers' in sys.modules, 'tensorflow' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.split() == ["True", "False"], result.stdout + result.stderr
