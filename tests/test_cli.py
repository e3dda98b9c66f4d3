"""The command-line entry points, run as a user runs them (in subprocesses)."""

import importlib.util
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
               "--blt_steps=3", "--sample_bytes=16",
               "--corpus=jargon_file_4.4.7_appendix_a.txt,zh_tang_song_poems.jsonl"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in range(1, 7):
        assert f"== {stage}/6" in result.stdout
    bpb = float(re.search(r"BLT validation bpb: +([0-9.]+)", result.stdout).group(1))
    assert 2.0 < bpb < 12.0
    assert (tmp_path / "qs" / "blt" / "checkpoints" / "3").is_dir()
    assert (tmp_path / "qs" / "entropy_model" / "export" / "config.json").is_file()
    assert list((tmp_path / "qs" / "data").glob("*.starts.*.bits"))
    # The greedy samples: the exported entropy model was found next to the run (fingerprint check).
    assert f"entropy model: {tmp_path / 'qs' / 'entropy_model' / 'export'}" in result.stdout
    assert result.stdout.count("=== prompt") == 2 and result.stdout.count("global steps") == 2

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
        (lambda c: setattr(c.patching, "mode", "bpe"), "config.patching.mode"),
        (lambda c: setattr(c.model, "dtype", "float16"), "config.model.dtype"),
    ],
)
def test_inconsistent_configs_name_the_field(edit, field):
    config = _tiny()
    edit(config)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate(config)
