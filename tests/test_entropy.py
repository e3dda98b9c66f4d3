"""The exported-model format (checkpoints), the entropy pass (data.entropy) and its sidecars (data.sidecars).

Shards are written here by hand exactly as docs/data.md specifies (uint16 `.tokens`, int64
`.docs.npy`, `manifest.json`), so these tests do not depend on `bltjax.data.prepare`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bltjax import checkpoints
from bltjax.config import load_config
from bltjax.data import entropy as E
from bltjax.data import sidecars as S
from bltjax.data.shards import load_manifest
from bltjax.models.byte_lm import ByteLM, next_byte_entropy
from bltjax.models.factory import build_model, example_inputs
from bltjax.patching import PatchingRule, patch_start_mask
from bltjax.runtime.progress import progress_bar

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = f"{REPO / 'experiments' / 'entropy_model.py'}:tiny"
THRESHOLD = 1.0  # entropies of the (scaled) random tiny model: median ~0.75 nats, 95% below ~1.8
REF_LEN = 512  # the reference pass pads every document to this (with junk) for one compile


def _random_documents(rng: np.random.Generator, count: int, longest: int) -> list[np.ndarray]:
    """BOS + bytes + EOS documents (docs/architecture.md §1); a few repeated phrases so entropies vary."""
    phrases = [np.frombuffer(w.encode(), np.uint8) for w in ("the cat ", "sat on ", "a mat. ", "BLT! ")]
    docs = []
    for _ in range(count):
        n = int(rng.integers(1, longest))
        body = np.concatenate([phrases[i] for i in rng.integers(0, len(phrases), n // 4 + 1)])[:n]
        noise = rng.random(body.size) < 0.2
        body = np.where(noise, rng.integers(0, 256, body.size), body).astype(np.int64) + 4
        docs.append(np.concatenate([[1], body, [2]]).astype(np.uint16))
    return docs


def write_shards(folder: pathlib.Path, splits: dict[str, list[list[np.ndarray]]]) -> pathlib.Path:
    """A prepared data folder per docs/data.md: one list of documents per shard."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"format": "bltjax-byte-shards", "format_version": 1, "settings": {}, "splits": {}}
    splits = {"train": [], "validation": [], **splits}
    for split, shards in splits.items():
        manifest["splits"][split] = []
        for index, docs in enumerate(shards):
            name = f"{split}-{index:05d}"
            tokens = np.concatenate(docs).astype("<u2")
            offsets = np.concatenate([[0], np.cumsum([d.size for d in docs])]).astype(np.int64)
            (folder / f"{name}.tokens").write_bytes(tokens.tobytes())
            np.save(folder / f"{name}.docs.npy", offsets)
            manifest["splits"][split].append(
                {
                    "name": name,
                    "documents": len(docs),
                    "tokens": int(tokens.size),
                    "bytes": int(tokens.size - 2 * len(docs)),
                    "tokens_sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
                    "docs_sha256": hashlib.sha256((folder / f"{name}.docs.npy").read_bytes()).hexdigest(),
                }
            )
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return folder


def shard_documents(folder: pathlib.Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.fromfile(folder / f"{name}.tokens", "<u2")
    return tokens, np.load(folder / f"{name}.docs.npy")


def reference_entropies(model, params, doc: np.ndarray) -> np.ndarray:
    """The model on one document alone (float32); junk after it proves causality is relied on only."""
    padded = np.random.default_rng(7).integers(0, 260, REF_LEN)
    padded[: doc.size] = doc
    return np.asarray(_reference_fn(model)(params, jnp.asarray(padded[None], jnp.int32)))[0, : doc.size]


_REFERENCE_FNS: dict = {}


def _reference_fn(model):
    if model not in _REFERENCE_FNS:
        _REFERENCE_FNS[model] = jax.jit(lambda p, t: next_byte_entropy(model.apply({"params": p}, t)))
    return _REFERENCE_FNS[model]


def mtimes(folder: pathlib.Path, pattern: str) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob(pattern))}


