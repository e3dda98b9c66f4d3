"""lm-eval tasks against a bltjax checkpoint, from Python: what ``python -m bltjax.evaluate`` runs.

    from bltjax.inference.task_runner import run_tasks
    result = run_tasks("runs/quickstart/blt", ["cute_spelling_mc", "tests/fixtures/lm_eval_tiny_choice"], limit=50)
    result["tasks"]["cute_spelling_mc"]["acc"]

Each entry of ``tasks`` is one of

* a task YAML file: the tasks it defines (its folder is searched too, for files it includes);
* a folder: every task (not group) its YAML files define;
* a task built into bltjax (`bltjax.tasks.is_builtin`: ``cute_spelling``, ``corpus_cloze_drop``, aliases
  such as ``cute_mc``): built into a temporary folder, deterministically (``seed``), then run;
* any other name: a task, group or tag lm-eval knows (its own, or one under ``include_path``).

The model is the lm-eval model ``bltjax`` (`bltjax.inference.harness`), loaded once. lm-eval
runs offline: `bltjax.inference.harness` sets ``HF_DATASETS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``
unless they are already set, so a task whose data is neither local nor cached fails rather
than downloads. The returned dict (`TaskResults.to_json`) is what the command writes as JSON.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from bltjax.runtime import paths

STDERR_SUFFIX = "_stderr"
DEFAULT_BOOTSTRAP_ITERS = 1000  # lm-eval's stderr of non-mean metrics; mean metrics have a closed form


class TaskError(ValueError):
    """A --tasks entry that names no task, or a task lm-eval cannot run; the message names the entry."""


@dataclasses.dataclass(frozen=True)
class TaskResults:
    """Scores of one model on a list of tasks (`to_json` is the written form)."""

    model: str  # the step folder or model folder read
    step: int | None
    model_type: str
    tasks: dict[str, dict[str, float]]  # task -> metric -> value ("acc", "exact_match", "acc_norm", ...)
    stderr: dict[str, dict[str, float]]  # task -> metric -> standard error, where lm-eval gives one
    n_samples: dict[str, int]  # task -> documents evaluated (after --limit)
    requested: list[str]  # the --tasks entries as given
    settings: dict[str, Any]  # limit, batch_size, max_length, seed, num_fewshot
    versions: dict[str, Any]  # task versions lm-eval reports
    lm_eval_version: str
    seconds: float
    loaded: Any = dataclasses.field(default=None, repr=False, compare=False)  # the InferenceModel scored

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "loaded"}

    def scalars(self) -> dict[str, float]:
        """``<task>/<metric>`` -> value: what the run's writers get (TensorBoard tags ``tasks/<task>/<metric>``)."""
        return {f"{task}/{metric}": value for task, metrics in self.tasks.items() for metric, value in metrics.items()}


def parse_task_list(tasks: str | Iterable[str]) -> list[str]:
    """A comma-separated string or a list of entries, blanks dropped; an empty result is an error."""
    entries = tasks.split(",") if isinstance(tasks, str) else [str(t) for t in tasks]
    entries = [entry.strip() for entry in entries if entry.strip()]
    if not entries:
        raise TaskError("--tasks: give at least one task name, task YAML file or folder of task YAMLs")
    return entries


def _metric_name(key: str) -> tuple[str, bool] | None:
    """lm-eval's ``acc,none`` -> ("acc", False); ``acc_stderr,none`` -> ("acc", True); filters other than none kept."""
    if "," not in key:
        return None
    metric, _, filter_name = key.partition(",")
    stderr = metric.endswith(STDERR_SUFFIX)
    if stderr:
        metric = metric[: -len(STDERR_SUFFIX)]
    return (metric if filter_name == "none" else f"{metric}_{filter_name}"), stderr


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # lm-eval writes "N/A" where it has no stderr
    return float(value) if math.isfinite(value) else None


def summarize(raw: Mapping[str, Any]) -> tuple[dict, dict, dict]:
    """(scores, stderrs, samples) per task from `lm_eval.simple_evaluate`'s output."""
    scores: dict[str, dict[str, float]] = {}
    stderrs: dict[str, dict[str, float]] = {}
    for task, entry in sorted(raw.get("results", {}).items()):
        for key, value in entry.items():
            parsed, number = _metric_name(key), _number(value)
            if parsed is None or number is None:
                continue
            metric, is_stderr = parsed
            (stderrs if is_stderr else scores).setdefault(task, {})[metric] = number
    samples = {task: int(count.get("effective", 0)) for task, count in sorted(raw.get("n-samples", {}).items())}
    return scores, stderrs, samples


