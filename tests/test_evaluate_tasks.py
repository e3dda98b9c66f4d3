"""``python -m bltjax.evaluate`` and lm-eval's own command line with ``--model bltjax``, offline.

Models: a copy of the tiny Hugging Face BLT fixture (its results land beside it), and the tiny
byte LM run of tests/test_watch.py (trained once per session) for a workdir's JSON path and
TensorBoard scalars. Tasks: a local YAML multiple-choice task and bltjax's built-in tasks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")

from test_watch import byte_lm_run_config, write_choice_task  # noqa: E402

from bltjax import evaluate  # noqa: E402
from bltjax.inference.task_runner import TaskError, parse_task_list, run_tasks  # noqa: E402
from bltjax.training.metrics import read_jsonl  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def hf_copy(fixtures_dir, tmp_path):
    folder = tmp_path / "hf_blt"
    shutil.copytree(fixtures_dir / "hf_blt_tiny_b", folder)
    return folder


@pytest.mark.slow
def test_evaluate_command_runs_a_local_yaml_task_and_writes_json(hf_copy, tmp_path, capsys):
    yaml = write_choice_task(tmp_path / "task")
    assert evaluate.main(["--model", str(hf_copy), "--tasks", str(yaml), "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    written = hf_copy / "eval" / "tasks.json"  # a model folder's results go beside it, as bltjax.eval's do
    assert f"written: {written}" in out and "| bltjax_test_choice | acc |" in out
    result = json.loads(written.read_text())
    assert result["model"] == str(hf_copy) and result["step"] is None and result["model_type"] == "blt"
    assert result["n_samples"] == {"bltjax_test_choice": 3}
    assert result["settings"]["batch_size"] == 4 and result["settings"]["max_length"] == 128
    # The same numbers as the Python API (which the quickstart calls), and --out wins over the default.
    direct = run_tasks(hf_copy, [str(yaml)], batch_size=4)
    assert direct["tasks"] == result["tasks"] and result["tasks"]["bltjax_test_choice"]["acc"] in (0, 1 / 3, 2 / 3, 1)
    out_file = tmp_path / "scores.json"
    assert evaluate.main(["--model", str(hf_copy), "--tasks", str(yaml.parent), "--limit", "2", "--out",
                          str(out_file)]) == 0  # fmt: skip
    assert json.loads(out_file.read_text())["n_samples"] == {"bltjax_test_choice": 2}


def test_bad_task_entries_fail_before_the_model_loads(hf_copy, tmp_path, capsys):
    assert parse_task_list(" a, ,b ") == ["a", "b"]
    with pytest.raises(TaskError, match="give at least one task"):
        parse_task_list(" , ")
    assert evaluate.main(["--model", str(tmp_path / "nowhere"), "--tasks", "no_such_task_xyz"]) == 1
    err = capsys.readouterr().err
    assert "--tasks: 'no_such_task_xyz' is no task lm-eval knows" in err  # the typo, not the missing model
    (tmp_path / "empty").mkdir()
    assert evaluate.main(["--model", str(hf_copy), "--tasks", str(tmp_path / "empty")]) == 1
    assert "holds no task YAML" in capsys.readouterr().err
    assert evaluate.main(["--model", str(hf_copy)]) == 2  # a bad command line
    assert "--tasks" in capsys.readouterr().err
    assert evaluate.main(["--model", str(hf_copy), "--tasks", str(write_choice_task(tmp_path / "t")), "--watch"]) == 1
    assert "is a model folder, which holds one model; expected a training workdir" in capsys.readouterr().err


@pytest.mark.slow
def test_builtin_tasks_run_by_name(hf_copy):
    """bltjax's own tasks (bltjax.tasks) are built on the fly: a multiple-choice one and a generated one."""
    result = run_tasks(hf_copy, "cute_spelling_mc,cute_spelling", limit=2, batch_size=4)
    assert result["n_samples"] == {"cute_spelling": 2, "cute_spelling_mc": 2}
    assert 0 <= result["tasks"]["cute_spelling_mc"]["acc"] <= 1
    assert 0 <= result["tasks"]["cute_spelling"]["exact_match"] <= 1


def test_lm_eval_finds_the_registered_model_by_name(fixtures_dir, tmp_path):
    import lm_eval

    from bltjax.inference import harness  # registers "bltjax"

    assert os.environ["HF_DATASETS_OFFLINE"] == "1" and os.environ["HF_HUB_OFFLINE"] == "1"
    yaml = write_choice_task(tmp_path / "task")
    raw = lm_eval.simple_evaluate(model=harness.MODEL_NAME, model_args=f"path={fixtures_dir / 'hf_blt_tiny_b'},"
                                  "batch_size=2,max_length=64", tasks=[str(yaml)], bootstrap_iters=0)  # fmt: skip
    assert raw["results"]["bltjax_test_choice"]["acc,none"] in (0, 1 / 3, 2 / 3, 1)


@pytest.mark.slow
def test_a_workdir_gets_step_json_and_tensorboard_scalars(trained_run, corpus_data, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    workdir = tmp_path / "run"
    shutil.copytree(trained_run(byte_lm_run_config(corpus_data)).workdir, workdir)
    yaml = write_choice_task(tmp_path / "task")
    assert evaluate.main(["--model", str(workdir), "--tasks", str(yaml), "--step", "2"]) == 0
    result = json.loads((workdir / "eval" / "tasks-step2.json").read_text())
    assert result["step"] == 2 and result["model_type"] == "byte_lm"
    events = EventAccumulator(str(workdir / "tensorboard" / "tasks"))
    events.Reload()
    (scalar,) = events.Scalars("bltjax_test_choice/acc")
    assert scalar.step == 2 and scalar.value == pytest.approx(result["tasks"]["bltjax_test_choice"]["acc"])
    (line,) = [r for r in read_jsonl(workdir / "metrics.jsonl") if r["split"] == "tasks"]
    assert line["step"] == 2 and line["bltjax_test_choice/acc"] == scalar.value


@pytest.mark.slow
def test_lm_eval_command_line_runs_with_model_bltjax(fixtures_dir, tmp_path):
    """The README's lm-eval command: lm-eval's own CLI, with the model registered, in a fresh process."""
    yaml = write_choice_task(tmp_path / "task")
    # batch_size is lm-eval's own flag there: its command line always passes one (default 1) to the model.
    command = [sys.executable, "-m", "bltjax.inference.harness", "run", "--model", "bltjax", "--model_args",
               f"path={fixtures_dir / 'hf_blt_tiny_b'},max_length=64", "--batch_size", "4",
               "--tasks", "bltjax_test_choice", "--include_path", str(yaml.parent),
               "--output_path", str(tmp_path / "out")]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}  # the module sets the offline variables
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bltjax_test_choice" in done.stdout and "acc" in done.stdout
    (written,) = (tmp_path / "out").rglob("results_*.json")
    assert "bltjax_test_choice" in json.loads(written.read_text())["results"]
