"""The command-line entry points, run as a user runs them (in subprocesses)."""

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from bltjax.config import ConfigError, load_config, validate

REPO = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").glob("*.py"))


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_readme_opens_with_the_two_setup_commands():
    lines = (REPO / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1 : lines.index("```")]
    commands = [line.split("#")[0].strip() for line in block]
    assert commands == ["bash launch/quickstart.sh", "bash tests/run.sh"]
    assert "bash tests/run.sh" in (REPO / ".ci" / "run").read_text()


@pytest.mark.slow
def test_main_job_runs_every_stage_and_resumes(tmp_path):
    """The README's main command itself (shortened by its own flags), then its rerun."""
    env = dict(
        os.environ,
        BLTJAX_VENV=sys.prefix,
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        BLTJAX_COMPILE_CACHE=str(REPO / ".pytest_cache" / "jax_quickstart"),
    )
    command = ["bash", "launch/quickstart.sh", "--workdir", str(tmp_path / "qs"), "--entropy_steps=3",
               "--blt_steps=3", "--sample_bytes=16", "--task_examples=4",
               "--corpus=jargon_file_4.4.7_appendix_a.txt,zh_tang_song_poems.jsonl"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in range(1, 8):
        assert f"== {stage}/7" in result.stdout
    bpb = float(re.search(r"BLT validation bpb: +([0-9.]+)", result.stdout).group(1))
    assert 2.0 < bpb < 12.0
    assert (tmp_path / "qs" / "blt" / "checkpoints" / "3").is_dir()
    assert (tmp_path / "qs" / "entropy_model" / "export" / "config.json").is_file()
    assert list((tmp_path / "qs" / "data").glob("*.starts.*.bits"))
    # The greedy samples: the exported entropy model was found next to the run (fingerprint check).
    assert f"entropy model: {tmp_path / 'qs' / 'entropy_model' / 'export'}" in result.stdout
    assert result.stdout.count("=== prompt") == 2 and result.stdout.count("global steps") == 2
    # Stage 7: both models' accuracies on the built-in tasks (bltjax.tasks), numbers only.
    header = re.search(r"^ +corpus_cloze +corpus_cloze_randomcase +cute_spelling_mc$", result.stdout, re.M)
    assert header, result.stdout[-2000:]
    for model in ("entropy_model", "blt"):
        row = re.search(rf"^   {model} +([0-9.]+) +([0-9.]+) +([0-9.]+)$", result.stdout, re.M)
        assert row and all(0.0 <= float(acc) <= 1.0 for acc in row.groups()), result.stdout[-2000:]
    tasks = json.loads((tmp_path / "qs" / "eval" / "quickstart_tasks.json").read_text())
    assert tasks["examples"] == 4 and tasks["results"]["blt"]["n_samples"]["cute_spelling_mc"] == 4
    # WORKDIR/quickstart.json: the record the README's quickstart time and score are rendered from.
    summary = json.loads((tmp_path / "qs" / "quickstart.json").read_text())
    stages = ["prepare", "entropy model", "export", "sidecars", "BLT", "report", "tasks"]
    assert list(summary["stage_seconds"]) == stages and summary["date"] and summary["machine"]
    assert summary["total_seconds"] == pytest.approx(sum(summary["stage_seconds"].values()), abs=0.5)
    assert abs(float(re.search(r"total (\d+) s", result.stdout).group(1)) - summary["total_seconds"]) <= 1
    assert f"{summary['scores']['blt_bpb']:.4f}" == f"{bpb:.4f}"

    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed" in rerun.stdout and "at step 3" in rerun.stdout
    assert f"BLT validation bpb:           {bpb:.4f}" in rerun.stdout  # the same model, evaluated again


def test_quickstart_reads_its_config_from_the_current_folder_not_the_package(tmp_path, monkeypatch):
    """An installed package has no experiments/ beside it: --config is read from the cwd, or named in the error."""
    from bltjax import quickstart

    monkeypatch.chdir(REPO)
    file = quickstart.resolve_config_file(quickstart.DEFAULT_CONFIG)
    assert file == REPO / "experiments" / "quickstart.py"
    config = quickstart.experiment_config(file, "blt", tmp_path / "data", steps=4)
    assert (config.data.path, config.train.steps, config.patching.mode) == (str(tmp_path / "data"), 4, "entropy")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the package is still imported from the repository
    with pytest.raises(ConfigError, match=r"--config: no experiment file .*experiments/quickstart\.py .*pass --config"):
        quickstart.run(elsewhere / "qs")
    assert not (elsewhere / "qs").exists(), "the flag is checked before any stage runs"
    with pytest.raises(ConfigError, match=r"--config: expected an experiment file without a variant"):
        quickstart.resolve_config_file(f"{file}:blt")
    env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="--xla_force_host_platform_device_count=1")
    command = [sys.executable, "-m", "bltjax.quickstart", "--workdir", "qs"]
    result = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "error: --config: no experiment file" in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_describe_reports_parameter_counts():
    result = _run("bltjax.describe", "--config", "experiments/blt_1b.py")
    assert result.returncode == 0, result.stderr
    assert "| latent | 1,284,608,000 |" in result.stdout


