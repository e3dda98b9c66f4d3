"""The BPE token baseline end to end: token batches, training by the same trainer, bits per byte over the
bytes the tokens cover (training metrics and python -m bltjax.eval), FLOPs per byte and sweep plans."""

from __future__ import annotations

import io
import math

import jax
import ml_collections
import numpy as np
import pytest

from bltjax.config import ConfigError, base_token_lm_config, load_config, validate
from bltjax.data import bpe, pipeline, token_pipeline
from bltjax.data.errors import DataError
from bltjax.models import flops
from bltjax.training.metrics import read_jsonl
from bltjax.training.token_metrics import summarize_token_nll

VOCAB = 1024
LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def tokens(corpus_data, tmp_path_factory):
    """The bundled corpus as BPE-1024 token shards."""
    return bpe.tokenize_data(corpus_data, VOCAB, out=tmp_path_factory.mktemp("tokens") / "bpe", progress=False)


def _config(folder, **train) -> ml_collections.ConfigDict:
    config = load_config("experiments/token_lm.py:tiny")
    config.data.path = str(folder)
    config.model.vocab_size = VOCAB + 4
    config.data.batch_size = 8  # one row per fake device
    config.train.steps = train.get("steps", 40)
    config.train.log_every = 5
    config.train.eval_every = 0
    config.train.eval_batches = 2
    config.train.checkpoint_every = 0
    config.optimizer.warmup_steps = 4
    config.optimizer.learning_rate = 3e-3
    config.metrics.backends = "jsonl"
    return config


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def test_summary_counts_the_bytes_the_targets_cover():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 300)).astype(np.float32)
    targets = np.array([[5, 9, 2, 1, 7, 0], [4, 4, 4, 2, 1, 8]], np.int32)  # EOS 2, BOS 1, padding 0
    mask = targets != 0
    covered = np.where(targets >= 4, targets % 3 + 1, np.where((targets == 1) | (targets == 2), 1, 0))
    nll = -np.take_along_axis(_log_softmax(logits), targets[..., None], axis=-1)[..., 0]
    sums = jax.device_get(summarize_token_nll(jax.numpy.asarray(nll), targets, mask, covered))
    text = mask & (targets >= 4)
    assert sums["n_targets"] == mask.sum() and sums["n_bytes"] == covered[text].sum()
    assert sums["n_target_bytes"] == covered[mask].sum()
    np.testing.assert_allclose(sums["nats_sum"], nll[mask].sum(), rtol=1e-6)
    np.testing.assert_allclose(sums["nats_bytes_sum"], nll[text].sum(), rtol=1e-6)


def test_token_batches_are_a_function_of_the_step(tokens):
    config = _config(tokens.folder)
    table = bpe.BPETokenizer.from_folder(tokens.folder).stream_bytes
    one = pipeline.make_dataset(config, tokens.folder, "train", seed=0, process_index=0, process_count=1)
    batch = pipeline.batch_at_step(one, 3)
    assert set(batch) == {"tokens", "targets", "loss_mask", "target_bytes"}
    assert batch["tokens"].shape == (8, 64) and batch["tokens"].max() < VOCAB + 4
    np.testing.assert_array_equal(batch["target_bytes"], table[batch["targets"]])
    np.testing.assert_array_equal(batch["tokens"][:, 1:], batch["targets"][:, :-1])
    again = pipeline.make_dataset(config, tokens.folder, "train", seed=0, process_index=0, process_count=1)
    np.testing.assert_array_equal(pipeline.batch_at_step(again, 3)["tokens"], batch["tokens"])
    halves = [
        pipeline.make_dataset(config, tokens.folder, "train", seed=0, process_index=p, process_count=2) for p in (0, 1)
    ]
    stacked = np.concatenate([pipeline.batch_at_step(h, 3)["tokens"] for h in halves])
    np.testing.assert_array_equal(stacked, batch["tokens"])
    assert pipeline.has_split(tokens.folder, "validation")


def test_a_model_of_another_vocabulary_is_refused(tokens):
    config = _config(tokens.folder)
    config.model.vocab_size = 4100
    with pytest.raises(DataError, match=r"config.model.vocab_size: expected 1028"):
        pipeline.make_dataset(config, tokens.folder, "train", seed=0, process_index=0, process_count=1)
    config.model.vocab_size = 100
    with pytest.raises(ConfigError, match="config.model.vocab_size"):
        validate(config)
    byte_config = load_config("experiments/byte_lm.py:tiny")
    byte_config.model.vocab_size = 1028  # only a token LM may leave the byte vocabulary
    with pytest.raises(ConfigError, match="260"):
        validate(byte_config)


@pytest.fixture(scope="module")
def token_run(tokens, trained_run):
    return trained_run(_config(tokens.folder))