def resolve_tasks(
    entries: Sequence[str], build_dir: str | os.PathLike, *, seed: int = 0
) -> tuple[list[str], list[str], bool]:
    """(task names, include paths, whether a name needs lm-eval's own tasks); built-in tasks are written under
    ``build_dir``."""
    from lm_eval.tasks import TaskManager

    names: list[str] = []
    include: list[str] = []
    builtin: list[str] = []
    registry_names = False
    for entry in entries:
        path = paths.resolve(entry) if not paths.is_uri(entry) else None
        if path is not None and path.is_file():
            if path.suffix not in (".yaml", ".yml"):
                raise TaskError(f"--tasks: {path} is a file but not a task YAML (expected .yaml)")
            found = TaskManager(include_path=[str(path.parent)], include_defaults=False).task_index
            defined = [name for name, e in found.items() if e.yaml_path is not None and e.yaml_path == path]
            if not defined:
                raise TaskError(f"--tasks: {path} defines no task (expected a 'task:' or 'group:' key)")
            names += defined
            include.append(str(path.parent))
        elif path is not None and path.is_dir():
            defined = TaskManager(include_path=[str(path)], include_defaults=False).all_subtasks
            if not defined:
                raise TaskError(f"--tasks: {path} holds no task YAML (expected *.yaml files with a 'task:' key)")
            names += defined
            include.append(str(path))
        elif _is_builtin(entry):
            builtin.append(entry)
        else:
            names.append(entry)
            registry_names = True
    if builtin:
        from bltjax.tasks import build_tasks

        built = build_tasks(builtin, paths.resolve(build_dir), seed=seed)
        names += list(built)
        include += sorted({str(path.parent) for path in built.values()})
    return list(dict.fromkeys(names)), list(dict.fromkeys(include)), registry_names


def _is_builtin(name: str) -> bool:
    from bltjax.tasks import is_builtin

    return is_builtin(name)


def require_harness():
    """`bltjax.inference.harness` (which imports lm-eval), or a TaskError naming the extra to install."""
    try:
        from bltjax.inference import harness
    except ModuleNotFoundError as err:
        if err.name is None or not err.name.startswith("lm_eval"):
            raise
        message = 'lm-eval is not installed: pip install -e ".[eval]" (the eval extra, docs/evaluation.md)'
        raise TaskError(message) from err
    return harness


def run_tasks(
    model_dir: str | os.PathLike,
    tasks: str | Iterable[str],
    *,
    limit: int | float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    max_length: int | None = None,
    entropy_model: str | os.PathLike | None = None,
    step: int | None = None,
    num_fewshot: int | None = None,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    model: Any = None,
) -> dict[str, Any]:
    """Runs ``tasks`` (module docstring) on the model in ``model_dir``; returns `TaskResults.to_json`.

    ``limit``: documents per task (lm-eval's ``--limit``; below 1 a fraction). ``seed`` seeds
    lm-eval's sampling of few-shot examples and the building of built-in tasks. ``model``: an
    already loaded `harness.BltjaxLM` (the watcher passes none; tests may).
    """
    return run_task_results(
        model_dir, tasks, limit=limit, batch_size=batch_size, seed=seed, max_length=max_length,
        entropy_model=entropy_model, step=step, num_fewshot=num_fewshot, include_path=include_path, model=model,
    ).to_json()  # fmt: skip


def run_task_results(
    model_dir: str | os.PathLike | None,
    tasks: str | Iterable[str],
    *,
    limit: int | float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    max_length: int | None = None,
    entropy_model: str | os.PathLike | None = None,
    step: int | None = None,
    num_fewshot: int | None = None,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    model: Any = None,
) -> TaskResults:
    """`run_tasks` returning the `TaskResults` itself."""
    harness = require_harness()  # first: it sets the offline variables that `datasets` reads at import
    import lm_eval
    from lm_eval.tasks import TaskManager

    entries = parse_task_list(tasks)
    if limit is not None and not limit > 0:
        raise TaskError(f"--limit: expected a positive number of documents (or a fraction below 1), got {limit}")
    started = time.time()
    extra = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path or [])
    with tempfile.TemporaryDirectory(prefix="bltjax-tasks-") as build_dir:
        names, include, registry_names = resolve_tasks(entries, build_dir, seed=seed)
        # lm-eval's own few thousand task files are indexed only when a name may be one of them (seconds).
        manager = TaskManager(
            include_path=[*include, *(str(paths.resolve(p)) for p in extra)] or None,
            include_defaults=registry_names or not include,
        )
        unknown = [name for name in names if name not in manager.all_tasks]
        if unknown:
            raise TaskError(
                f"--tasks: {unknown[0]!r} is no task lm-eval knows, no task YAML file or folder, and no built-in "
                "task (python -m bltjax.tasks list names those)"
            )
        if model is None:  # loaded once the tasks are known to exist: a typo fails in seconds
            model = harness.BltjaxLM(
                path=str(model_dir), batch_size=batch_size, max_length=max_length,
                entropy_model=None if entropy_model is None else str(entropy_model), step=step,
            )  # fmt: skip
        raw = lm_eval.simple_evaluate(
            model=model, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
            bootstrap_iters=DEFAULT_BOOTSTRAP_ITERS, log_samples=False, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed,
        )  # fmt: skip
    scores, stderrs, samples = summarize(raw)
    loaded = model.scorer.loaded
    return TaskResults(
        model=loaded.source,
        step=loaded.step,
        model_type=str(loaded.config.model_type),
        tasks=scores,
        stderr=stderrs,
        n_samples=samples,
        requested=entries,
        settings={
            "limit": limit,
            "batch_size": model.scorer.batch_size,
            "max_length": model.scorer.max_length,
            "seed": seed,
            "num_fewshot": num_fewshot,
        },
        versions={task: str(version) for task, version in raw.get("versions", {}).items()},
        lm_eval_version=_installed_version(),
        seconds=time.time() - started,
        loaded=loaded,
    )


def _installed_version() -> str:
    from importlib import metadata

    return metadata.version("lm-eval")