@pytest.mark.slow
def test_bad_override_is_rejected_with_the_field_name():
    result = _run("bltjax.describe", "--config", "experiments/blt_tiny.py", "--config.model.encoder.n_heads=5")
    assert result.returncode != 0
    assert "config.model.encoder.n_heads: expected a divisor of dim=64, got 5" in result.stderr
    result = _run("bltjax.describe", "--config", "experiments/blt_tiny.py", "--config.model.encodr.dim=8")
    assert result.returncode != 0 and "encodr" in result.stderr


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_validates_and_documents_its_command(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for variant in getattr(module, "VARIANTS", [None]):
        config = load_config(f"{path}:{variant}" if variant else str(path))
        validate(config)
    doc = path.read_text().split('"""')[1]
    assert re.search(r"^\s+python -m bltjax\.\w+ --config experiments/" + path.name, doc, flags=re.M)


def _tiny():
    return load_config(str(REPO / "experiments" / "blt_tiny.py"))


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda c: setattr(c.model.decoder, "dim", 96), "config.model.decoder.dim"),
        (lambda c: setattr(c.model.encoder, "n_kv_heads", 3), "config.model.encoder.n_kv_heads"),
        (lambda c: setattr(c.model, "hash_functions", 12), "config.model.hash_functions"),
        (lambda c: setattr(c.model, "pooling", "median"), "config.model.pooling"),
        (lambda c: setattr(c.data, "max_patches", 500), "config.data.max_patches"),
        (
            lambda c: (setattr(c.patching, "mode", "static"), setattr(c.patching, "threshold", 1.0)),
            "config.patching.threshold",
        ),
        (lambda c: setattr(c.patching, "mode", "unigram"), "config.patching.mode"),
        (lambda c: setattr(c.model, "dtype", "float16"), "config.model.dtype"),
    ],
)
def test_inconsistent_configs_name_the_field(edit, field):
    config = _tiny()
    edit(config)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate(config)


# --- one command-line convention (bltjax/runtime/cli.py) ------------------------------------

PROGRAMS = ("train", "eval", "generate", "compile", "flops", "describe", "quickstart", "prepare", "entropy",
            "calibrate", "sweep")  # fmt: skip
OPTIONAL_PROGRAMS = ("export", "bpe", "evaluate")  # added by later work (HF export, the token baseline, lm-eval
# tasks); checked when present
TINY = "experiments/blt_tiny.py"


def _programs() -> list[str]:
    present = [name for name in OPTIONAL_PROGRAMS if (REPO / "bltjax" / f"{name}.py").is_file()]
    return [*PROGRAMS, *present]


def _program(name: str):
    module = importlib.import_module("bltjax.sweep.__main__" if name == "sweep" else f"bltjax.{name}")
    return module.PROGRAM


def test_every_program_module_is_a_cli_program():
    """Every ``python -m bltjax.X`` entry point goes through `cli.Program` (one parser, one error style)."""
    mains = sorted(p.stem for p in (REPO / "bltjax").glob("*.py") if 'if __name__ == "__main__":' in p.read_text())
    assert set(mains) | {"sweep"} == set(_programs()), mains
    for name in _programs():
        assert _program(name).name == f"python -m bltjax.{name}"


