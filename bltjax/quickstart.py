r"""The README's main job, end to end on the bundled corpus (about 10 minutes on 2 CPU cores).

  python -m bltjax.quickstart --workdir runs/quickstart [--config experiments/quickstart.py]

    1. prepare   bundled corpus           -> WORKDIR/data            (byte shards, docs/architecture.md §10)
    2. train     entropy model            -> WORKDIR/entropy_model   (CONFIG:entropy)
    3. export    its final parameters     -> WORKDIR/entropy_model/export
    4. entropy   sidecars next to shards  -> WORKDIR/data/*.entropy.f16, *.starts.*.bits
                 (threshold calibrated to a mean patch of --patch_size bytes)
    5. train     entropy-patched BLT      -> WORKDIR/blt             (CONFIG:blt)
    6. report    validation bits-per-byte, checkpoints and TensorBoard folders, and a greedy
                 sample from the BLT (cached generation with incremental entropy patching)
    7. tasks     accuracy of the BLT and of its entropy model (a byte LM) on a few built-in
                 lm-eval tasks (bltjax.tasks): the corpus cloze clean and under one of the BLT
                 paper's noises, and one CUTE-style character task; needs the `eval` extra

Every stage is resumable: rerunning the command skips what is complete and continues a
training stage from its latest checkpoint. The same stages are separate commands
(`bltjax.prepare`, `bltjax.train`, `bltjax.entropy`) for real corpora.

``--config`` is an experiment file with an ``entropy`` and a ``blt`` variant, read relative to
the current folder: the default, ``experiments/quickstart.py``, is there when the command runs
from the repository root (as `launch/quickstart.sh` does). The corpus ships inside the package.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys
import time
from collections.abc import Sequence

import jax
import ml_collections
from absl import flags

from bltjax.checkpoints import save_model
from bltjax.config import ConfigError, load_config
from bltjax.data import entropy, prepare
from bltjax.data import shards as shard_format
from bltjax.inference.generation.folders import generate_from_folder
from bltjax.runtime import cli, compile_cache
from bltjax.runtime.atomic import write_atomic
from bltjax.runtime.paths import resolve
from bltjax.runtime.provenance import run_stamp
from bltjax.training.trainer import train

DEFAULT_CONFIG = "experiments/quickstart.py"
VARIANTS = ("entropy", "blt")
CORPUS_DIR = pathlib.Path(__file__).resolve().parent / "data" / "corpus"  # package data, installed with it
# English prose, code and two other scripts: enough variety for entropy patching to matter.
DEFAULT_CORPUS = (
    "en_jargon_file_excerpt.jsonl",
    "en_fortunes.jsonl",
    "code_python_stdlib.jsonl",
    "zh_tang_song_poems.jsonl",
)
SAMPLE_PROMPTS = ("A hacker is ", "def main(")
STAGES = 7
# One clean multiple-choice task, the same under one of the paper's noises (randomcase keeps the
# length, so it costs what the clean one does), and one character task in multiple-choice form
# (the tiny models' exact-match generation scores are zero). Chance is 1/4 on all three.
TASKS = ("corpus_cloze", "corpus_cloze_randomcase", "cute_spelling_mc")
CHANCE = 0.25


def resolve_config_file(path: str) -> pathlib.Path:
    """``--config`` as a file: relative to the current folder, never to the package."""
    if ":" in path:
        raise ConfigError(f"--config: expected an experiment file without a variant (the quickstart uses both "
                          f"{' and '.join(VARIANTS)}), got {path!r}")  # fmt: skip
    file = pathlib.Path(path).absolute()
    if not file.is_file():
        raise ConfigError(
            f"--config: no experiment file {file} (relative paths are read from the current folder "
            f"{pathlib.Path.cwd()}); run from the repository root, or pass --config PATH to a file with the "
            f"variants {', '.join(VARIANTS)}, like the repository's {DEFAULT_CONFIG}"
        )
    return file


def experiment_config(
    config_file: pathlib.Path, variant: str, data: str | os.PathLike, steps: int | None
) -> ml_collections.ConfigDict:
    """One variant of the quickstart's experiment file, pointed at ``data`` (``steps`` shortens it)."""
    config = load_config(f"{config_file}:{variant}")
    config.data.path = str(data)
    if steps is not None:
        config.train.steps = steps
        config.train.eval_every = max(steps // 2, 1)
        config.train.log_every = max(min(config.train.log_every, steps // 4), 1)
        config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, max(steps // 10, 1))
    return config


def _stage(number: int, text: str) -> float:
    print(f"\n== {number}/{STAGES} {text}", flush=True)
    return time.time()


def _done(start: float) -> float:
    seconds = time.time() - start
    print(f"   ({seconds:.0f} s)", flush=True)
    return seconds


def write_summary(workdir: pathlib.Path, seconds: dict[str, float], scores: dict[str, float]) -> pathlib.Path:
    """WORKDIR/quickstart.json: when and where this invocation ran, each stage's seconds and the scores,
    so a document quoting the quickstart's time and bpb renders them from a file (benchmarks/tables.py)."""
    summary = {
        **run_stamp(),
        "stage_seconds": {name: round(value, 1) for name, value in seconds.items()},
        "total_seconds": round(sum(seconds.values()), 1),
        "scores": scores,
    }
    path = workdir / "quickstart.json"
    write_atomic(path, (json.dumps(summary, indent=2) + "\n").encode())
    return path


def run(
    workdir: str | os.PathLike,
    *,
    config_file: str = DEFAULT_CONFIG,
    corpus: tuple[str, ...] = DEFAULT_CORPUS,
    entropy_steps: int | None = None,
    blt_steps: int | None = None,
    patch_size: float = 4.5,
    sample_bytes: int = 96,
    task_examples: int = 50,
) -> dict[str, float]:
    """Runs (or completes) every stage; returns the validation bits-per-byte of both models and, when
    the tasks ran, their accuracies (``"<model>/<task>/acc"``)."""
    config_path = resolve_config_file(config_file)  # before any work: a bad flag fails at once
    workdir = resolve(workdir)
    seconds: dict[str, float] = {}  # stage -> wall seconds of this invocation (a finished stage is quick)
    data = workdir / "data"
    started = _stage(1, f"prepare the bundled corpus -> {data}")
    prepare.prepare([CORPUS_DIR / name for name in corpus], data, shard_bytes=1 << 20, val_fraction=0.05,
                    progress=False)  # fmt: skip
    manifest = shard_format.load_manifest(data)
    print(f"   {manifest.total('train', 'bytes'):,} train bytes, {manifest.total('validation', 'bytes'):,} validation")
    seconds["prepare"] = _done(started)

    started = _stage(2, "train the entropy model (a small byte LM)")
    entropy_config = experiment_config(config_path, "entropy", data, entropy_steps)
    entropy_run = train(entropy_config, workdir / "entropy_model")
    seconds["entropy model"] = _done(started)

    export = workdir / "entropy_model" / "export"
    started = _stage(3, f"export its parameters -> {export}")
    if not (export / "config.json").is_file():
        save_model(export, entropy_config, jax.device_get(entropy_run.state.params))
    seconds["export"] = _done(started)

    started = _stage(4, f"entropy sidecars, threshold for a mean patch of {patch_size} bytes")
    # Rows of 2048 bytes: the exact-chunking overlap (layers x (window - 1) = 254) stays small beside them.
    summary = entropy.run(data, export, target_patch_size=patch_size, context=2048, log=sys.stdout)
    print(f"   threshold {summary.threshold:.4f} (tag {summary.tag}), {len(summary.computed)} shards computed")
    seconds["sidecars"] = _done(started)

    started = _stage(5, "train the BLT on entropy patches")
    blt_config = experiment_config(config_path, "blt", data, blt_steps)
    blt_config.patching.threshold = float(summary.threshold)
    blt_run = train(blt_config, workdir / "blt")
    seconds["BLT"] = _done(started)

    started = _stage(6, "report")
    print(f"   entropy model validation bpb: {entropy_run.validation_bpb:.4f}")
    print(f"   BLT validation bpb:           {blt_run.validation_bpb:.4f}")
    print(f"   checkpoints: {workdir / 'blt' / 'checkpoints'}  (entropy model: {workdir / 'entropy_model'})")
    print(f"   tensorboard --logdir {workdir}")
    if sample_bytes > 0:
        # The same path as `python -m bltjax.generate --model WORKDIR/blt`: the entropy model is
        # found next to the run and accepted because the sidecars name its fingerprint.
        print(f"   greedy samples ({sample_bytes} bytes each):")
        generate_from_folder(workdir=workdir / "blt", prompts=list(SAMPLE_PROMPTS), max_bytes=sample_bytes)
    scores = {"entropy_model_bpb": entropy_run.validation_bpb, "blt_bpb": blt_run.validation_bpb}
    seconds["report"] = time.time() - started
    if task_examples > 0:
        started = _stage(7, f"tasks: accuracy on {task_examples} examples each (chance {CHANCE:.2f})")
        scores.update(task_scores(workdir, {"entropy_model": export, "blt": workdir / "blt"}, task_examples))
        seconds["tasks"] = _done(started)
    print(f"   total {sum(seconds.values()):.0f} s (written to {write_summary(workdir, seconds, scores)})")
    return scores


def task_scores(workdir: pathlib.Path, models: dict[str, os.PathLike], examples: int) -> dict[str, float]:
    """Accuracy of each model on `TASKS` (the first ``examples`` documents), printed as a table and written
    to WORKDIR/eval/quickstart_tasks.json; nothing but a note when lm-eval (the ``eval`` extra) is missing."""
    if importlib.util.find_spec("lm_eval") is None:
        print("   skipped: lm-eval is not installed (pip install -e '.[eval]'; launch/quickstart.sh installs it)")
        return {}
    from bltjax.inference.task_runner import run_tasks  # noqa: PLC0415 - imports lm-eval

    results = {name: run_tasks(model, list(TASKS), limit=examples) for name, model in models.items()}
    scores = {f"{name}/{task}/acc": result["tasks"][task]["acc"] for name, result in results.items() for task in TASKS}
    width = max(len(task) for task in TASKS) + 2
    print(("   " + " " * 15 + "".join(task.ljust(width) for task in TASKS)).rstrip())
    for name in models:
        print((f"   {name:<15}" + "".join(f"{scores[f'{name}/{task}/acc']:<{width}.3f}" for task in TASKS)).rstrip())
    out = workdir / "eval" / "quickstart_tasks.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, (json.dumps({"examples": examples, "results": results}, indent=2) + "\n").encode())
    print(f"   written: {out}")
    return scores


def define_flags(values: flags.FlagValues) -> None:
    """Command-line flags (see `bltjax.runtime.cli` for the conventions every program shares)."""
    flags.DEFINE_string("workdir", "runs/quickstart", "Run folder to write: data, models and logs.",
                        flag_values=values)  # fmt: skip
    flags.DEFINE_string("config", DEFAULT_CONFIG, "Experiment file with entropy and blt variants (from the cwd).",
                        flag_values=values)  # fmt: skip
    flags.DEFINE_integer("entropy_steps", None, "Override the entropy model's training steps.", flag_values=values)
    flags.DEFINE_integer("blt_steps", None, "Override the BLT's training steps.", flag_values=values)
    flags.DEFINE_float("patch_size", 4.5, "Mean patch size the entropy threshold is calibrated to.",
                       flag_values=values)  # fmt: skip
    flags.DEFINE_integer("sample_bytes", 96, "Bytes generated per sample prompt at the end; 0 = none.",
                         flag_values=values)  # fmt: skip
    flags.DEFINE_list("corpus", list(DEFAULT_CORPUS), "Files of bltjax/data/corpus to train on.", flag_values=values)
    flags.DEFINE_integer("task_examples", 50, "Examples per task in the last stage's accuracies; 0 = no tasks.",
                         flag_values=values)  # fmt: skip


def _main(command_line: cli.CommandLine) -> int:
    values = command_line.flags
    compile_cache.enable()
    run(
        values.workdir,
        config_file=values.config,
        corpus=tuple(values.corpus),
        entropy_steps=values.entropy_steps,
        blt_steps=values.blt_steps,
        patch_size=values.patch_size,
        sample_bytes=values.sample_bytes,
        task_examples=values.task_examples,
    )
    return 0


PROGRAM = cli.Program("python -m bltjax.quickstart", define_flags, _main, doc=__doc__, errors=(ConfigError,))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bltjax.quickstart``; ``argv`` without the program name (default: the command line)."""
    return PROGRAM.run(argv)


if __name__ == "__main__":
    sys.exit(main())
