"""Local lm-eval tasks on disk: the built-in ones (CUTE categories, the corpus cloze and its noised
copies) and noised copies of any lm-eval multiple-choice task.

Every task is a folder ``OUT/<name>/`` with ``<name>.jsonl`` (one document a line) and
``<name>.yaml``, an lm-eval 0.4 task config that reads the JSONL through the ``json`` dataset
builder, so ``lm_eval --include_path OUT --tasks <name>`` (or `bltjax.evaluate`) runs it offline.
The YAML names its data by absolute path: build the folder on the machine that evaluates.
Files are written atomically and are a function of (names, seed, examples): rebuilding gives the
same bytes.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Sequence

from bltjax.runtime.atomic import write_atomic
from bltjax.runtime.paths import PathLike, require_local
from bltjax.tasks import cloze, cute, noise
from bltjax.tasks.cute import TaskBuildError

DEFAULT_EXAMPLES = 200
CLOZE = "corpus_cloze"
GENERATION_STOP = "\n"  # every answer is one line; the solved shots are separated by blank lines
ANSWER_MARGIN_BYTES = 8  # generation budget beyond a task's longest answer: the blank before it, the end of line


def builtin_task_names() -> list[str]:
    """Every built-in task: ``cute_<category>`` (generation), ``cute_<category>_mc``, ``corpus_cloze``
    and ``corpus_cloze_<noise>`` (context and endings noised)."""
    names = [f"cute_{category}" for category in cute.CATEGORIES]
    names += [f"cute_{category}_mc" for category in cute.CATEGORIES]
    return names + [CLOZE] + [f"{CLOZE}_{name}" for name in noise.NOISES]


# Names that stand for several tasks (lm-eval would call them groups; here they only expand).
ALIASES = {
    "cute": [f"cute_{category}" for category in cute.CATEGORIES],
    "cute_mc": [f"cute_{category}_mc" for category in cute.CATEGORIES],
    "corpus_cloze_noised": [f"{CLOZE}_{name}" for name in noise.NOISES],
}


def expand_names(names: Iterable[str]) -> list[str]:
    """Aliases expanded, order kept, repeats dropped; an unknown name is an error that lists the known ones."""
    known = set(builtin_task_names())
    expanded: dict[str, None] = {}
    for name in names:
        for task in ALIASES.get(name, [name]):
            if task not in known:
                raise TaskBuildError(
                    f"task {task!r}: not a built-in task; expected one of {', '.join(sorted(ALIASES))} or "
                    f"{', '.join(builtin_task_names())}"
                )
            expanded.setdefault(task, None)
    return list(expanded)


def is_builtin(name: str) -> bool:
    """Whether `build_tasks` knows ``name`` (a task or an alias)."""
    return name in ALIASES or name in builtin_task_names()


def _yaml_value(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON scalar or list is a YAML flow value


def _write_task(out: pathlib.Path, name: str, documents: Sequence[dict], settings: dict) -> pathlib.Path:
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    lines = (json.dumps(doc, ensure_ascii=False, sort_keys=True) + "\n" for doc in documents)
    write_atomic(data, "".join(lines).encode())
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": os.fspath(data)}},
        "test_split": "test",
        **settings,
        "metadata": {"version": 1.0},
    }
    lines = [f"# Built by python -m bltjax.tasks build; {len(documents)} documents in {data.name}."]
    lines += [f"{key}: {_yaml_value(value)}" for key, value in config.items()]
    path = folder / f"{name}.yaml"
    write_atomic(path, ("\n".join(lines) + "\n").encode())
    return path


def _mean(metric: str) -> dict:
    return {"metric": metric, "aggregation": "mean", "higher_is_better": True}


def choice_settings(target_delimiter: str = " ") -> dict:
    """lm-eval settings of a multiple-choice task over ``{"context", "choices", "label"}`` documents."""
    return {
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": target_delimiter,
        "metric_list": [_mean("acc"), _mean("acc_norm")],
    }


def write_choice_task(out: PathLike, name: str, documents: Sequence[noise.ChoiceDocument],
                      target_delimiter: str = " ") -> pathlib.Path:  # fmt: skip
    """A multiple-choice task folder ``out/name``; returns its YAML."""
    folder = pathlib.Path(require_local(out, "task folder"))
    return _write_task(folder, name, [doc.to_json() for doc in documents], choice_settings(target_delimiter))


def _cute_documents(category: str, examples: int, seed: int, multiple_choice: bool) -> tuple[list[dict], dict]:
    built = cute.examples(category, examples, seed)
    if multiple_choice:
        docs = [noise.ChoiceDocument(e.prompt, e.choices, e.label).to_json() for e in built]
        return docs, choice_settings()
    settings = {
        "output_type": "generate_until",
        "doc_to_text": "prompt",
        "doc_to_target": "answer",
        # Decoding runs to max_gen_toks before cutting at the stop, so the budget is the longest answer's.
        "generation_kwargs": {
            "until": [GENERATION_STOP],
            "do_sample": False,
            "max_gen_toks": max(len(e.answer.encode()) for e in built) + ANSWER_MARGIN_BYTES,
        },
        # CUTE scores the exact answer; the space after "Answer:" and the end of line are not part of it.
        "metric_list": [{**_mean("exact_match"), "regexes_to_ignore": ["^\\s+", "\\s+$"]}],
    }
    return [e.to_json() for e in built], settings


def build_tasks(names: Iterable[str], out: PathLike, *, seed: int = 0, examples: int = DEFAULT_EXAMPLES) -> dict:
    """Builds the named built-in tasks (aliases allowed) under ``out``; returns {task name: YAML path}."""
    folder = pathlib.Path(require_local(out, "task folder"))
    built = {}
    for name in expand_names(names):
        if name.startswith("cute_"):
            category = name.removeprefix("cute_").removesuffix("_mc")
            docs, settings = _cute_documents(category, examples, seed, name.endswith("_mc"))
            built[name] = _write_task(folder, name, docs, settings)
            continue
        documents = cloze.documents(examples, seed)
        if name != CLOZE:
            documents = noise.noise_documents(documents, name.removeprefix(f"{CLOZE}_"), seed)
        built[name] = write_choice_task(folder, name, documents)
    return built


def noised_task_name(task: str, noise_name: str, apply_to: str) -> str:
    """``<task>_<noise>`` when both sides are noised, ``<task>_<noise>_<context|choices>`` otherwise."""
    return f"{task}_{noise_name}" if apply_to == "both" else f"{task}_{noise_name}_{apply_to}"


def _yaml_task_name(path: pathlib.Path) -> object:
    """The ``task:`` of a task YAML, read without lm-eval (whose loader moves between releases); lm-eval's
    ``!function`` tags are read as plain strings."""
    import yaml  # noqa: PLC0415 - comes with lm-eval

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    config = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    return config.get("task") if isinstance(config, dict) else None


def _load_lm_eval_task(task: str):
    """An lm-eval task object from a registered name or a task YAML file (offline if its data is cached)."""
    for variable in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # as bltjax.evaluate: fail rather than download
        os.environ.setdefault(variable, "1")
    from lm_eval.tasks import TaskManager  # noqa: PLC0415 - optional extra (`eval`)

    path = pathlib.Path(task)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise TaskBuildError(f"--task: no task YAML {path.absolute()}")
        name = _yaml_task_name(path)
        if not isinstance(name, str):
            raise TaskBuildError(f"{path}: expected a 'task:' name in the YAML (a group cannot be noised as one task)")
        manager = TaskManager(include_path=os.fspath(path.absolute().parent))
    else:
        name, manager = task, TaskManager()
    if name not in manager.all_tasks:
        raise TaskBuildError(f"--task {task!r}: lm-eval knows no task {name!r} (a registered name or a task YAML file)")
    try:
        loaded = manager.load([name])
    except (ConnectionError, FileNotFoundError) as err:  # what `datasets` raises for data it cannot reach
        raise TaskBuildError(
            f"--task {task!r}: its data is not on this machine ({err}); with HF_DATASETS_OFFLINE=1 (the default "
            f"here) lm-eval reads only cached or local data: fetch it once with HF_DATASETS_OFFLINE=0 "
            f"HF_HUB_OFFLINE=0, or pass a task YAML over local files"
        ) from err
    if name in loaded["groups"] or name not in loaded["tasks"]:
        raise TaskBuildError(f"--task {task!r}: {name!r} is a group or tag; name one of its multiple-choice tasks")
    return name, loaded["tasks"][name]


def load_choice_documents(task: str, *, limit: int | None = None) -> tuple[str, list[noise.ChoiceDocument], str]:
    """(task name, documents, target delimiter) of an lm-eval multiple-choice task, rendered as lm-eval
    renders them (after the task's own process_docs and templates), so any such task can be noised."""
    name, loaded = _load_lm_eval_task(task)
    if loaded.OUTPUT_TYPE != "multiple_choice" or loaded.multiple_input:
        raise TaskBuildError(
            f"--task {name!r}: expected a multiple_choice task with one context and several continuations, got "
            f"output_type {loaded.OUTPUT_TYPE!r}{' with several contexts' if loaded.multiple_input else ''}"
        )
    documents = []
    for index, doc in enumerate(loaded.eval_docs):
        if limit is not None and index >= limit:
            break
        context, choices, target = loaded.doc_to_text(doc), list(loaded.doc_to_choice(doc)), loaded.doc_to_target(doc)
        if isinstance(target, str):
            target = choices.index(target) if target in choices else None
        if not isinstance(target, int) or not 0 <= target < len(choices) or not isinstance(context, str):
            raise TaskBuildError(f"task {name!r}, document {index}: expected a text context and the index of one "
                                 f"of its {len(choices)} choices as target, got {target!r}")  # fmt: skip
        documents.append(noise.ChoiceDocument(context, tuple(str(choice) for choice in choices), target))
    return name, documents, loaded.config.target_delimiter


def noise_task(task: str, noises: str | Sequence[str], out: PathLike, *, seed: int = 0, apply_to: str = "both",
               limit: int | None = None) -> dict:  # fmt: skip
    """Noised copies of an lm-eval multiple-choice task (``<name>_<noise>[_<side>]``) and its clean copy
    (``<name>_clean``, the same documents unnoised, for a like-for-like comparison); returns {name: YAML}."""
    names = noise.noise_names(noises)
    if apply_to not in noise.APPLY_TO:
        raise TaskBuildError(f"--apply_to: expected one of {', '.join(noise.APPLY_TO)}, got {apply_to!r}")
    name, documents, delimiter = load_choice_documents(task, limit=limit)
    built = {f"{name}_clean": write_choice_task(out, f"{name}_clean", documents, delimiter)}
    for noise_name in names:
        noised = noise.noise_documents(documents, noise_name, seed, apply_to)
        task_name = noised_task_name(name, noise_name, apply_to)
        built[task_name] = write_choice_task(out, task_name, noised, delimiter)
    return built