def _bad_inputs(tmp: pathlib.Path) -> dict[str, dict[str, list[str] | None]]:
    """Per program: the argv of each kind of bad input (None: the program has no such input)."""
    nodata, nomodel, nofile = str(tmp / "no-data"), str(tmp / "no-model"), str(tmp / "no-config.py")
    return {
        "train": {
            "missing_config": ["--config", nofile, "--workdir", str(tmp / "w")],
            "missing_folder": ["--config", TINY, "--workdir", str(tmp / "w"), f"--config.data.path={nodata}"],
            "bad_value": ["--config", TINY, "--workdir", str(tmp / "w"), "--config.train.steps=abc"],
        },
        "eval": {
            "missing_config": None,
            "missing_folder": ["--model", nomodel, "--data", nodata],
            "bad_value": ["--model", nomodel, "--data", nodata, "--step=abc"],
        },
        "generate": {
            "missing_config": None,
            "missing_folder": ["--model", nomodel, "--prompt", "x"],
            "bad_value": ["--model", nomodel, "--max-bytes=abc"],
        },
        "compile": {
            "missing_config": ["--config", nofile],
            "missing_folder": None,
            "bad_value": ["--config", TINY, "--devices=abc"],
        },
        "flops": {
            "missing_config": ["--config", nofile],
            "missing_folder": None,
            "bad_value": ["--config", TINY, "--patch-size=abc"],
        },
        "describe": {
            "missing_config": ["--config", nofile],
            "missing_folder": None,
            "bad_value": ["--config", TINY, "--config.model.encoder.dim=abc"],
        },
        "quickstart": {
            "missing_config": ["--config", nofile, "--workdir", str(tmp / "qs")],
            "missing_folder": None,
            "bad_value": ["--blt-steps=abc"],
        },
        "prepare": {
            "missing_config": None,
            "missing_folder": ["--input", nodata, "--out", str(tmp / "out")],
            "bad_value": ["--input", nodata, "--out", str(tmp / "out"), "--shard-bytes=abc"],
        },
        "entropy": {
            "missing_config": None,
            "missing_folder": ["--data", nodata, "--entropy-model", nomodel],
            "bad_value": ["--data", nodata, "--entropy-model", nomodel, "--threshold=abc"],
        },
        "bpe": {
            "missing_config": None,
            "missing_folder": ["--data", nodata],
            "bad_value": ["--data", nodata, "--vocab-size=abc"],
        },
        "calibrate": {
            "missing_config": None,
            "missing_folder": ["--data", nodata, "--target-patch-size", "4"],
            "bad_value": ["--data", nodata, "--target-patch-size=abc"],
        },
        "evaluate": {
            "missing_config": None,
            "missing_folder": ["--model", nomodel, "--tasks", "corpus_cloze"],  # a built-in task: the model is read
            "bad_value": ["--model", nomodel, "--tasks", "corpus_cloze", "--limit=abc"],
        },
        "export": {
            "missing_config": None,
            "missing_folder": ["--model", nomodel, "--out", str(tmp / "export")],
            "bad_value": ["--model", nomodel, "--out", str(tmp / "export"), "--step=abc"],
        },
        "sweep": {
            "missing_config": ["plan", "--sweep", nofile, "--out", str(tmp / "sweep")],
            "missing_folder": ["run", str(tmp / "no-sweep")],
            "bad_value": ["plan", "--out", str(tmp / "sweep"), "--patch-sizes", "abc"],
        },
    }


def _cases(tmp: pathlib.Path, name: str) -> dict[str, list[str]]:
    """Every bad input of the issue for program ``name``: unknown flag, unknown config key, and the table's."""
    has_config = _program(name).knows("config.model")
    cases = {
        "unknown_flag": ["--no-such-flag=1"],
        # Programs without a config flag refuse the override as an unknown flag; the others name the key.
        "unknown_config_key": ["--config", TINY, "--config.model.nope=3"] if has_config else ["--config.model.nope=3"],
    }
    if name == "sweep":
        cases = {kind: ["plan", "--out", str(tmp / "s"), *argv] for kind, argv in cases.items()}
    table = _bad_inputs(tmp).get(name, {})
    cases.update({kind: argv for kind, argv in table.items() if argv is not None})
    return cases


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


EXPECTED_MESSAGE = {
    "unknown_flag": "--no-such-flag",
    "unknown_config_key": "nope",
    "missing_config": "no-config.py",
    "missing_folder": "no-",
    "bad_value": "abc",
}


@pytest.mark.parametrize("name", [*PROGRAMS, *OPTIONAL_PROGRAMS])
def test_bad_input_gives_one_error_line_and_no_traceback(name, tmp_path, capsys, monkeypatch):
    """In-process, every program x every bad input: exit status 1 or 2 and one ``error:`` line naming it."""
    if name not in _programs():
        pytest.skip(f"bltjax/{name}.py is not there yet")
    from bltjax.runtime import compile_cache

    monkeypatch.setattr(compile_cache, "enable", lambda *args, **kwargs: None)  # no cache config in this process
    program = _program(name)
    for kind, argv in _cases(tmp_path, name).items():
        capsys.readouterr()
        status = program.run(argv)
        captured = capsys.readouterr()
        assert status in (1, 2), (kind, argv, status, captured.err[-2000:])
        line = _one_error_line(captured.err)
        assert EXPECTED_MESSAGE[kind] in line, (kind, line)
        assert not (tmp_path / "w").exists() and not (tmp_path / "qs").exists(), "refused before writing a run"


