"""Weighted data mixtures (bltjax/data/mixture.py, config.data.mixture): the proportions over many
rows, batch = f(seed, step) across builds and on resume, validation mixed the same way, packed
rows in a mixture, and errors that name the field and the folder."""

from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest
import test_pipeline as tp

from bltjax.data import mixture, pipeline
from bltjax.data.pipeline import DataError, batch_at_step, make_dataset, make_iterator

ROWS = 4000  # rows drawn for the proportion test


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """Two prepared folders (test_pipeline's writer) whose rows are told apart by their bytes:
    folder B holds the same paragraphs reversed, so no window of B equals one of A."""
    root = tmp_path_factory.mktemp("mixture")
    a, b = root / "a", root / "b"
    tp.write_data(a, n_shards=2)
    tp.write_data(a / "validation", n_shards=1, split="validation")
    documents = tp._documents
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tp, "_documents", lambda: [text[::-1] for text in documents()])
        tp.write_data(b, n_shards=1)
    return a, b


def mixed_config(text: str, mode: str = "space"):
    config = tp.make_config(mode)
    config.data.mixture = text
    config.data.path = ""
    return config


def folder_of_rows(config, folders, step_rows: int, seed: int = 5) -> np.ndarray:
    """Which folder each of the first `step_rows` global rows comes from (0 = A, 1 = B), from its window."""
    a, b = folders
    windows = {}
    for index, folder in enumerate((a, b)):
        source = pipeline.make_source(config, folder, "train")
        for i in range(len(source)):
            windows.setdefault(source[i]["window"].tobytes(), set()).add(index)
    data = make_dataset(config, "", "train", seed=seed, process_index=0, process_count=1)
    out = []
    for step in range(step_rows // tp.B):
        tokens = batch_at_step(data, step)["tokens"]
        targets = batch_at_step(data, step)["targets"]
        for row in range(tp.B):
            window = np.concatenate([tokens[row], targets[row, -1:]]).astype(np.uint16).tobytes()
            (found,) = windows[window]  # a window of exactly one folder
            out.append(found)
    return np.asarray(out)


def test_proportions_follow_the_weights_within_binomial_noise(folders):
    a, b = folders
    config = mixed_config(f"{a}:0.7,{b}:0.3")
    which = folder_of_rows(config, folders, ROWS)
    share = float(np.mean(which == 0))
    tolerance = 3 * math.sqrt(0.7 * 0.3 / which.size)  # 3 binomial standard deviations
    assert abs(share - 0.7) <= tolerance, (share, tolerance)
    # The interleaving is deterministic: every 1000-row stretch is within 1% as well.
    for start in range(0, ROWS - 1000 + 1, 1000):
        assert abs(np.mean(which[start : start + 1000] == 0) - 0.7) < 0.01


def test_weights_are_normalised_and_a_single_path_reads_one_folder(folders):
    a, b = folders
    config = mixed_config(f"{a}:7,{b}:3")
    assert mixture.folders(config, "") == [(str(a), 0.7), (str(b), 0.3)]
    single = tp.make_config("space")
    single.data.path = str(a)
    assert mixture.folders(single, single.data.path) == [(str(a), 1.0)]


def test_batches_are_a_function_of_seed_and_step_and_resume_exactly(folders):
    a, b = folders
    config = mixed_config(f"{a}:0.6,{b}:0.4")
    first = make_dataset(config, "", "train", seed=11, process_index=0, process_count=1)
    second = make_dataset(config, "", "train", seed=11, process_index=0, process_count=1)
    uninterrupted = make_iterator(first)
    expected = [next(uninterrupted) for _ in range(8)]
    resumed = make_iterator(second, start_step=5)
    for step in range(8):
        batch = batch_at_step(second, step)
        assert all(np.array_equal(batch[k], expected[step][k]) for k in batch)
    for step in (5, 6, 7):
        batch = next(resumed)
        assert all(np.array_equal(batch[k], expected[step][k]) for k in batch)
    other_seed = make_dataset(config, "", "train", seed=12, process_index=0, process_count=1)
    assert not np.array_equal(batch_at_step(other_seed, 0)["tokens"], expected[0]["tokens"])


def test_process_slices_union_to_the_global_batch(folders):
    a, b = folders
    config = mixed_config(f"{a}:0.5,{b}:0.5")
    whole = batch_at_step(make_dataset(config, "", "train", seed=1, process_index=0, process_count=1), 3)
    parts = [
        batch_at_step(make_dataset(config, "", "train", seed=1, process_index=p, process_count=4), 3) for p in range(4)
    ]
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_packed_rows_mix_too(folders):
    a, b = folders
    config = mixed_config(f"{a}:0.5,{b}:0.5", mode="entropy")
    config.data.rows, config.data.max_patches = "packed", 16
    batch = batch_at_step(make_dataset(config, "", "train", seed=0, process_index=0, process_count=1), 0)
    assert batch["patch_lengths"].shape == (tp.B, 16) and (batch["patch_lengths"].sum(1) == tp.N + 1).all()
    assert "row_bytes" in batch


def test_validation_needs_the_split_in_every_folder(folders):
    a, b = folders
    config = mixed_config(f"{a / 'validation'}:0.5,{b}:0.5")
    assert not pipeline.has_data_split(config, "validation")
    with pytest.raises(DataError, match=r"no split 'validation'|lists no shards"):
        make_dataset(config, "", "validation", seed=0, process_index=0, process_count=1)
    only = mixed_config(f"{a / 'validation'}:1")
    assert pipeline.has_data_split(only, "validation")


@pytest.mark.parametrize(
    "text,message",
    [
        ("{a}:0.7,{b}:-1", r"config\.data\.mixture: folder '.*/b': weight '-1' must be a positive"),
        ("{a}:0.7,{b}:zero", r"config\.data\.mixture: folder '.*/b': weight 'zero'"),
        ("{a}:0.7,{b}:0", r"config\.data\.mixture: folder '.*/b': weight '0'"),
        ("{a}:0.7,{b}:nan", r"config\.data\.mixture: folder '.*/b': weight 'nan'"),
        ("{a}", r"config\.data\.mixture: entry '.*/a': expected FOLDER:WEIGHT"),
        ("{a}:0.5,{a}:0.5", r"config\.data\.mixture: a folder appears twice"),
        ("{a}:0.7,{b}/missing:0.3", r"config\.data\.mixture: folder '.*/b/missing' has no manifest\.json"),
    ],
)
def test_errors_name_the_field_and_the_folder(folders, text, message):
    a, b = folders
    config = mixed_config(text.format(a=a, b=b))
    with pytest.raises(DataError, match=message):
        make_dataset(config, "", "train", seed=0, process_index=0, process_count=1)


def test_path_and_mixture_together_are_refused(folders):
    a, b = folders
    config = mixed_config(f"{a}:1,{b}:1")
    config.data.path = str(a)
    with pytest.raises(DataError, match=r"config\.data\.path=.* and config\.data\.mixture=.*: set one of the two"):
        make_dataset(config, config.data.path, "train", seed=0, process_index=0, process_count=1)