def test_a_few_steps_lower_the_loss(token_run, tokens):
    records = [r for r in read_jsonl(token_run.workdir / "metrics.jsonl") if r.get("split") == "train"]
    first, last = records[0], records[-1]
    assert last["step"] == 40 and last["loss"] < first["loss"] - 0.5, (first["loss"], last["loss"])
    # bits per byte: nats over the bytes the tokens cover, so fewer bits per byte than per token
    assert last["bpb"] < last["loss"] / LN2
    assert last["bytes_per_token"] == pytest.approx(tokens.manifest.bytes_per_token, rel=0.25)
    config = _config(tokens.folder)
    expected = flops.analytic_flops_per_byte(config, bytes_per_token=last["bytes_per_token"]).train
    assert last["flops_per_byte"] == pytest.approx(expected, rel=1e-9)
    assert token_run.result.validation_bpb is not None and math.isfinite(token_run.result.validation_bpb)


def test_eval_bits_per_byte_equal_a_direct_computation(token_run, tokens):
    from bltjax.inference.evaluate import evaluate
    from bltjax.inference.restore import load_for_inference

    loaded = load_for_inference(token_run.workdir, devices=jax.devices()[:1])
    result = evaluate(loaded, tokens.folder, split="validation", batch_size=3, progress=False)
    table = bpe.BPETokenizer.from_folder(tokens.folder).stream_bytes
    seq_len = int(loaded.config.data.seq_len)
    nats = nats_text = 0.0
    covered = covered_text = targets_seen = 0
    for shard in token_pipeline.read_split(tokens.folder, "validation"):
        ids = np.asarray(np.fromfile(shard.tokens_path, "<u2"), np.int64)
        for start in range(0, ids.size - 1, seq_len):
            window = ids[start : start + seq_len + 1]
            inputs = np.zeros((1, seq_len), np.int32)
            inputs[0, : window.size - 1] = window[:-1]
            logits = np.asarray(loaded.model.apply({"params": loaded.params}, inputs))[0, : window.size - 1]
            target = window[1:]
            nll = -_log_softmax(logits)[np.arange(target.size), target]
            text = target >= 4
            nats, nats_text = nats + nll.sum(), nats_text + nll[text].sum()
            covered, covered_text = covered + table[target].sum(), covered_text + table[target][text].sum()
            targets_seen += target.size
    assert result.n_targets == targets_seen
    assert result.n_bytes == covered_text == sum(s.bytes for s in tokens.manifest.shards("validation"))
    assert result.bpb == pytest.approx(nats / (LN2 * covered), rel=1e-5)
    assert result.bpb_bytes == pytest.approx(nats_text / (LN2 * covered_text), rel=1e-5)
    assert result.loss == pytest.approx(nats / targets_seen, rel=1e-5)
    assert result.model_type == "token_lm" and result.max_patches is None


def test_eval_command_on_a_token_workdir(token_run, tokens, tmp_path, capsys):
    from bltjax import eval as eval_program

    out = tmp_path / "eval.json"
    assert eval_program.main(["--model", str(token_run.workdir), "--data", str(tokens.folder), "--out", str(out)]) == 0
    assert "bits per byte" in capsys.readouterr().out and out.is_file()


def test_flops_per_byte_of_a_token_lm(tokens):
    config = base_token_lm_config()
    config.data.seq_len, config.model.vocab_size = 512, 32004
    stack = config.model.stack
    with pytest.raises(ValueError, match="config.data.bytes_per_token"):
        flops.analytic_flops_per_byte(config)
    config.data.bytes_per_token = 4.0
    forward = flops.analytic_flops_per_byte(config).total_forward
    # FL_BPE: one pass of the token transformer (context = its window or the row's tokens, head of the
    # vocabulary) per token, divided by the bytes a token covers
    per_token = flops.transformer_flops(stack.dim, stack.n_layers, min(stack.window, 512), 32004)
    assert forward == pytest.approx(per_token / 4.0, rel=1e-12)
    assert flops.analytic_flops_per_byte(config, bytes_per_token=2.0).total_forward == pytest.approx(2 * forward)
    # the measured rate of the tokenizer is what a token folder gives a config
    filled = token_pipeline.with_bytes_per_token(_config(tokens.folder))
    assert filled.data.bytes_per_token == tokens.manifest.bytes_per_token


def test_the_flops_table_of_a_token_lm_names_its_token_embedding(tokens):
    from bltjax.flops import format_breakdown

    table = format_breakdown(_config(tokens.folder))
    assert table.startswith("token LM, context") and "| token embedding | 0 |" in table
    assert "byte embedding" not in table