def _init(model, config, seed: int) -> dict:
    """Plain numpy params (unboxed) of a freshly initialised model.

    The output head is scaled up (as the shared HF fixture does) so that entropies spread over
    most of [0, ln 260] instead of all sitting near ln 260.
    """
    boxed = jax.jit(lambda: model.init(jax.random.key(seed), *example_inputs(config))["params"])()
    params = jax.tree.map(np.asarray, nn.meta.unbox(boxed))
    if "output" in params:
        params["output"]["kernel"] = params["output"]["kernel"] * 8
    return params


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config, model, params, saved model folder) of a random tiny entropy model."""
    config = load_config(TINY)
    model = build_model(config)
    params = _init(model, config, 0)
    folder = checkpoints.save_model(tmp_path_factory.mktemp("models") / "tiny", config, params)
    return config, model, params, folder


@pytest.fixture(scope="module")
def prepared(tiny, tmp_path_factory):
    """Two small train shards + one validation shard, with sidecars for THRESHOLD (computed once)."""
    rng = np.random.default_rng(0)
    docs = _random_documents(rng, 36, 300)
    folder = write_shards(
        tmp_path_factory.mktemp("data") / "prepared",
        {"train": [docs[:14], docs[14:26]], "validation": [docs[26:]]},
    )
    summary = E.run(folder, tiny[3], threshold=THRESHOLD, log=io.StringIO())
    return folder, summary


def _copy(prepared_folder: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(prepared_folder, tmp_path / "data", copy_function=shutil.copy2))


# --- checkpoints ---------------------------------------------------------------------------


def test_save_load_round_trip_and_fingerprint(tiny, tmp_path):
    config, model, params, folder = tiny
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "params"]
    assert not list(folder.parent.glob(".*saving"))  # the temporary sibling was renamed away
    loaded_config, loaded_model, loaded = checkpoints.load_model(folder)
    assert loaded_config.to_dict() == config.to_dict()
    assert loaded_model.config == model.config
    flat, _ = jax.tree_util.tree_flatten_with_path(loaded)
    for path, value in flat:
        original = params
        for key in path:
            original = original[key.key]
        np.testing.assert_array_equal(np.asarray(value), original)
        assert value.dtype == original.dtype
    fp = checkpoints.fingerprint(config, params)
    assert fp == checkpoints.fingerprint(loaded_config, loaded) == checkpoints.fingerprint(config, params)
    changed = jax.tree.map(np.copy, params)
    changed["final_norm"]["scale"][3] += 1e-3
    assert checkpoints.fingerprint(config, changed) != fp
    with pytest.raises(FileExistsError, match="already exists"):
        checkpoints.save_model(folder, config, params)


def test_load_model_names_the_bad_file(tiny, tmp_path):
    config, _, params, folder = tiny
    with pytest.raises(FileNotFoundError, match="config.json"):
        checkpoints.load_model(tmp_path)
    broken = pathlib.Path(shutil.copytree(folder, tmp_path / "broken"))
    shutil.rmtree(broken / "params")
    (broken / "params").mkdir()
    with pytest.raises(checkpoints.CheckpointError, match=str(broken / "params")):
        checkpoints.load_model(broken)
    # A folder copied without orbax's commit marker is incomplete: the missing file is named.
    incomplete = pathlib.Path(shutil.copytree(folder, tmp_path / "incomplete"))
    (incomplete / "params" / "_CHECKPOINT_METADATA").unlink()
    with pytest.raises(
        checkpoints.CheckpointFileMissing, match=f"{incomplete}/params/_CHECKPOINT_METADATA: no such file"
    ):
        checkpoints.load_model(incomplete)
    shutil.rmtree(incomplete / "params")
    with pytest.raises(FileNotFoundError, match=f"{incomplete}/params: no such folder"):
        checkpoints.load_model(incomplete)
    # Same parameter names, other shapes: the config no longer matches the stored arrays.
    wider = json.loads((folder / "config.json").read_text())
    wider["model"]["stack"]["dim"] = 128
    other = pathlib.Path(shutil.copytree(folder, tmp_path / "other"))
    (other / "config.json").write_text(json.dumps(wider))
    with pytest.raises(checkpoints.CheckpointError, match=r"parameter 'embedding' is float32\[260, 64\]"):
        checkpoints.load_model(other)


# --- chunking --------------------------------------------------------------------------------


def test_document_chunks_cover_every_position_once():
    offsets = np.array([0, 5, 5, 300, 1000, 1001])
    first, length, keep = E.document_chunks(offsets, context=128, overlap=50)
    covered = np.zeros(offsets[-1], int)
    for f, n, k in zip(first, length, keep, strict=True):
        assert 0 < n <= 128 and (k == 0 or k == 50)
        doc = np.searchsorted(offsets, f, side="right") - 1
        assert f + n <= offsets[doc + 1]  # a chunk never leaves its document
        covered[f + k : f + n] += 1
    assert np.all(covered == 1)
    assert E.bucket_lengths(1000) == [128, 256, 512, 1000]
    assert S.threshold_tag(1.335442066192627) == "t1.3354421"
    assert S.threshold_tag(1.3354421) == S.threshold_tag(np.float32(1.335442066192627))


def test_chunked_long_document_equals_unchunked(tiny):
    """With the default overlap n_layers * (window - 1), chunking changes nothing (docs/architecture.md §2.3)."""
    _, model, params, _ = tiny
    doc = _random_documents(np.random.default_rng(3), 1, REF_LEN - 2)[0]
    doc = np.concatenate([doc[:-1], np.full(REF_LEN - doc.size, 40, np.uint16), [2]])  # exactly REF_LEN
    offsets = np.array([0, doc.size])
    whole = reference_entropies(model, params, doc)
    assert E.default_overlap(model.config, 256) == 2 * (64 - 1)
    chunked = E.compute_entropies(model, params, doc, offsets, context=256, batch_size=2)
    assert chunked.dtype == np.float16
    assert len(E.document_chunks(offsets, 256, 126)[0]) == 3
    np.testing.assert_allclose(chunked.astype(np.float32), whole, rtol=1e-3, atol=1e-3)
    # The "overlap window - 1" of docs/architecture.md §2.3 only bounds the first layer: not exact with 2 layers.
    approx = E.compute_entropies(model, params, doc, offsets, context=256, overlap=63, batch_size=2)
    assert np.abs(approx.astype(np.float32) - whole).max() > 1e-2


# --- sidecars --------------------------------------------------------------------------------


def test_sidecars_are_per_document_and_match_patch_start_mask(tiny, prepared):
    _, model, params, _ = tiny
    folder, summary = prepared
    tag = S.threshold_tag(THRESHOLD)
    assert summary.tag == tag and len(summary.computed) == 3
    record = json.loads((folder / "sidecars.json").read_text())
    assert record["entropy_model"]["fingerprint"] == checkpoints.fingerprint(tiny[0], params)
    assert record["tag"] == tag and record["thresholds"][tag]["threshold"] == THRESHOLD
    for name in ("train-00000", "train-00001", "validation-00000"):
        tokens, offsets = shard_documents(folder, name)
        entropy_file, bits_file = folder / f"{name}.entropy.f16", folder / f"{name}.starts.{tag}.bits"
        assert entropy_file.stat().st_size == 2 * tokens.size
        assert bits_file.stat().st_size == -(-tokens.size // 8)
        shard = record["shards"][name]
        assert shard["tokens_sha256"] == hashlib.sha256(tokens.tobytes()).hexdigest()
        assert shard["entropy_sha256"] == hashlib.sha256(entropy_file.read_bytes()).hexdigest()
        assert shard["starts_sha256"][tag] == hashlib.sha256(bits_file.read_bytes()).hexdigest()
        values = np.fromfile(entropy_file, "<f2")
        starts = S.read_starts(folder, name, tag, tokens.size)
        for lo, hi in zip(offsets[:-1], offsets[1:], strict=True):
            doc = tokens[lo:hi]
            np.testing.assert_allclose(
                values[lo:hi].astype(np.float32), reference_entropies(model, params, doc), rtol=1e-3, atol=1e-3
            )
            expected = patch_start_mask(
                doc[None].astype(np.int32),
                mode="entropy",
                entropies=values[lo:hi][None],
                threshold=THRESHOLD,
                include_next_token=False,
            )[0]
            np.testing.assert_array_equal(starts[lo:hi], expected)
        assert 0 < starts.sum() < tokens.size


def test_resume_skips_finished_shards(tiny, prepared, tmp_path):
    folder = _copy(prepared[0], tmp_path)
    before = mtimes(folder, "*-0000?.*")
    summary = E.run(folder, tiny[3], threshold=THRESHOLD, log=io.StringIO())
    assert summary.computed == () and summary.restarted == () and len(summary.skipped) == 3
    assert mtimes(folder, "*-0000?.*") == before
    # A damaged sidecar is recomputed, the others stay.
    (folder / "train-00001.entropy.f16").write_bytes(b"\0\0" * 10)
    (folder / f"validation-00000.starts.{S.threshold_tag(THRESHOLD)}.bits").unlink()
    summary = E.run(folder, tiny[3], threshold=THRESHOLD, log=io.StringIO())
    assert summary.computed == ("train-00001",)
    assert set(summary.restarted) == {"train-00001", "validation-00000"}
    assert summary.skipped == ("train-00000",)
    assert (folder / "train-00001.entropy.f16").read_bytes() == (prepared[0] / "train-00001.entropy.f16").read_bytes()


def test_the_progress_bar_counts_only_the_tokens_still_to_compute(tiny, prepared, tmp_path, monkeypatch):
    """A shard found done on resume leaves the bar's total, so the rate is not inflated by skipped work."""
    folder = _copy(prepared[0], tmp_path)
    (folder / "train-00001.entropy.f16").write_bytes(b"\0\0" * 10)  # only this shard is computed again
    bars = []

    def recording_bar(*args, **kwargs):
        bars.append(progress_bar(*args, **kwargs))
        return bars[-1]

    monkeypatch.setattr(E, "progress_bar", recording_bar)
    summary = E.run(folder, tiny[3], threshold=THRESHOLD, log=io.StringIO())
    assert summary.computed == ("train-00001",)
    manifest = load_manifest(folder)
    (bar,) = bars
    assert bar.total == bar.n == next(s.tokens for s in manifest.shards("train") if s.index == 1)