@pytest.mark.slow
def test_bad_input_in_a_real_process(tmp_path):
    """The same refusals from ``python -m``, as a user sees them: no traceback, one error line, status 1 or 2."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = []
    for name in _programs():
        cases = _cases(tmp_path, name)
        for kind in ("unknown_config_key", "missing_config", "missing_folder"):
            if kind in cases:
                module = "bltjax.sweep" if name == "sweep" else f"bltjax.{name}"
                command = [sys.executable, "-m", module, *cases[kind]]
                procs.append((name, kind, subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                                           stderr=subprocess.PIPE, text=True)))  # fmt: skip
    for name, kind, proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode in (1, 2), (name, kind, stderr[-2000:])
        assert EXPECTED_MESSAGE[kind] in _one_error_line(stderr), (name, kind)


def test_unknown_config_key_names_the_field_and_the_choices():
    with pytest.raises(Exception) as caught:
        _program("train").parse(["train", "--config", TINY, "--config.model.encodr.dim=8"])
    message = str(caught.value)
    assert message.startswith("--config.model.encodr.dim: config.model has no field 'encodr' (did you mean 'encoder'?)")
    assert "its fields: " in message and "latent" in message


def test_config_errors_are_one_line():
    from bltjax.runtime.cli import CommandLineError

    program = _program("describe")
    with pytest.raises(CommandLineError, match=r"--config\.train\.steps: expected int, got 'x'"):
        program.parse(["describe", "--config", TINY, "--config.train.steps=x"])
    with pytest.raises(CommandLineError, match=r"--config: no such config file nope\.py \(relative paths"):
        program.parse(["describe", "--config", "nope.py", "--config.train.steps=3"])
    with pytest.raises(CommandLineError, match=r"the config file raised .*ConfigError: .*unknown pod variant"):
        program.parse(["describe", "--config", "experiments/blt_1b.py:nosuch"])
    with pytest.raises(CommandLineError, match=r"unknown flag --cofig for python -m bltjax.describe; did you mean"):
        program.parse(["describe", "--cofig", TINY])
    with pytest.raises(CommandLineError, match="unexpected argument 'extra'"):
        program.parse(["describe", "--config", TINY, "extra"])


# One two-word flag per program, and the value both spellings must give it.
TWO_WORD_FLAGS = {
    "train": ("num-processes", "3", "num_processes", 3, ["--config", TINY]),
    "eval": ("batch-size", "4", "batch_size", 4, []),
    "generate": ("max-bytes", "9", "max_bytes", 9, []),
    "compile": ("hbm-gib", "2.5", "hbm_gib", 2.5, []),
    "flops": ("bytes-per-token", "4.4", "bytes_per_token", 4.4, []),
    "describe": ("config.train.eval-every", "7", "config", None, ["--config", TINY]),
    "quickstart": ("blt-steps", "5", "blt_steps", 5, []),
    "prepare": ("val-fraction", "0.5", "val_fraction", 0.5, []),
    "entropy": ("target-patch-size", "4.5", "target_patch_size", 4.5, []),
    "calibrate": ("max-tokens", "10", "max_tokens", 10, []),
    "sweep": ("patch-sizes", "6", "patch_sizes", [6.0], ["plan"]),
    "export": ("shard-size", "7GB", "shard_size", "7GB", []),
    "bpe": ("vocab-size", "512", "vocab_size", 512, []),
    "evaluate": ("num-fewshot", "3", "num_fewshot", 3, []),
}


@pytest.mark.parametrize("name", [*PROGRAMS, *OPTIONAL_PROGRAMS])
def test_both_spellings_of_a_two_word_flag(name):
    if name not in _programs():
        pytest.skip(f"bltjax/{name}.py is not there yet")
    dashed, value, attribute, expected, extra = TWO_WORD_FLAGS[name]
    program = _program(name)
    for spelling in (dashed, dashed.replace("-", "_")):
        for argv in ([f"--{spelling}={value}"], [f"--{spelling}", value]):
            parsed = program.parse([name, *extra, *argv]).flags
            if name == "describe":
                assert parsed.config.train.eval_every == 7
            else:
                assert getattr(parsed, attribute) == expected, (spelling, argv)


def test_booleans_take_every_spelling():
    program = _program("prepare")
    for flag in ("--no-progress", "--no_progress", "--noprogress"):
        assert program.parse(["prepare", flag]).flags.progress is False
    assert program.parse(["prepare", "--progress"]).flags.progress is True
    sweep = _program("sweep")
    assert sweep.parse(["sweep", "run", "x", "--keep-going"]).flags.keep_going is True


def test_values_are_never_rewritten():
    """Prompt text that looks like a flag, even one of the program's own, reaches the program as typed."""
    generate = _program("generate")
    argv = ["generate", "--model", "m", "--prompt", "--max-bytes", "--prompt=--x-y", "--prompt", "--foo_bar-baz",
            "--max-bytes", "3"]  # fmt: skip
    parsed = generate.parse(argv).flags
    assert parsed.prompt == ["--max-bytes", "--x-y", "--foo_bar-baz"] and parsed.max_bytes == 3
    sweep = _program("sweep")
    line = sweep.parse(["sweep", "run", "x", "--print-commands", "--", "--max-bytes", "--a-b=c_d", "--"])
    assert line.after_dashes == ["--max-bytes", "--a-b=c_d", "--"] and line.args == ["run", "x"]
    # A multi-word flag takes the words up to the next flag.
    prepare = _program("prepare").parse(["prepare", "--input", "a b", "c-d", "--out", "o"]).flags
    assert prepare.input == ["a b", "c-d"] and prepare.out == "o"


