"""The checkpoint watcher (bltjax/inference/watch.py, ``python -m bltjax.evaluate --watch``).

The run is real: a tiny byte LM trained by `bltjax.training.trainer.train` for 4 steps with a
checkpoint every 2 (the project's own checkpoint manager writes steps 2 and 4). A save in
progress is made by taking away step 4's ``_CHECKPOINT_METADATA`` (orbax writes it last) and
giving it back while the watcher waits, as the trainer would.
"""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")

from bltjax import checkpoints  # noqa: E402
from bltjax.config import load_config  # noqa: E402
from bltjax.inference import watch  # noqa: E402

BYTE_LM = "experiments/byte_lm.py:tiny"


def byte_lm_run_config(data_dir):
    """4 steps, checkpoints at 2 and 4: shared (trained once per session) with tests/test_evaluate_tasks.py."""
    config = load_config(BYTE_LM)
    config.data.path = str(data_dir)
    config.data.seq_len = 64
    config.data.batch_size = 8  # one row per fake CPU device
    config.train.steps = 4
    config.train.checkpoint_every = 2
    config.train.eval_every = 0
    config.train.eval_batches = 1
    config.train.log_every = 1
    config.optimizer.warmup_steps = 1
    return config


def write_choice_task(folder):
    """A 3-question multiple-choice task as a local lm-eval YAML over JSONL (absolute data path)."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = [
        {"context": "The cat sat on the", "choices": ["mat.", "sky."], "label": 0},
        {"context": "One, two,", "choices": ["three", "seven", "nine"], "label": 0},
        {"context": "Bits per", "choices": ["byte", "bit"], "label": 0},
    ]
    data = folder / "choice.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    yaml = folder / "choice.yaml"
    yaml.write_text(
        "task: bltjax_test_choice\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return yaml


@pytest.fixture(scope="module")
def run(trained_run, corpus_data):
    return trained_run(byte_lm_run_config(corpus_data)).workdir


class FakeTime:
    """clock/sleep for the watcher: sleeping advances the clock and may run an action (a checkpoint finishing)."""

    def __init__(self, on_sleep=None):
        self.now, self.sleeps, self.on_sleep = 0.0, 0, on_sleep

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.sleeps += 1
        if self.on_sleep is not None:
            self.on_sleep(self.sleeps)


def _options(workdir, yaml) -> dict:
    return {"model": str(workdir), "tasks": [str(yaml)], "limit": None, "batch_size": 4, "max_length": None,
            "entropy_model": None, "seed": 0, "num_fewshot": None}  # fmt: skip


@pytest.mark.slow
def test_watch_evaluates_complete_checkpoints_only_once_each_into_the_run_tensorboard(run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bltjax.evaluate import evaluate_once, watch_record_path

    workdir = tmp_path / "run"
    shutil.copytree(run, workdir)
    assert checkpoints.complete_steps(workdir) == [2, 4]
    metadata = workdir / "checkpoints" / "4" / checkpoints.METADATA_FILE
    saved = metadata.read_bytes()
    metadata.unlink()  # step 4 is being written: every item is there but orbax has not finalized it
    (workdir / "checkpoints" / "6.orbax-checkpoint-tmp-1700000000").mkdir()  # and an orbax temporary folder
    yaml = write_choice_task(tmp_path / "task")
    options = _options(workdir, yaml)
    record, about = watch_record_path(options)
    seen = []

    def evaluate_step(step: int) -> None:
        seen.append((step, checkpoints.is_complete_step(workdir / "checkpoints" / str(step)), metadata.exists()))
        evaluate_once(options, step=step, out=None)

    fake = FakeTime(on_sleep=lambda n: metadata.write_bytes(saved) if n == 2 else None)  # finalized at the 2nd wait
    result = watch.watch_checkpoints(workdir, evaluate_step, record=record, about=about, timeout_s=100, poll_s=10,
                                     clock=fake.clock, sleep=fake.sleep, log=lambda line: None)  # fmt: skip
    assert seen == [(2, True, False), (4, True, True)]  # step 4 read only once finalized
    assert (result.evaluated, result.stopped, result.final_step) == ([2, 4], watch.STOPPED_AT_FINAL, 4)
    assert fake.sleeps == 2
    assert watch.read_record(record) == {"evaluated": [2, 4], "skipped": []}
    for step in (2, 4):
        assert (workdir / "eval" / f"tasks-step{step}.json").is_file()
    events = EventAccumulator(str(workdir / "tensorboard" / "tasks"))
    events.Reload()
    assert [e.step for e in events.Scalars("bltjax_test_choice/acc")] == [2, 4]

    # A restart resumes: nothing is evaluated twice, and the final step is known to be done.
    again = watch.watch_checkpoints(workdir, evaluate_step, record=record, timeout_s=100, poll_s=10,
                                    clock=fake.clock, sleep=fake.sleep, log=lambda line: None)  # fmt: skip
    assert (again.evaluated, again.stopped) == ([], watch.STOPPED_AT_FINAL) and len(seen) == 2


@pytest.mark.slow
def test_watch_stops_after_the_timeout_and_skips_steps_the_retention_deleted(run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(run, workdir)
    shutil.rmtree(workdir / "checkpoints" / "4")  # the final step never comes
    record = tmp_path / "record.json"
    seen = []
    fake = FakeTime()
    result = watch.watch_checkpoints(workdir, seen.append, record=record, timeout_s=60, poll_s=25, clock=fake.clock,
                                     sleep=fake.sleep, log=lambda line: None)  # fmt: skip
    assert (seen, result.stopped, result.final_step) == ([2], watch.STOPPED_AT_TIMEOUT, 4)
    assert fake.now == 75  # three waits of 25 s: the first poll past 60 s without a new checkpoint stops

    # The run's retention deletes step 6 while it is read: recorded as skipped, not a failure.
    shutil.copytree(workdir / "checkpoints" / "2", workdir / "checkpoints" / "6")

    def deleted_while_read(step: int) -> None:
        shutil.rmtree(workdir / "checkpoints" / str(step))
        raise checkpoints.CheckpointError(f"checkpoints/{step}: unreadable")

    result = watch.watch_checkpoints(workdir, deleted_while_read, record=record, timeout_s=10, poll_s=10,
                                     clock=fake.clock, sleep=fake.sleep, log=lambda line: None)  # fmt: skip
    assert (result.evaluated, result.skipped) == ([], [6])
    assert watch.read_record(record) == {"evaluated": [2], "skipped": [6]}

    with pytest.raises(watch.WatchError, match="unreadable watch record"):
        record.write_text("{not json")
        watch.read_record(record)


@pytest.mark.slow
def test_evaluate_watch_command_evaluates_a_finished_run_then_resumes(run, tmp_path, capsys):
    """The README's --watch command on a finished run, then again (nothing evaluated twice)."""
    from bltjax import evaluate

    workdir = tmp_path / "run"
    shutil.copytree(run, workdir)
    yaml = write_choice_task(tmp_path / "task")
    argv = ["--model", str(workdir), "--tasks", str(yaml), "--watch", "--watch-timeout", "5", "--poll-seconds", "1"]
    assert evaluate.main(argv) == 0
    out = capsys.readouterr().out
    assert "watch: evaluated steps [2, 4]; stopped at final step" in out
    assert "| bltjax_test_choice | acc |" in out
    assert evaluate.main(argv) == 0
    out = capsys.readouterr().out
    assert "watch: resuming; already evaluated steps [2, 4]" in out and "evaluated steps []" in out
    assert evaluate.main(["--model", str(workdir), "--tasks", str(yaml), "--watch", "--step", "2"]) == 1
    err = capsys.readouterr().err
    assert "--watch: evaluates every checkpoint into WORKDIR/eval/; leave out --step and --out" in err


@pytest.mark.slow
def test_eval_watch_command_writes_bits_per_byte_of_every_checkpoint_once(run, corpus_data, tmp_path, capsys):
    """``python -m bltjax.eval --watch``: the same watcher around bits-per-byte."""
    from bltjax import eval as eval_program

    workdir = tmp_path / "run"
    shutil.copytree(run, workdir)
    argv = ["--model", str(workdir), "--data", str(corpus_data), "--batch-size", "8", "--watch", "--watch-timeout",
            "5", "--poll-seconds", "1"]  # fmt: skip
    assert eval_program.main(argv) == 0
    assert "watch: evaluated steps [2, 4]; stopped at final step" in capsys.readouterr().out
    for step in (2, 4):
        assert json.loads((workdir / "eval" / f"validation-step{step}.json").read_text())["step"] == step
    assert watch.read_record(workdir / "eval" / "watch-validation.json") == {"evaluated": [2, 4], "skipped": []}
    assert eval_program.main(argv) == 0
    assert "evaluated steps []; stopped at final step" in capsys.readouterr().out
