"""Every path on gs://: prepare -> entropy -> train -> kill -> resume -> eval on a bucket, offline.

The bucket is `fake_gcs.FakeGCS`, a local server of the Cloud Storage JSON API. The programs run
unchanged in subprocesses and reach it through the clients a real job uses: gcsfs (etils.epath's
gs:// backend without TensorFlow), TensorStore's own gcs driver (orbax's arrays) and
google-cloud-storage (orbax's bucket check). The original bug wrote ``<cwd>/gs:/bucket/...``, so
every program runs in an empty folder that must stay empty.

Faster in-process tests below check the pieces: atomic writes, ranged reads of remote shards,
the pipeline on a bucket, the completeness rule of a checkpoint step in a bucket, and the
start-up errors for what must stay local.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from fake_gcs import FakeGCS

from bltjax import checkpoints
from bltjax.runtime import atomic, paths

REPO = pathlib.Path(__file__).resolve().parents[1]
CORPUS = REPO / "bltjax" / "data" / "corpus"
TINY = str(REPO / "experiments" / "blt_tiny.py")
ENTROPY_TINY = str(REPO / "experiments" / "entropy_model.py") + ":tiny"
THRESHOLD = 5.0  # random tiny entropy models give entropies around ln 260 = 5.56
STEPS, CHECKPOINT_EVERY = 12, 4


def _objects(gcs: FakeGCS, prefix: str = "") -> list[str]:
    return sorted(name for name in gcs.objects("bucket") if name.startswith(prefix))


def _no_gs_folder(root: pathlib.Path) -> list[str]:
    """Local paths with a ``gs:`` component: what `Path("gs://b/x").absolute()` used to create."""
    return [str(p) for p in root.rglob("*") if p.name == "gs:" or "gs:" in p.parts]


# --- the whole pipeline, each step a real program ---------------------------------------------------


@pytest.mark.slow
def test_prepare_entropy_train_kill_resume_eval_on_a_bucket(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    with FakeGCS(tmp_path / "gcs") as gcs:
        env = dict(os.environ, **gcs.env())
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
        env["BLTJAX_COMPILE_CACHE"] = jax.config.jax_compilation_cache_dir or ""

        def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
            result = subprocess.run(
                [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
            )
            assert result.returncode == 0, f"{args[:2]}: {result.stderr[-4000:]}"
            return result

        # 1. prepare: local corpus files -> shards in the bucket.
        inputs = [CORPUS / "jargon_file_4.4.7_appendix_a.txt", CORPUS / "zh_tang_song_poems.jsonl"]
        run("-m", "bltjax.prepare", "--input", *map(str, inputs), "--out", "gs://bucket/data",
            "--shard_bytes", "65536", "--val_fraction", "0.1")  # fmt: skip
        manifest = json.loads((gcs.file("bucket", "data/manifest.json")).read_text())
        train_shards = [s["name"] for s in manifest["splits"]["train"]]
        assert len(train_shards) >= 2 and manifest["splits"]["validation"]
        assert f"data/{train_shards[0]}.tokens" in _objects(gcs, "data/")

        # 2. an entropy model saved into the bucket (save_model's object-store path), then its sidecars.
        run("-c", "import jax, sys\n"
            "from bltjax.checkpoints import save_model\nfrom bltjax.config import load_config\n"
            "from bltjax.models.factory import build_model, example_inputs\n"
            f"config = load_config({ENTROPY_TINY!r})\nmodel = build_model(config)\n"
            "params = jax.jit(model.init)(jax.random.key(0), *example_inputs(config))['params']\n"
            "save_model('gs://bucket/entropy_model', config, params)\n")  # fmt: skip
        assert {"entropy_model/config.json", "entropy_model/params/_CHECKPOINT_METADATA"} <= set(_objects(gcs))
        run("-m", "bltjax.entropy", "--data", "gs://bucket/data", "--entropy_model", "gs://bucket/entropy_model",
            "--threshold", str(THRESHOLD))  # fmt: skip
        sidecars = json.loads(gcs.file("bucket", "data/sidecars.json").read_text())
        tag = sidecars["tag"]
        for name in train_shards:
            assert {f"data/{name}.entropy.f16", f"data/{name}.starts.{tag}.bits"} <= set(_objects(gcs, "data/"))

        # 3. train on entropy patches from the bucket into the bucket; SIGKILL once step 4 is saved.
        experiment = tmp_path / "blt_tiny_entropy.py"  # a threshold of None cannot be set by a flag
        experiment.write_text(
            f"import runpy\n\n\ndef get_config(arg=None):\n"
            f"    config = runpy.run_path({TINY!r})['get_config']()\n"
            f"    config.patching.mode, config.patching.threshold = 'entropy', {THRESHOLD}\n"
            "    return config\n"
        )
        train = [
            "-m", "bltjax.train", "--config", str(experiment), "--workdir", "gs://bucket/run",
            "--config.data.path=gs://bucket/data", f"--config.train.steps={STEPS}",
            f"--config.train.checkpoint_every={CHECKPOINT_EVERY}", "--config.train.async_checkpoint=False",
            "--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.eval_batches=1",
            "--config.optimizer.warmup_steps=2", "--config.data.batch_size=8",
        ]  # fmt: skip
        proc = subprocess.Popen([sys.executable, *train], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        first_save = f"run/checkpoints/{CHECKPOINT_EVERY}/commit_success.txt"
        deadline = time.time() + 600
        while gcs.generation("bucket", first_save) is None and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # a crash: no chance to save or clean up
        _, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {err[-3000:]}"
        records = [json.loads(line) for line in gcs.file("bucket", "run/metrics.jsonl").read_text().splitlines()]
        killed_at = max(r["step"] for r in records if r.get("split") == "train")
        assert CHECKPOINT_EVERY <= killed_at < STEPS

        resumed = run(*train)
        resumed_at = int(resumed.stdout.split("at step ")[1].split()[0])
        assert CHECKPOINT_EVERY <= resumed_at < STEPS and "resumed gs://bucket/run" in resumed.stdout
        records = [json.loads(line) for line in gcs.file("bucket", "run/metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in records if r.get("split") == "train"]
        assert steps == list(range(1, STEPS + 1))  # each step once: the lines after the checkpoint were replaced
        assert f"run/checkpoints/{STEPS}/commit_success.txt" in _objects(gcs, "run/")
        # The arrays went through TensorStore's gcs driver (OCDBT files under the step's state item).
        assert any("ocdbt" in name for name in _objects(gcs, f"run/checkpoints/{STEPS}/state/"))
        assert any(r.startswith("POST /upload/") and "ocdbt" in r for r in gcs.requests)

        # 4. evaluate the run from the bucket; the result lands next to it.
        run("-m", "bltjax.eval", "--model", "gs://bucket/run", "--data", "gs://bucket/data")
        result = json.loads(gcs.file("bucket", f"run/eval/validation-step{STEPS}.json").read_text())
        assert result["bpb"] > 0

    assert list(cwd.iterdir()) == []  # nothing local: no gs: folder, no stray file
    assert _no_gs_folder(tmp_path) == [] and _no_gs_folder(REPO) == []


# --- the pieces, in this process ---------------------------------------------------------------------


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """gs://bucket served by a FakeGCS for this process's gcsfs (fresh filesystem objects)."""
    import fsspec
    import fsspec.registry
    import gcsfs

    with FakeGCS(tmp_path / "gcs") as gcs:
        for key, value in gcs.env().items():
            monkeypatch.setenv(key, value)
        monkeypatch.setitem(fsspec.config.conf, "gcs", {"token": "anon"})
        # gcsfs reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT when imported (see FakeGCS.env): here, after the
        # fact, its plain JSON-API filesystem is registered directly.
        for protocol in ("gcs", "gs"):
            monkeypatch.setitem(sys.modules["fsspec.registry"]._registry, protocol, gcsfs.core.GCSFileSystem)
        _forget_filesystems()
        yield gcs
        _forget_filesystems()


