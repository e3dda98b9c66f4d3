r"""lm-eval-harness tasks against a checkpoint: task names, local task YAMLs and bltjax's built-in tasks.

  python -m bltjax.evaluate --model runs/quickstart/blt --tasks cute_spelling_mc,corpus_cloze --limit 100
  python -m bltjax.evaluate --model MODEL_DIR --tasks my_tasks/choice.yaml [--batch-size 16] [--out scores.json]
  python -m bltjax.evaluate --model runs/blt --tasks corpus_cloze --watch [--watch-timeout 3600]

``--tasks``: comma-separated entries, each a task YAML file, a folder of task YAMLs, a task built
into bltjax (``python -m bltjax.tasks list``) or a task lm-eval knows (its data must be local or
cached: lm-eval runs offline, see docs/evaluation.md). ``--model`` is a training workdir (its
newest complete step, or ``--step``), a save_model folder or a Hugging Face BLT folder; an
entropy-patched BLT whose entropy model cannot be found beside it needs ``--entropy-model``.

Prints a table and writes JSON atomically: ``WORKDIR/eval/tasks-step<N>.json`` for a workdir,
``MODEL_DIR/eval/tasks.json`` for a model folder, or ``--out``. A workdir's scores also go to the
run's own metrics backends at the checkpoint's step (split ``tasks``: TensorBoard tags
``<task>/<metric>`` under ``tensorboard/tasks/``). ``--watch`` evaluates every new complete
checkpoint of a running workdir until its final step (`bltjax.inference.watch`). Exit status 1
with a message naming the flag or file for bad input, 2 for a bad command line.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from typing import Any

import jax
from absl import flags

from bltjax.config import ConfigError
from bltjax.inference.restore import RestoreError
from bltjax.inference.task_runner import TaskError
from bltjax.inference.watch import WatchError
from bltjax.runtime import cli, compile_cache, paths
from bltjax.runtime.atomic import write_atomic
from bltjax.tasks import TaskBuildError

TASKS_SPLIT = "tasks"  # the metrics split (TensorBoard run tensorboard/tasks/) and the JSON file's stem


def define_flags(values: flags.FlagValues) -> None:
    """Command-line flags (see `bltjax.runtime.cli` for the conventions every program shares)."""
    flags.DEFINE_string("model", None, "Model to read: a training workdir, a save_model folder or a Hugging Face BLT "
                        "folder.", flag_values=values)  # fmt: skip
    flags.DEFINE_string("tasks", None, "Comma-separated task names, task YAML files or folders of task YAMLs.",
                        flag_values=values)  # fmt: skip
    flags.DEFINE_float("limit", None, "Documents per task (below 1: a fraction of each task).", flag_values=values)
    flags.DEFINE_integer("batch_size", None, "Sequences per forward pass (default 8).", flag_values=values)
    flags.DEFINE_integer("max_length", None, "Input ids per forward pass (default: the model's data.seq_len).",
                         flag_values=values)  # fmt: skip
    flags.DEFINE_integer("num_fewshot", None, "Few-shot examples per prompt (default: each task's own).",
                         flag_values=values)  # fmt: skip
    flags.DEFINE_integer("seed", 0, "Seed of few-shot sampling and of built-in task generation.", flag_values=values)
    flags.DEFINE_string("entropy_model", None, "Entropy model of an entropy-patched BLT, when none is found beside it.",
                        flag_values=values)  # fmt: skip
    flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: the latest complete one).",
                         flag_values=values)  # fmt: skip
    flags.DEFINE_string("out", None, "JSON output path (default: DIR/eval/tasks[-step<N>].json).", flag_values=values)
    flags.DEFINE_bool("watch", False, "Evaluate each new complete checkpoint of a running workdir until its final "
                      "step (resumes after a restart).", flag_values=values)  # fmt: skip
    flags.DEFINE_float("watch_timeout", 3600.0, "With --watch: stop after this many seconds without a new "
                       "checkpoint.", flag_values=values)  # fmt: skip
    flags.DEFINE_float("poll_seconds", 30.0, "With --watch: seconds between looks at the checkpoints folder.",
                       flag_values=values)  # fmt: skip


def _limit(value: float | None) -> int | float | None:
    """lm-eval reads a limit >= 1 as a count of documents and one below 1 as a fraction."""
    return int(value) if value is not None and value >= 1 and float(value).is_integer() else value


def format_table(result: dict[str, Any]) -> str:
    """A markdown table of every task's metrics (with lm-eval's standard error where it gives one)."""
    where = result["model"] if result["step"] is None else f"{result['model']} (step {result['step']})"
    lines = [f"model: {where}", "", "| task | metric | value | stderr | documents |", "|---|---|---|---|---|"]
    for task, metrics in result["tasks"].items():
        for metric, value in metrics.items():
            stderr = result["stderr"].get(task, {}).get(metric)
            shown = "" if stderr is None else f"{stderr:.4f}"
            lines.append(f"| {task} | {metric} | {value:.4f} | {shown} | {result['n_samples'].get(task, '')} |")
    return "\n".join(lines)


def write_json(result: dict[str, Any], path) -> Any:
    """``result`` as JSON, atomically (process 0 only); returns the path."""
    path = paths.resolve(path)
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, (json.dumps(result, indent=2, allow_nan=True) + "\n").encode())
    return path


def write_to_run(result: dict[str, Any], loaded) -> None:
    """The scores into the training run's writers at the checkpoint's step (split ``tasks``)."""
    from bltjax.training.metrics import MetricsWriter

    scalars = {f"{task}/{name}": value for task, scores in result["tasks"].items() for name, value in scores.items()}
    run_root = paths.resolve(loaded.source).parent.parent  # WORKDIR/checkpoints/<step>
    with MetricsWriter.from_config(loaded.config, run_root, process_index=jax.process_index(), console=None,
                                   job_type="eval", run_suffix=f"tasks-step{loaded.step}") as writer:  # fmt: skip
        writer.write(int(loaded.step), scalars, split=TASKS_SPLIT)


def evaluate_once(options: dict[str, Any], *, step: int | None, out: str | None) -> tuple[dict[str, Any], Any]:
    """Runs the tasks on one checkpoint, writes the JSON (and, for a workdir, the run's scalars)."""
    from bltjax.inference.evaluate import default_output_path
    from bltjax.inference.task_runner import require_harness, run_task_results

    harness = require_harness()
    try:
        results = run_task_results(
            options["model"], options["tasks"], limit=options["limit"], batch_size=options["batch_size"],
            seed=options["seed"], max_length=options["max_length"], entropy_model=options["entropy_model"],
            step=step, num_fewshot=options["num_fewshot"],
        )  # fmt: skip
    except harness.HarnessError as err:  # one error type for the command line: the message names the argument
        raise TaskError(str(err)) from err
    result, loaded = results.to_json(), results.loaded
    path = write_json(result, out or default_output_path(loaded, TASKS_SPLIT))
    if loaded.step is not None:
        write_to_run(result, loaded)
    return result, path


def watch_record_path(options: dict[str, Any]) -> Any:
    """WORKDIR/eval/watch-tasks-<key>.json; the key hashes what is evaluated, so other tasks get their own record."""
    about = {key: options[key] for key in ("tasks", "limit", "seed", "num_fewshot", "max_length")}
    key = hashlib.sha256(json.dumps(about, sort_keys=True).encode()).hexdigest()[:10]
    return paths.resolve(options["model"]) / "eval" / f"watch-{TASKS_SPLIT}-{key}.json", about


def _main(command_line: cli.CommandLine) -> int:
    from bltjax.inference.task_runner import parse_task_list, require_harness
    from bltjax.inference.watch import watch_checkpoints

    values = command_line.flags
    cli.require(values, "model", "tasks")
    if values.watch and (values.step is not None or values.out):
        raise TaskError("--watch: evaluates every checkpoint into WORKDIR/eval/; leave out --step and --out")
    compile_cache.enable()
    options = {
        "model": values.model,
        "tasks": parse_task_list(values.tasks),
        "limit": _limit(values.limit),
        "batch_size": values.batch_size,
        "max_length": values.max_length,
        "entropy_model": values.entropy_model,
        "seed": values.seed,
        "num_fewshot": values.num_fewshot,
    }
    require_harness()  # without the eval extra: one line saying so, before any work
    if not values.watch:
        result, path = evaluate_once(options, step=values.step, out=values.out)
        print(format_table(result))
        print(f"\nwritten: {path}", flush=True)
        return 0

    record, about = watch_record_path(options)

    def evaluate_step(step: int) -> None:
        result, path = evaluate_once(options, step=step, out=None)
        print(format_table(result))
        print(f"\nwritten: {path}", flush=True)

    watched = watch_checkpoints(
        values.model, evaluate_step, record=record, about=about, timeout_s=values.watch_timeout,
        poll_s=values.poll_seconds, log=lambda line: print(line, flush=True),
    )  # fmt: skip
    print(f"watch: evaluated steps {watched.evaluated}; stopped at {watched.stopped}", flush=True)
    return 0


PROGRAM = cli.Program(
    "python -m bltjax.evaluate",
    define_flags,
    _main,
    doc=__doc__,
    errors=(TaskError, TaskBuildError, WatchError, RestoreError, ConfigError),
)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bltjax.evaluate``; ``argv`` without the program name (default: the command line)."""
    return PROGRAM.run(argv)


if __name__ == "__main__":
    sys.exit(main())
