"""Evaluates each new complete checkpoint of a running training workdir, once, across restarts.

    watch_checkpoints(workdir, evaluate_step, record=WORKDIR/eval/watch-tasks-<key>.json)

What ``python -m bltjax.evaluate --watch`` and ``python -m bltjax.eval --watch`` run. Rules:

* Only complete steps are read: `bltjax.checkpoints.complete_steps` lists step folders that hold
  every item and orbax's ``_CHECKPOINT_METADATA`` (written last; in a bucket also
  ``commit_success.txt``). A save in progress is a temporary folder or a step folder without
  that file, and is never opened.
* Steps are evaluated oldest first. A step that the run's retention (``train.keep``) deletes
  before or while it is read is recorded as skipped, not as a failure.
* The record (a JSON file, written atomically after every step) lists the evaluated and skipped
  steps, so a restarted watcher resumes where it stopped and evaluates nothing twice.
* It stops once the run's final step (``train.steps`` of the config saved with the checkpoints)
  is done, or after ``timeout_s`` seconds without a new complete checkpoint (counted from the
  start or from the end of the last evaluation).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

from bltjax import checkpoints
from bltjax.runtime import paths
from bltjax.runtime.atomic import write_atomic

STOPPED_AT_FINAL = "final step"
STOPPED_AT_TIMEOUT = "timeout"


class WatchError(ValueError):
    """A folder that cannot be watched or a record that cannot be read; the message names it."""


@dataclasses.dataclass(frozen=True)
class WatchResult:
    evaluated: list[int]  # steps evaluated by this call, in order
    skipped: list[int]  # steps deleted by the run's retention before they could be read
    stopped: str  # STOPPED_AT_FINAL or STOPPED_AT_TIMEOUT
    final_step: int | None  # the run's train.steps, once a checkpoint told it


def read_record(path: str | os.PathLike) -> dict[str, list[int]]:
    """{"evaluated": [...], "skipped": [...]} of a watch record (empty lists when it does not exist yet)."""
    path = paths.resolve(path)
    if not path.is_file():
        return {"evaluated": [], "skipped": []}
    try:
        record = json.loads(path.read_text())
        return {key: sorted(int(step) for step in record.get(key, [])) for key in ("evaluated", "skipped")}
    except (ValueError, TypeError, AttributeError) as err:
        raise WatchError(f"{path}: unreadable watch record ({err}); expected JSON with 'evaluated' and 'skipped' "
                         "step lists (delete it to evaluate every checkpoint again)") from err  # fmt: skip


def _write_record(path, record: dict[str, list[int]], about: dict[str, Any]) -> None:
    path = paths.resolve(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps({**about, **record}, indent=2, sort_keys=True) + "\n").encode())


def final_step(workdir: str | os.PathLike, step: int) -> int | None:
    """``train.steps`` of the config saved with checkpoint ``step`` (None when it has none)."""
    config, _ = checkpoints.read_step_config(checkpoints.checkpoints_dir(workdir) / str(step))
    train = config.get("train")
    return None if train is None or train.get("steps") is None else int(train.steps)


def _final_step_of_newest(workdir) -> int | None:
    steps = checkpoints.complete_steps(workdir)
    try:
        return final_step(workdir, steps[-1]) if steps else None
    except checkpoints.CheckpointError:  # deleted by the run's retention meanwhile: ask again at the next poll
        return None


def watch_checkpoints(
    workdir: str | os.PathLike,
    evaluate_step: Callable[[int], Any],
    *,
    record: str | os.PathLike,
    about: dict[str, Any] | None = None,
    timeout_s: float = 3600.0,
    poll_s: float = 30.0,
    log: Callable[[str], None] = print,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> WatchResult:
    """Calls ``evaluate_step(step)`` for each complete step of ``workdir`` not in ``record`` (module docstring).

    ``about`` is written into the record beside the step lists (what is being evaluated).
    """
    workdir = paths.resolve(workdir)
    if not workdir.is_dir():
        raise WatchError(f"--watch: {workdir} is no folder; expected a training workdir (python -m bltjax.train)")
    if checkpoints.is_model_dir(workdir) or (workdir / "model.safetensors").is_file():
        raise WatchError(f"--watch: {workdir} is a model folder, which holds one model; expected a training workdir")
    state = read_record(record)
    done = set(state["evaluated"]) | set(state["skipped"])
    evaluated: list[int] = []
    skipped: list[int] = []
    final: int | None = None
    last_progress = clock()
    if done:
        log(f"watch: resuming; already evaluated steps {state['evaluated']} (record {paths.resolve(record)})")
    while True:
        for step in [s for s in checkpoints.complete_steps(workdir) if s not in done]:
            try:
                evaluate_step(step)
            except (checkpoints.CheckpointError, FileNotFoundError):
                if step in checkpoints.complete_steps(workdir):
                    raise
                log(f"watch: step {step} was deleted by the run's checkpoint retention before it was read; skipped")
                state["skipped"] = sorted({*state["skipped"], step})
                skipped.append(step)
            else:
                state["evaluated"] = sorted({*state["evaluated"], step})
                evaluated.append(step)
            done.add(step)
            _write_record(record, state, about or {})
            last_progress = clock()
        if final is None:
            final = _final_step_of_newest(workdir)
        if final is not None and any(step >= final for step in done):
            log(f"watch: the run's final step {final} is done; stopping")
            return WatchResult(evaluated, skipped, STOPPED_AT_FINAL, final)
        if clock() - last_progress >= timeout_s:
            log(f"watch: no new complete checkpoint in {timeout_s:g} s; stopping")
            return WatchResult(evaluated, skipped, STOPPED_AT_TIMEOUT, final)
        sleep(poll_s)