def _forget_filesystems() -> None:
    """Drops cached gcsfs instances (and their listings of another test's bucket)."""
    import gcsfs
    from etils.epath import backend

    gcsfs.GCSFileSystem.clear_instance_cache()
    gcsfs.core.GCSFileSystem.clear_instance_cache()
    backend.fsspec_backend._get_filesystem.cache_clear()


def test_atomic_write_uploads_one_object_and_leaves_no_temporary(bucket):
    atomic.write_atomic("gs://bucket/out/a.json", b'{"a": 1}\n')
    atomic.write_atomic("gs://bucket/out/b.bin", lambda local: pathlib.Path(local).write_bytes(b"xyz"))
    assert _objects(bucket) == ["out/a.json", "out/b.bin"]
    assert bucket.file("bucket", "out/b.bin").read_bytes() == b"xyz"
    assert atomic.sha256_file("gs://bucket/out/b.bin") == atomic.sha256_file(bucket.file("bucket", "out/b.bin"))
    # One upload per write: readers never see a partial object, and no temporary object is made.
    uploads = [r for r in bucket.requests if r.startswith("POST /upload/") and "upload_id=" not in r]
    assert len(uploads) == 2 and not any(".tmp" in r for r in bucket.requests)


def test_remote_shards_are_read_by_byte_range(bucket, tmp_path):
    from bltjax.data import prepare, shards

    prepare.prepare([CORPUS / "en_fortunes.jsonl"], "gs://bucket/data", shard_bytes=1 << 14, progress=False)
    prepare.prepare([CORPUS / "en_fortunes.jsonl"], tmp_path / "local", shard_bytes=1 << 14, progress=False)
    info = shards.load_manifest("gs://bucket/data").shards("train")[1]
    remote, remote_offsets = shards.read_shard("gs://bucket/data", "train", info.index)
    local, local_offsets = shards.read_shard(tmp_path / "local", "train", info.index)
    assert isinstance(remote, shards.RangedArray) and isinstance(local, np.memmap)
    np.testing.assert_array_equal(remote_offsets, local_offsets)
    assert len(remote) == len(local) and remote[0] == local[0] and remote[-1] == local[-1]
    np.testing.assert_array_equal(remote[100:357], local[100:357])
    np.testing.assert_array_equal(np.asarray(remote), np.asarray(local))
    bucket.requests.clear()
    remote[1000:1129]
    (read,) = bucket.requests  # one ranged GET for a window, not the shard
    assert "alt=media" in read
    shards.verify_shard("gs://bucket/data", "train", info.index)  # sizes and sha256 through the bucket