def test_new_threshold_reuses_entropies_without_the_model(tiny, prepared, tmp_path, monkeypatch):
    folder = _copy(prepared[0], tmp_path)
    entropies_before = mtimes(folder, "*.entropy.f16")

    def no_model(*args, **kwargs):
        raise AssertionError("the entropy model ran during a threshold sweep")

    monkeypatch.setattr(ByteLM, "apply", no_model)
    summary = E.run(folder, tiny[3], threshold=0.7, log=io.StringIO())
    assert summary.computed == () and len(summary.restarted) == 3
    assert mtimes(folder, "*.entropy.f16") == entropies_before
    record = json.loads((folder / "sidecars.json").read_text())
    old, new = S.threshold_tag(THRESHOLD), S.threshold_tag(0.7)
    assert record["tag"] == new and set(record["thresholds"]) == {old, new}
    for name, shard in record["shards"].items():
        assert set(shard["starts_sha256"]) == {old, new}
        tokens, offsets = shard_documents(folder, name)
        values = np.fromfile(folder / f"{name}.entropy.f16", "<f2")
        np.testing.assert_array_equal(
            S.read_starts(folder, name, new, tokens.size), S.start_mask(tokens, offsets, values, 0.7)
        )
        assert S.read_starts(folder, name, new, tokens.size).sum() > S.read_starts(folder, name, old, tokens.size).sum()