TOKEN_SWEEP = """
from ml_collections import ConfigDict
from bltjax.config import base_blt_config, base_token_lm_config, stack_config


def _train(config):
    config.data.batch_size = 8
    config.train.steps = 20
    config.train.log_every = 1
    config.train.eval_batches = 1
    config.train.async_checkpoint = False
    config.optimizer.warmup_steps = 2
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
    config.data.seq_len = 64
    config.data.max_patches = 17
    return _train(config)


def token():
    config = base_token_lm_config()
    config.model.stack = stack_config(32, 1, 2)
    return _train(config)


def get_config(arg=None):
    return {"blt": blt, "token": token}[arg or "blt"]()


def get_sweep(arg=None):
    return ConfigDict(dict(
        base=__file__ + ":blt",
        token_baseline=__file__ + ":token",
        bpe_vocab_size=512,
        modes=["static"],
        patch_sizes=[4.0],
        budget_train_flops=2.0e10,
        evals=2,
        data=dict(corpus=["jargon_file_4.4.7_appendix_a.txt", "zh_tang_song_poems.jsonl"], val_fraction=0.1,
                  shard_bytes=64 * 1024),
    ))
"""


def test_a_sweep_plans_the_token_baseline_at_the_same_flops_and_trains_it(tmp_path):
    from bltjax.sweep import job_config, plan, report, runner
    from bltjax.sweep.__main__ import main as sweep_main
    from bltjax.training.trainer import train

    sweep_file = tmp_path / "token_sweep.py"
    sweep_file.write_text(TOKEN_SWEEP)
    out = tmp_path / "sweep"
    assert sweep_main(["plan", "--sweep", str(sweep_file), "--out", str(out)]) == 0
    loaded = plan.load_plan(out)
    blt_job, token_job = loaded["jobs"]
    assert token_job["kind"] == "token_lm" and token_job["name"].startswith("bpe-")
    tokens = loaded["stages"]["tokens"]
    manifest = bpe.load_manifest(out / "data" / tokens["folder"])
    assert tokens["vocab_size"] == 512 and tokens["bytes_per_token"] == manifest.bytes_per_token
    config = token_job["config"]
    # the same bytes per row as the BLT's 64, the tokenizer's vocabulary and rate
    assert config["data"]["seq_len"] == round(64 / manifest.bytes_per_token)
    assert config["model"]["vocab_size"] == 516 and config["data"]["bytes_per_token"] == manifest.bytes_per_token
    # FLOP-matched: its FL_BPE at the measured bytes per token is the plan's budget (within the tolerance)
    budget = loaded["budget"]["inference_flops_per_byte"]
    forward = token_job["flops_per_byte"]["total_forward"]
    assert abs(forward / budget - 1) <= 0.05 and token_job["fit"]["within_tolerance"]
    assert forward == pytest.approx(
        flops.analytic_flops_per_byte(ml_collections.ConfigDict(config)).total_forward, rel=1e-12
    )
    for job in (blt_job, token_job):  # the same training FLOPs: steps x rows x bytes per row x train FLOPs/byte
        s = job["schedule"]
        row_bytes = s["seq_len"] * (manifest.bytes_per_token if job is token_job else 1.0)
        assert s["train_flops"] == pytest.approx(
            s["steps"] * s["batch_size"] * row_bytes * job["flops_per_byte"]["train"]
        )
        assert abs(s["train_flops"] / 2.0e10 - 1) <= 0.5 / s["steps"] + 1e-9
    # the job's config reads the shared token shards and trains
    job = job_config.get_config(str(plan.job_file(out, token_job["name"])))
    assert job.data.path == str(out / "data" / tokens["folder"])
    job.train.steps, job.train.eval_every, job.train.checkpoint_every, job.optimizer.warmup_steps = 4, 4, 0, 1
    job.mesh.data = 1
    result = train(job, runner.run_dir(out, token_job["name"]), console=io.StringIO(), devices=jax.devices()[:1])
    assert result.final_step == 4 and math.isfinite(result.validation_bpb)
    rows = {r.name: r for r in report.gather(out)}
    assert rows[token_job["name"]].final_bpb == pytest.approx(result.validation_bpb)
    assert rows[token_job["name"]].inference_flops_per_byte > 0


def test_compile_roofline_and_generate_know_a_token_lm(token_run, tokens):
    from bltjax.inference.generation.folders import GenerateError, generate_from_folder
    from bltjax.runtime import aot, roofline

    config = token_pipeline.with_bytes_per_token(_config(tokens.folder))
    batch = aot._abstract_batch(config, None)
    assert batch["target_bytes"].shape == (8, 64) and batch["target_bytes"].dtype == np.int32
    # a step's model FLOPs: training FLOPs per byte x the bytes of its rows (tokens x bytes per token)
    per_byte = flops.analytic_flops_per_byte(config).train
    expected = per_byte * 8 * 64 * tokens.manifest.bytes_per_token
    assert roofline.model_flops_per_step(config) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(GenerateError, match="token_lm"):  # its ids are not bytes: refused by name
        generate_from_folder(workdir=token_run.workdir, prompts=["hi"], max_bytes=4, out=io.StringIO())
