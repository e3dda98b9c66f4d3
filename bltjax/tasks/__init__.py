"""Evaluation tasks the package builds itself: the BLT paper's noise transforms (any multiple-choice
task), CUTE-style character tasks and an offline cloze task, written as local lm-eval tasks.

`build_tasks` writes built-in tasks (names in `builtin_task_names`, aliases ``cute``, ``cute_mc``,
``corpus_cloze_noised``) to a folder; `noise_task` writes noised copies of any lm-eval
multiple-choice task. ``python -m bltjax.tasks`` is the command line of both.
"""

from bltjax.tasks.build import build_tasks, builtin_task_names, expand_names, is_builtin, noise_task
from bltjax.tasks.cute import TaskBuildError
from bltjax.tasks.noise import NOISES, NoiseError, noise_text

__all__ = [
    "NOISES",
    "NoiseError",
    "TaskBuildError",
    "build_tasks",
    "builtin_task_names",
    "expand_names",
    "is_builtin",
    "noise_task",
    "noise_text",
]