def test_old_names_still_work_with_a_note(capsys):
    import io

    cases = [
        ("generate", ["--workdir", "runs/x"], "model", "runs/x"),
        ("eval", ["--workdir=runs/x"], "model", "runs/x"),
        ("entropy", ["--checkpoint", "m"], "entropy_model", "m"),
        ("prepare", ["--output", "d"], "out", "d"),
        ("calibrate", ["--json", "r.json"], "out", "r.json"),
    ]
    for name, argv, attribute, expected in cases:
        note = io.StringIO()
        parsed = _program(name).parse([name, *argv], warn=note).flags
        assert getattr(parsed, attribute) == expected
        old = argv[0].split("=")[0]
        assert note.getvalue() == (f"warning: python -m bltjax.{name}: {old} is deprecated and goes away in the next "
                                   f"release; use --{attribute}\n")  # fmt: skip
    from bltjax.runtime.cli import CommandLineError

    with pytest.raises(CommandLineError, match="--workdir is the old name of --model; give only one of them"):
        _program("generate").parse(["generate", "--model", "a", "--workdir", "b"], warn=io.StringIO())


def test_sweep_flags_belong_to_their_sub_command(capsys):
    sweep = _program("sweep")
    assert sweep.run(["plan", "--out", "x", "--only", "a"]) == 2
    assert "error: --only is a flag of 'sweep run', not of 'sweep plan'" in capsys.readouterr().err
    assert sweep.run(["frobnicate"]) == 2
    assert "expected a sub-command" in capsys.readouterr().err


def _documented_commands() -> list[tuple[str, str, str]]:
    """(file, program, command text) of every ``python -m bltjax.X`` in the README, docs/, the experiment files,
    launch/ and the package's own docstrings and messages (continuation lines joined)."""
    found = []
    launch = sorted(p for p in (REPO / "launch").iterdir() if p.is_file())
    sources = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *EXPERIMENTS, *launch,
               *sorted((REPO / "bltjax").rglob("*.py"))]  # fmt: skip
    for path in sources:
        text = path.read_text().replace("\\\n", " ")
        for match in re.finditer(r"python -m bltjax\.(\w+)([^\n`#|]*)", text):
            found.append((str(path.relative_to(REPO)), match.group(1), match.group(2)))
    return found


def test_documented_commands_use_only_flags_the_programs_define():
    """Every --flag of a documented command is a current flag of that program (no deprecated names)."""
    commands = _documented_commands()
    assert len(commands) > 20
    bad = []
    for file, name, command in commands:
        if name not in _programs():
            continue
        program = _program(name)
        for flag in re.findall(r"(?<![\w-])--?([A-Za-z][\w.-]*)", command.split(" -- ")[0]):
            if not program.knows(flag):
                bad.append(f"{file}: python -m bltjax.{name} ... --{flag}")
    assert not bad, "\n".join(bad)