def test_other_entropy_model_recomputes_everything(tiny, prepared, tmp_path):
    config, model, params, _ = tiny
    folder = _copy(prepared[0], tmp_path)
    other_params = _init(model, config, 1)
    other = checkpoints.save_model(tmp_path / "other-model", config, other_params)
    log = io.StringIO()
    summary = E.run(folder, other, threshold=1.2, log=log)
    assert "another entropy model" in log.getvalue() and "recomputing" in log.getvalue()
    assert len(summary.computed) == 3
    record = json.loads((folder / "sidecars.json").read_text())
    assert record["entropy_model"]["fingerprint"] == checkpoints.fingerprint(config, other_params)
    assert set(record["thresholds"]) == {S.threshold_tag(1.2)}
    assert not list(folder.glob(f"*.starts.{S.threshold_tag(THRESHOLD)}.bits"))  # never mixed with new entropies
    tokens, offsets = shard_documents(folder, "train-00000")
    doc = tokens[offsets[0] : offsets[1]]
    np.testing.assert_allclose(
        np.fromfile(folder / "train-00000.entropy.f16", "<f2")[: doc.size].astype(np.float32),
        reference_entropies(model, other_params, doc),
        rtol=1e-3,
        atol=1e-3,
    )


def test_changed_shard_and_unknown_checkpoint_are_errors(tiny, prepared, tmp_path):
    folder = _copy(prepared[0], tmp_path)
    raw = bytearray((folder / "train-00001.tokens").read_bytes())
    raw[10] ^= 1
    (folder / "train-00001.tokens").write_bytes(bytes(raw))
    with pytest.raises(S.SidecarError, match=r"train-00001\.tokens: sha256 .* does not match"):
        E.run(folder, tiny[3], threshold=THRESHOLD, log=io.StringIO())
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "config.json").write_text("{}")
    with pytest.raises(S.SidecarError, match="neither a bltjax model folder"):
        E.load_entropy_model(tmp_path / "nothing")
    blt = tmp_path / "blt"  # a bltjax folder of a whole BLT (only config.json is read before refusing)
    (blt / "params").mkdir(parents=True)
    (blt / "config.json").write_text(load_config(f"{REPO / 'experiments' / 'blt_tiny.py'}").to_json_best_effort())
    with pytest.raises(S.SidecarError, match="'model_type' is 'blt'"):
        E.load_entropy_model(blt)