def test_pipeline_reads_the_same_batches_from_a_bucket(bucket, tmp_path):
    from bltjax.config import load_config
    from bltjax.data import pipeline, prepare

    inputs = [CORPUS / "en_fortunes.jsonl"]
    prepare.prepare(inputs, "gs://bucket/data", shard_bytes=1 << 14, val_fraction=0.1, progress=False)
    prepare.prepare(inputs, tmp_path / "local", shard_bytes=1 << 14, val_fraction=0.1, progress=False)
    config = load_config(TINY)
    batches = []
    for data in ("gs://bucket/data", tmp_path / "local"):
        dataset = pipeline.make_dataset(config, data, "train", seed=0, process_index=0, process_count=1)
        batches.append([pipeline.batch_at_step(dataset, step) for step in range(2)])
    for remote, local in zip(*batches, strict=True):
        for key in local:
            np.testing.assert_array_equal(remote[key], local[key])


def test_a_bucket_step_is_complete_only_with_orbax_commit_file(bucket):
    step = paths.resolve("gs://bucket/run/checkpoints/8")
    for name in (checkpoints.METADATA_FILE, "state/x", "data/x", "meta/x"):
        bucket.write("bucket", f"run/checkpoints/8/{name}", b"{}")
    assert not checkpoints.is_complete_step(step)  # orbax writes in place: no commit file, still being written
    assert checkpoints.complete_steps("gs://bucket/run") == []
    bucket.write("bucket", f"run/checkpoints/8/{checkpoints.COMMIT_SUCCESS_FILE}", b"")
    assert checkpoints.complete_steps("gs://bucket/run") == [8]


def test_local_only_things_fail_at_start_naming_the_path(bucket):
    from bltjax.inference.restore import load_for_inference

    bucket.write("bucket", "hf/config.json", b"{}")
    bucket.write("bucket", "hf/model.safetensors", b"")
    with pytest.raises(paths.PathError, match=r"gs://bucket/hf: a Hugging Face model folder .* must be a local path"):
        load_for_inference("gs://bucket/hf")


def test_paths_resolve_keeps_uris():
    assert os.fspath(paths.resolve("gs://bucket/run")) == "gs://bucket/run"
    assert os.fspath(paths.resolve("run")) == os.path.join(os.getcwd(), "run")
    with pytest.raises(paths.PathError, match="unsupported URI scheme 'nope://'"):
        paths.resolve("nope://bucket/x")


def test_sweep_folder_in_a_bucket_plans_prepares_and_reports(bucket, tmp_path):
    from test_sweep import TINY_SWEEP

    from bltjax.sweep import job_config, plan, report, runner, spec, stages

    sweep_file = tmp_path / "tiny_sweep.py"
    sweep_file.write_text(TINY_SWEEP)
    sweep = spec.load_sweep(str(sweep_file))
    made = plan.make_plan(sweep, "gs://bucket/sweep")
    plan.write_plan(made, "gs://bucket/sweep")
    assert plan.load_plan("gs://bucket/sweep") == json.loads(bucket.file("bucket", "sweep/plan.json").read_text())
    job = made["jobs"][0]
    config = job_config.get_config(f"gs://bucket/sweep/jobs/{job['name']}.json")
    assert config.data.path == "gs://bucket/sweep/data"
    assert runner.train_command("gs://bucket/sweep", job["name"])[-1] == f"gs://bucket/sweep/runs/{job['name']}"
    stages.ensure_data(paths.resolve("gs://bucket/sweep"), made["stages"]["data"])
    assert "sweep/data/manifest.json" in _objects(bucket) and "sweep/stages/data.json" in _objects(bucket)
    log = runner.AppendedText(runner.run_dir("gs://bucket/sweep", job["name"]) / runner.LOG_FILE)
    log.write("first line\n")
    log.close()
    with runner.AppendedText(runner.run_dir("gs://bucket/sweep", job["name"]) / runner.LOG_FILE) as log:
        log.write("second line\n")
    assert bucket.file("bucket", f"sweep/runs/{job['name']}/train.log").read_text() == "first line\nsecond line\n"
    files = report.write_report("gs://bucket/sweep")
    assert {os.fspath(p) for p in files.values()} >= {"gs://bucket/sweep/report.md", "gs://bucket/sweep/report.csv"}
    assert all(os.fspath(p).removeprefix("gs://bucket/") in _objects(bucket) for p in files.values())


def test_python_files_of_sweeps_and_experiments_must_be_local():
    from bltjax.sweep import spec

    with pytest.raises(paths.PathError, match="gs://b/s.py: --sweep .* must be a local path"):
        spec.load_sweep("gs://b/s.py")
    with pytest.raises(paths.PathError, match="gs://b/e.py: sweep.base .* must be a local path"):
        spec.load_experiment("gs://b/e.py", "base")
