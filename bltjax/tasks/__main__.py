r"""Build local lm-eval tasks: the built-in robustness and character tasks, or noised copies of a task.

  python -m bltjax.tasks build --out DIR [--tasks cute,cute_mc,corpus_cloze,corpus_cloze_noised]
                               [--examples 200] [--seed 0]
  python -m bltjax.tasks noise --task hellaswag|path/to/task.yaml --out DIR [--noises all]
                               [--apply_to both|context|choices] [--limit N] [--seed 0]
  python -m bltjax.tasks list

Each task lands in DIR/<name>/ as <name>.yaml and <name>.jsonl; run them with
``python -m bltjax.evaluate --tasks DIR/<name>/<name>.yaml`` or ``lm_eval --include_path DIR``.
``noise`` needs the ``eval`` extra (lm-eval) and the task's data (offline: in the Hugging Face cache).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags

from bltjax.runtime import cli
from bltjax.runtime.paths import resolve
from bltjax.tasks import build, noise
from bltjax.tasks.cute import TaskBuildError

COMMANDS = ("build", "noise", "list")


def define_flags(values: flags.FlagValues) -> None:
    """Command-line flags (see `bltjax.runtime.cli` for the conventions every program shares)."""
    flags.DEFINE_string("out", None, "Folder to write the tasks into (one sub-folder per task).", flag_values=values)
    flags.DEFINE_string("tasks", "cute,cute_mc,corpus_cloze,corpus_cloze_noised",
                        "build: built-in tasks or aliases, comma-separated.", flag_values=values)  # fmt: skip
    flags.DEFINE_integer("examples", build.DEFAULT_EXAMPLES, "build: examples per task.", flag_values=values)
    flags.DEFINE_integer("seed", 0, "Seed of the examples and of the noise.", flag_values=values)
    flags.DEFINE_string("task", None, "noise: an lm-eval multiple-choice task name or task YAML file.",
                        flag_values=values)  # fmt: skip
    flags.DEFINE_string("noises", "all", f"noise: 'all' or some of {','.join(noise.NOISES)}.", flag_values=values)
    flags.DEFINE_enum("apply_to", "both", list(noise.APPLY_TO), "noise: which side of each question to noise.",
                      flag_values=values)  # fmt: skip
    flags.DEFINE_integer("limit", None, "noise: only the first N documents.", flag_values=values)


def _main(command_line: cli.CommandLine) -> int:
    values = command_line.flags
    if len(command_line.args) != 1 or command_line.args[0] not in COMMANDS:
        raise cli.CommandLineError(f"expected one sub-command among {', '.join(COMMANDS)}, got {command_line.args}")
    command = command_line.args[0]
    if command == "list":
        for alias, members in build.ALIASES.items():
            print(f"{alias}: {', '.join(members)}")
        print(f"{build.CLOZE}")
        return 0
    cli.require(values, "out")
    out = resolve(values.out)
    if command == "build":
        if values.examples < 1:
            raise cli.CommandLineError(f"--examples: expected at least 1, got {values.examples}")
        built = build.build_tasks(values.tasks.split(","), out, seed=values.seed, examples=values.examples)
    else:
        cli.require(values, "task")
        built = build.noise_task(values.task, values.noises, out, seed=values.seed, apply_to=values.apply_to,
                                 limit=values.limit)  # fmt: skip
    for name, path in built.items():
        print(f"{name}: {path}")
    return 0


PROGRAM = cli.Program(
    "python -m bltjax.tasks",
    define_flags,
    _main,
    doc=__doc__,
    errors=(TaskBuildError, noise.NoiseError),
    positional=True,
)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bltjax.tasks``; ``argv`` without the program name (default: the command line)."""
    return PROGRAM.run(argv)


if __name__ == "__main__":
    sys.exit(main())