def test_target_patch_size_calibrates_on_train(tiny, prepared, tmp_path, monkeypatch):
    folder = _copy(prepared[0], tmp_path)
    monkeypatch.setattr(ByteLM, "apply", lambda *a, **k: pytest.fail("entropies are already there"))
    summary = E.run(folder, tiny[3], target_patch_size=3.0, log=io.StringIO())
    assert summary.calibration is not None and summary.calibration["target_patch_size"] == 3.0
    tag = S.threshold_tag(summary.threshold)
    tokens = patches = 0
    for name in ("train-00000", "train-00001"):
        count = np.fromfile(folder / f"{name}.tokens", "<u2").size
        tokens += count
        patches += int(S.read_starts(folder, name, tag, count).sum())
    assert abs(tokens / patches - 3.0) < 0.15
    assert (folder / f"validation-00000.starts.{tag}.bits").is_file()
    record = json.loads((folder / "sidecars.json").read_text())
    assert record["thresholds"][tag]["calibration"]["threshold"] == summary.threshold


# --- the command line, in a subprocess with 2 devices ----------------------------------------


def _cli(*args: str, devices: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "bltjax.entropy", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_cli_writes_sidecars_and_calibrates(tiny, prepared, tmp_path):
    rng = np.random.default_rng(5)
    folder = write_shards(tmp_path / "data", {"train": [_random_documents(rng, 6, 200)]})
    result = _cli("--data", str(folder), "--entropy-model", str(tiny[3]), "--target-patch-size", "2.5")
    assert result.returncode == 0, result.stderr
    assert "calibrated threshold" in result.stdout and "bytes/s" in result.stdout  # the summary
    assert "entropy: 100%" in result.stderr and "tokens/s" in result.stderr  # the progress bar, finished
    tag = result.stdout.split("tag=")[1].split()[0]
    assert (folder / f"train-00000.starts.{tag}.bits").is_file()
    # Same model and data as the in-process run: the same entropies, whatever the device count.
    tokens, offsets = shard_documents(folder, "train-00000")
    in_process = E.compute_entropies(tiny[1], tiny[2], tokens, offsets, context=128)
    np.testing.assert_allclose(
        np.fromfile(folder / "train-00000.entropy.f16", "<f2").astype(np.float32),
        in_process.astype(np.float32),
        rtol=1e-3,
        atol=1e-3,
    )
    bad = _cli("--data", str(folder), "--entropy-model", str(folder))
    assert bad.returncode == 2 and "neither a bltjax model folder" in bad.stderr


@pytest.mark.slow
def test_two_processes_split_the_shards_and_merge_one_manifest(tiny, prepared, tmp_path):
    """2 processes x 1 device (jax.distributed over localhost): shard i goes to process i % 2."""
    portpicker = pytest.importorskip("portpicker")
    folder = _copy(prepared[0], tmp_path)
    for path in [*folder.glob("*.f16"), *folder.glob("*.bits"), folder / "sidecars.json"]:
        path.unlink()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    port = portpicker.pick_unused_port()
    args = ["--data", str(folder), "--entropy-model", str(tiny[3]), "--threshold", str(THRESHOLD)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bltjax.entropy", *args, "--coordinator", f"127.0.0.1:{port}"]
            + ["--num-processes", "2", "--process-id", str(pid)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in (0, 1)
    ]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    assert "2 entropies computed" in outputs[0][0] and "1 entropies computed" in outputs[1][0]
    record = json.loads((folder / "sidecars.json").read_text())
    assert sorted(record["shards"]) == ["train-00000", "train-00001", "validation-00000"]
    assert not list(folder.glob(".sidecars.process-*"))
    single = json.loads((prepared[0] / "sidecars.json").read_text())
    assert record["entropy_model"]["fingerprint"] == single["entropy_model"]["fingerprint"]
    for name in record["shards"]:
        np.testing.assert_allclose(
            np.fromfile(folder / f"{name}.entropy.f16", "<f2").astype(np.float32),
            np.fromfile(prepared[0] / f"{name}.entropy.f16", "<f2").astype(np.float32),
            rtol=1e-3,
            atol=1e-3,
        )


# --- the shared Hugging Face fixture ---------------------------------------------------------


def test_hugging_face_folder_as_entropy_model(shared_dir, tmp_path):
    fixture = shared_dir / "fixtures" / "hf_blt_tiny"
    if not fixture.is_dir():
        pytest.skip(f"{fixture} is absent")
    cases = np.load(fixture / "patcher_cases.npz", allow_pickle=False)
    # The fixture's sequences start with BOS but have no EOS; shards need one (docs/data.md).
    docs = [np.append(cases[f"p{i}_tokens"][0], 2).astype(np.uint16) for i in range(5)]
    folder = write_shards(tmp_path / "data", {"train": [docs[:3], docs[3:]]})
    # context 64 < every document: chunks with the exact overlap 1 x (16 - 1) = 15.
    summary = E.run(folder, fixture, context=64, batch_size=2, log=io.StringIO())
    stored = json.loads((fixture / "config.json").read_text())["patching_threshold"]
    assert summary.threshold == pytest.approx(stored) and summary.tag == S.threshold_tag(stored)
    record = json.loads((folder / "sidecars.json").read_text())
    assert record["entropy_model"]["source"] == "huggingface" and record["entropy_model"]["overlap"] == 15
    # A rule given is the one added: the folder's stored threshold is not added with it.
    topk = E.run(folder, fixture, context=64, batch_size=2, rule=PatchingRule(mode="entropy", patch_size=4),
                 log=io.StringIO())  # fmt: skip
    assert topk.computed == () and topk.threshold is None and topk.tag == "k4.0"
    assert topk.rule == {"kind": "topk", "threshold": None, "threshold_add": None, "reference_quirks": False,
                         "patch_size": 4.0}  # fmt: skip
    i = 0
    for name in ("train-00000", "train-00001"):
        tokens, offsets = shard_documents(folder, name)
        values = np.fromfile(folder / f"{name}.entropy.f16", "<f2").astype(np.float32)
        for lo, hi in zip(offsets[:-1], offsets[1:], strict=True):
            np.testing.assert_allclose(values[lo : hi - 1], cases[f"p{i}_entropies"][0], rtol=2e-3, atol=2e-3)
            i += 1
