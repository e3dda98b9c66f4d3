"""`config.train.eval_every=0` needs no validation split: a corpus of a few large files may have none.

The trainer must not open the split then (no DataError, no evaluation, no validation record),
and with eval_every > 0 it must say, before any device work, that the split is missing.
"""

from __future__ import annotations

import io
import json
import pathlib

import pytest

from bltjax.config import load_config
from bltjax.data import pipeline
from bltjax.data.pipeline import DataError
from bltjax.training.trainer import Trainer, train

REPO = pathlib.Path(__file__).resolve().parents[1]
CORPUS = REPO / "bltjax" / "data" / "corpus" / "jargon_file_4.4.7_appendix_a.txt"


@pytest.fixture(scope="module")
def train_only(tmp_path_factory) -> pathlib.Path:
    from bltjax.data import prepare

    out = tmp_path_factory.mktemp("train_only") / "data"
    result = prepare.prepare([CORPUS], out, val_fraction=0.0, progress=False)
    assert result.manifest.shards("validation") == () and result.manifest.shards("train")
    return out


def _config(data: pathlib.Path, eval_every: int):
    config = load_config(str(REPO / "experiments" / "blt_tiny.py"))
    config.data.path = str(data)
    config.data.batch_size = 8
    config.train.steps, config.train.log_every, config.train.checkpoint_every = 3, 1, 0
    config.train.eval_every = eval_every
    config.optimizer.warmup_steps = 1
    return config


def test_a_missing_split_with_eval_every_is_reported_before_device_work(train_only, tmp_path):
    with pytest.raises(DataError, match=r"manifest\.json: split 'validation' lists no shards"):
        Trainer(_config(train_only, eval_every=2), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_eval_every_zero_never_opens_the_missing_split(train_only, tmp_path, monkeypatch):
    opened = []
    real = pipeline.make_dataset
    monkeypatch.setattr(pipeline, "make_dataset", lambda cfg, path, split, **kw: opened.append(split) or real(
        cfg, path, split, **kw))  # fmt: skip
    trainer = Trainer(_config(train_only, eval_every=0), tmp_path / "run")
    assert opened == ["train"] and trainer.eval_data is None
    assert pipeline.has_split(train_only, "train") and not pipeline.has_split(train_only, "validation")


@pytest.mark.slow
def test_eval_every_zero_trains_to_the_end_without_validation(train_only, tmp_path):
    console = io.StringIO()
    result = train(_config(train_only, eval_every=0), tmp_path / "run", console=console)
    assert result.final_step == 3 and not result.preempted and result.validation_bpb is None
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]
    assert not [r for r in records if r["split"] == "validation"]
    assert "no 'validation' split in" in console.getvalue()
    # A relaunch after the last step reports and stops, still without a split.
    again = train(_config(train_only, eval_every=0), tmp_path / "run", console=io.StringIO())
    assert again.final_step == 3 and again.validation_bpb is None
