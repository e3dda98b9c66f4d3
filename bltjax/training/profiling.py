"""A `jax.profiler` trace of chosen training steps (``config.train.profile_steps = (first, count)``).

    profiler = StepProfiler(config.train.profile_steps, workdir / "profile")
    profiler.before_step(step)             # the number the step will be logged under (1 = first)
    state, metrics = train_step(state, batch)
    profiler.after_step(step, (state, metrics))
    ...
    profiler.close()                       # in a finally: never leave the profiler running

The trace lands where TensorBoard's profile plugin and xprof look for it,
``WORKDIR/profile/plugins/profile/<run>/<host>.xplane.pb``: open it with
``tensorboard --logdir WORKDIR/profile`` or ``xprof --logdir WORKDIR/profile``.
Steps are dispatched asynchronously, so before stopping the trace the profiler waits for the
last traced step's outputs: the trace then holds that step's device work, not only its dispatch.
Each process traces its own devices into the same folder (xprof shows the hosts side by side).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TextIO

import jax

PROFILE_DIR = "profile"


def profile_range(profile_steps: Sequence[int] | None) -> range | None:
    """(first, count) -> the step numbers traced; None (or an empty value) -> no trace."""
    if not profile_steps:
        return None
    first, count = (int(v) for v in profile_steps)
    return range(first, first + count)


class StepProfiler:
    """Starts `jax.profiler` before the first chosen step and stops it once the last one has run.

    A relaunch that resumes inside the range traces the steps left; one that resumes after it
    traces nothing. `close` stops a trace that the loop left running (an error, a pre-emption).
    """

    def __init__(
        self, profile_steps: Sequence[int] | None, logdir: str | os.PathLike, *, console: TextIO | None = None
    ) -> None:
        self.steps = profile_range(profile_steps)
        self.logdir = os.fspath(logdir)
        self.console = console
        self.tracing = False

    def before_step(self, step: int) -> None:
        """Call before dispatching the step that will be logged as ``step``."""
        if self.steps is None or self.tracing or step not in self.steps:
            return
        jax.profiler.start_trace(self.logdir)
        self.tracing = True
        self._say(f"profiling steps {step}..{self.steps[-1]} -> {self.logdir}")

    def annotation(self, step: int) -> Any:
        """A step marker for xprof's step view (free when nothing is traced)."""
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def after_step(self, step: int, outputs: Any) -> None:
        """Call after dispatching ``step``; on the last traced step, waits for ``outputs`` and stops."""
        if self.tracing and step >= self.steps[-1]:
            jax.block_until_ready(outputs)  # the device work of the traced steps, not only their dispatch
            self._stop()

    def close(self) -> None:
        if self.tracing:
            self._stop()

    def _stop(self) -> None:
        jax.profiler.stop_trace()
        self.tracing = False
        self._say(f"profile written: tensorboard --logdir {self.logdir} (Profile tab) or xprof --logdir {self.logdir}")

    def _say(self, message: str) -> None:
        if self.console is not None:
            print(message, file=self.console, flush=True)
