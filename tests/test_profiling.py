"""Profiling and step timing: config.train.profile_steps writes a trace TensorBoard / xprof open,
and the logged step time splits into input wait and the rest.
"""

from __future__ import annotations

import io
import time

import pytest
import test_trainer

from bltjax.config import ConfigError, validate
from bltjax.training import profiling, trainer
from bltjax.training.metrics import read_jsonl

data_dir = test_trainer.data_dir  # the training tests' module fixture: two real corpus files, prepared
TIME_KEYS = ("time/step_s", "time/data_wait_s", "time/compute_s", "time/data_wait_fraction")


def _config(data_dir, **changes):
    return test_trainer.tiny_config(data_dir, **{"train.steps": 6, "train.log_every": 2, **changes})


def test_profile_steps_are_validated_naming_the_field(data_dir):
    config = _config(data_dir)
    assert config.train.profile_steps is None  # off by default
    for bad, expected in (
        ((0, 2), "two positive integers"),
        ((3,), "two positive integers"),
        ((5, 3), "within config.train.steps=6"),
    ):
        config.train.profile_steps = bad
        with pytest.raises(ConfigError, match=rf"^config\.train\.profile_steps: expected .*{expected}"):
            validate(config)
    config.train.profile_steps = (5, 2)  # steps 5 and 6
    validate(config)
    assert list(profiling.profile_range(config.train.profile_steps)) == [5, 6]
    assert profiling.profile_range(None) is None


def test_step_times_split_the_step():
    times = trainer.step_times(elapsed=10.0, data_wait=4.0, timed_steps=5)
    assert times == pytest.approx(
        {"time/step_s": 2.0, "time/data_wait_s": 0.8, "time/compute_s": 1.2, "time/data_wait_fraction": 0.4}
    )
    capped = trainer.step_times(elapsed=1.0, data_wait=3.0, timed_steps=1)  # never more wait than wall time
    assert capped["time/data_wait_fraction"] == 1.0 and capped["time/compute_s"] == 0.0


def test_profiler_starts_and_stops_around_the_chosen_steps(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(profiling.jax.profiler, "start_trace", lambda logdir: calls.append(("start", logdir)))
    monkeypatch.setattr(profiling.jax.profiler, "stop_trace", lambda: calls.append(("stop",)))
    monkeypatch.setattr(profiling.jax, "block_until_ready", lambda outputs: calls.append(("block", outputs)))
    profiler = profiling.StepProfiler((3, 2), tmp_path / "profile")
    for step in range(1, 7):
        profiler.before_step(step)
        calls.append(("step", step))
        profiler.after_step(step, f"outputs{step}")
    assert calls == [
        ("step", 1),
        ("step", 2),
        ("start", str(tmp_path / "profile")),
        ("step", 3),
        ("step", 4),
        ("block", "outputs4"),  # the last traced step's device work is inside the trace
        ("stop",),
        ("step", 5),
        ("step", 6),
    ]
    resumed = profiling.StepProfiler((3, 2), tmp_path / "profile")  # relaunched at step 3: traces step 4
    resumed.before_step(4)
    resumed.close()  # an error or pre-emption inside the range: the trace is still stopped
    assert calls[-2:] == [("start", str(tmp_path / "profile")), ("stop",)]


def _slowed(iterator, delay: float):
    """The trainer's input iterator, made slow: every batch takes `delay` seconds more.

    A subclass made on the fly, so grain still checkpoints it as the iterator it is.
    """

    def slow_next(self):
        time.sleep(delay)
        return super(slow, self).__next__()

    slow = type(f"Slow{type(iterator).__name__}", (type(iterator),), {"__next__": slow_next})
    iterator.__class__ = slow
    return iterator


def _time_records(workdir):
    return [r for r in read_jsonl(workdir / "metrics.jsonl") if r["split"] == "train"]


@pytest.mark.slow
def test_trace_of_the_chosen_steps_and_data_wait(data_dir, tmp_path, monkeypatch):
    profiled = tmp_path / "profiled"
    trainer.train(_config(data_dir, **{"train.profile_steps": (3, 2)}), profiled, console=io.StringIO())
    traces = list((profiled / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0, traces  # TensorBoard's / xprof's layout
    fast = _time_records(profiled)
    for record in fast:
        assert all(record[key] >= 0 for key in TIME_KEYS), record
        assert record["time/data_wait_s"] + record["time/compute_s"] == pytest.approx(record["time/step_s"])

    delay = 0.3
    real_iterator = trainer.pipeline.make_iterator
    monkeypatch.setattr(
        trainer.pipeline, "make_iterator", lambda *args, **kwargs: _slowed(real_iterator(*args, **kwargs), delay)
    )
    slow_dir = tmp_path / "slow"
    trainer.train(_config(data_dir), slow_dir, console=io.StringIO())
    assert not (slow_dir / "profile").exists()  # no profile_steps, no trace
    slow = _time_records(slow_dir)
    assert [r["step"] for r in slow] == [r["step"] for r in fast] == [2, 4, 6]
    for before, after in zip(fast, slow, strict=True):
        assert after["time/data_wait_s"] >= 0.4 * delay > before["time/data_wait_s"], (before, after)
        assert after["time/data_wait_fraction"] > before["time/data_wait_fraction"]
