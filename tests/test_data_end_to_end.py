"""The whole data path on real text: prepare -> entropy sidecars -> pipeline -> BLT forward.

Each stage is tested on its own elsewhere; this test checks that they agree with each other:
the sidecars lie next to the shards they describe, the pipeline's entropy-mode patches are
exactly the entropy rule applied to the window, and the model accepts every batch.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from bltjax import patching
from bltjax.checkpoints import save_model
from bltjax.config import load_config
from bltjax.data import entropy, pipeline, prepare, sidecars
from bltjax.data import shards as shard_format
from bltjax.models.factory import build_model, example_inputs
from bltjax.models.patch_ids import check_patch_lengths

REPO = pathlib.Path(__file__).resolve().parents[1]
CORPUS = REPO / "bltjax" / "data" / "corpus"
THRESHOLD = 5.0  # random tiny entropy models give entropies around ln 260 = 5.56, spread by the weights


@pytest.mark.slow
def test_prepare_entropy_pipeline_model_round_trip(tmp_path):
    # 1. prepare: two real multilingual files, small shards so that there are several.
    data = tmp_path / "data"
    inputs = [CORPUS / "jargon_file_4.4.7_appendix_a.txt", CORPUS / "zh_tang_song_poems.jsonl"]
    prepare.prepare(inputs, data, shard_bytes=64 * 1024, val_fraction=0.1, progress=False)
    manifest = shard_format.load_manifest(data)
    assert len(manifest.shards("train")) >= 2 and manifest.shards("validation")

    # 2. entropy sidecars from a tiny random entropy model saved in the exported-model format.
    entropy_config = load_config(str(REPO / "experiments" / "entropy_model.py:tiny"))
    entropy_model = build_model(entropy_config)
    params = jax.jit(entropy_model.init)(jax.random.key(0), *example_inputs(entropy_config))["params"]
    checkpoint = save_model(tmp_path / "entropy_model", entropy_config, params)
    summary = entropy.run(data, checkpoint, threshold=THRESHOLD)
    tag = summary.tag
    for split in ("train", "validation"):
        for shard in manifest.shards(split):
            assert sidecars.entropy_path(data, shard.name).parent == data  # sidecars lie next to the shard
            assert sidecars.entropy_path(data, shard.name).exists()
            assert sidecars.starts_path(data, shard.name, tag).exists()

    # The calibration tool reads the same sidecars.
    result = subprocess.run(
        [sys.executable, "-m", "bltjax.calibrate", "--data", str(data), "--target-patch-size", "4"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "threshold" in result.stdout

    # 3. pipeline in entropy mode with the same threshold, then the model on its batches.
    config = load_config(str(REPO / "experiments" / "blt_tiny.py"))
    config.patching.mode = "entropy"
    config.patching.threshold = THRESHOLD
    config.data.max_patches = config.data.seq_len + 1  # no overflow: every patch is kept
    dataset = pipeline.make_dataset(config, data, "train", seed=0, process_index=0, process_count=1)
    model = build_model(config)
    model_params = jax.jit(model.init)(jax.random.key(1), *example_inputs(config, config.data.batch_size))["params"]
    apply = jax.jit(lambda p, t, lengths: model.apply({"params": p}, t, lengths))
    n = config.data.seq_len
    checked_rows = 0
    for step in range(3):
        batch = pipeline.batch_at_step(dataset, step)
        check_patch_lengths(batch["patch_lengths"], n)
        assert np.all(batch["patch_lengths"].sum(axis=1) == n + 1)
        # The patches are the entropy rule on the window, up to the forced starts at 0 and 1 and
        # the document starts that the sidecar adds (documents are patched separately).
        for row in range(config.data.batch_size):
            tokens = batch["tokens"][row]
            window_entropies = _window_entropies(data, manifest, tokens, batch["targets"][row])
            if window_entropies is None:
                continue
            rule = patching.patch_start_mask(
                tokens[None], patching.PatchingRule.from_config(config), entropies=window_entropies[None]
            )[0]
            starts = patching.start_mask_from_lengths(batch["patch_lengths"][row : row + 1], n + 1)[0]
            window = np.concatenate([tokens, batch["targets"][row, -1:]])
            np.testing.assert_array_equal(starts, rule | _document_starts(window, n))
            checked_rows += 1
        logits = apply(model_params, batch["tokens"], batch["patch_lengths"])
        assert logits.shape == (config.data.batch_size, n, 260) and np.isfinite(np.asarray(logits)).all()
    assert checked_rows >= config.data.batch_size  # most windows are found in the stream


def _document_starts(window: np.ndarray, n: int) -> np.ndarray:
    """Start bits that per-document patching adds (docs/architecture.md §3.2): each BOS and the token after it."""
    bits = np.zeros(n + 1, bool)
    bos = np.flatnonzero(window == 1)
    bits[bos] = True
    bits[np.minimum(bos + 1, n)] = True
    return bits


def _window_entropies(data, manifest, tokens, targets):
    """Finds the window in the train shards and returns its entropies (None if not unique)."""
    window = np.concatenate([tokens, targets[-1:]]).astype(np.uint16)
    for index, shard in enumerate(manifest.shards("train")):
        stream, _ = shard_format.read_shard(data, "train", index)
        n = len(tokens)
        starts = np.arange(0, len(stream) - n, n)
        for start in starts:
            if np.array_equal(stream[start : start + n + 1], window):
                return sidecars.read_entropies(data, shard.name)[start : start + n].astype(np.float32)
    return None
