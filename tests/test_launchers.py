"""The launchers: `--dry-run` output against committed snapshots, and the local supervisor's behaviour.

Snapshots live in tests/snapshots/launch/<case>.txt. After an intended change, regenerate them
with `BLTJAX_UPDATE_SNAPSHOTS=1 python -m pytest tests/test_launchers.py` and review the diff.
The local supervisor is exercised with tiny Python commands (no jax), so these tests take seconds.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SNAPSHOTS = REPO / "tests" / "snapshots" / "launch"
TRAIN_1B = ["python", "-m", "bltjax.train", "--config", "experiments/blt_1b.py"]

CASES = {
    "local_2x2": [
        "launch/local.sh", "--processes", "2", "--devices-per-process", "2", "--port", "8476", "--dry-run", "--",
        "python", "-m", "bltjax.train", "--config", "experiments/blt_tiny.py", "--workdir", "runs/mp",
        "--config.data.path=data/bundled",
    ],
    "tpu_vm_v5p_128": [
        "launch/tpu_vm.sh", "--name", "blt-1b", "--zone", "us-east5-a", "--accelerator", "v5p-128", "--spot",
        "--mount", "my-bucket:/mnt/bltjax", "--dry-run", "--", *TRAIN_1B, "--workdir", "/mnt/bltjax/runs/blt-1b",
        "--config.data.path=/mnt/bltjax/data", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
    ],
    "tpu_vm_v5e_no_copy": [
        "launch/tpu_vm.sh", "--name", "small", "--zone", "us-west4-a", "--accelerator", "v5litepod-16",
        "--project", "my-project", "--no-copy", "--retries", "2", "--delete", "--dry-run", "--",
        "python", "-m", "bltjax.eval", "--workdir", "/mnt/runs/x", "--data", "/mnt/data", "--note=it's quoted",
    ],
    "xpk_v5p_128": [
        "launch/xpk.sh", "--cluster", "my-cluster", "--workload", "blt-1b", "--tpu-type", "v5p-128", "--dry-run",
        "--", *TRAIN_1B, "--workdir", "/mnt/bltjax/runs/blt-1b", "--config.data.path=/mnt/bltjax/data",
    ],
    "xpk_two_slices": [
        "launch/xpk.sh", "--cluster", "my-cluster", "--workload", "blt-1b-x2", "--tpu-type", "v5p-128", "--num-slices",
        "2", "--dry-run", "--", *TRAIN_1B, "--workdir", "/mnt/bltjax/runs/blt-1b-x2",
        "--config.data.path=/mnt/bltjax/data",
    ],
    "xpk_image_follow": [
        "launch/xpk.sh", "--cluster", "c", "--workload", "w", "--tpu-type", "v6e-256", "--num-slices", "2",
        "--docker-image", "us-docker.pkg.dev/p/r/bltjax:1", "--project", "p", "--zone", "us-east1-d",
        "--priority", "high", "--follow", "--dry-run", "--", *TRAIN_1B, "--workdir", "/mnt/runs/b",
    ],
    "slurm_per_gpu": [
        "launch/slurm.sbatch", "--dry-run", *TRAIN_1B, "--workdir", "/shared/runs/blt-1b",
        "--config.data.path=/shared/data", "--config.mesh.data=-1", "--config.mesh.fsdp=8",
    ],
    "slurm_per_node": [
        "launch/slurm.sbatch", "--dry-run", "--per-node", "--", *TRAIN_1B, "--workdir", "/shared/runs/blt 1b",
    ],
}  # fmt: skip


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment minus what the launchers read from it, so the output is the same anywhere."""
    drop = ("XLA_FLAGS", "SLURM_", "BLTJAX_", "TPU_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(extra)
    return env


def _bash(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], cwd=REPO, capture_output=True, text=True, timeout=60, **kwargs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_dry_run_matches_the_snapshot(case):
    result = _bash(CASES[case], env=_clean_env())
    assert result.returncode == 0, result.stderr
    snapshot = SNAPSHOTS / f"{case}.txt"
    if os.environ.get("BLTJAX_UPDATE_SNAPSHOTS"):
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        snapshot.write_text(result.stdout)
    assert snapshot.is_file(), f"{snapshot} is missing; create it with BLTJAX_UPDATE_SNAPSHOTS=1"
    assert result.stdout == snapshot.read_text()


def test_dry_run_does_not_depend_on_the_directory_it_is_called_from(tmp_path):
    args = [str(REPO / CASES["tpu_vm_v5p_128"][0]), *CASES["tpu_vm_v5p_128"][1:]]
    result = subprocess.run(["bash", *args], cwd=tmp_path, capture_output=True, text=True, env=_clean_env())
    assert result.stdout == (SNAPSHOTS / "tpu_vm_v5p_128.txt").read_text()


def test_the_printed_remote_command_is_the_given_command():
    args = ["launch/tpu_vm.sh", "--name", "n", "--zone", "z", "--accelerator", "v5p-8", "--no-copy", "--dry-run",
            "--", "python", "-c", "print('a b')", "it's", "$HOME", "--x=1 2"]  # fmt: skip
    line = next(line for line in _bash(args, env=_clean_env()).stdout.splitlines() if "BLTJAX_DISTRIBUTED" in line)
    import shlex

    remote = shlex.split(line)[shlex.split(line).index("--command") + 1]
    user_part = remote.split("BLTJAX_DISTRIBUTED=auto ", 1)[1].split(" 2>&1 | tee", 1)[0]
    assert shlex.split(user_part) == ["python", "-c", "print('a b')", "it's", "$HOME", "--x=1 2"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["launch/tpu_vm.sh", "--zone", "z", "--accelerator", "v5p-8", "--", "true"], "--name is required"),
        (
            ["launch/tpu_vm.sh", "--name", "n", "--zone", "z", "--accelerator", "v9-8", "--", "true"],
            "no default --runtime known",
        ),  # fmt: skip
        (["launch/tpu_vm.sh", "--name", "n", "--zone", "z", "--accelerator", "v5p-8"], "expected the command after --"),
        (["launch/xpk.sh", "--cluster", "c", "--workload", "w", "--", "true"], "--tpu-type is required"),
        (["launch/xpk.sh", "--cluster", "c", "--workload", "w", "--tpu-type", "v5p-8", "--bogus"], "unknown option"),
        (["launch/slurm.sbatch", "--dry-run"], "expected the command"),
        (["launch/slurm.sbatch", "python", "-m", "bltjax.train"], "not inside a SLURM job"),
    ],
)
def test_bad_invocations_say_what_is_wrong(args, message):
    result = _bash(args, env=_clean_env())
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_launchers_set_up_a_python_that_satisfies_python_requires():
    """TPU VM images have python3 3.10: the workers get uv where python3 is older, then launch/venv.sh."""
    tpu_vm = (SNAPSHOTS / "tpu_vm_v5p_128.txt").read_text()
    assert 'sys.version_info < (3, 11))" || python3 -m uv --version' in tpu_vm and "bash launch/venv.sh tpu" in tpu_vm
    assert "bash launch/venv.sh tpu && " in (SNAPSHOTS / "xpk_v5p_128.txt").read_text()  # outside the copied tree
    assert "older than 3.11" in (SNAPSHOTS / "xpk_image_follow.txt").read_text()  # a ready image is checked
    assert "bash launch/venv.sh cuda" in (SNAPSHOTS / "slurm_per_gpu.txt").read_text()


def test_xpk_passes_the_slice_count_to_the_training_command():
    two = (SNAPSHOTS / "xpk_two_slices.txt").read_text()
    assert "--num-slices 2" in two and two.count("--config.mesh.num_slices=2") == 1
    assert "--config.mesh.num_slices" not in (SNAPSHOTS / "xpk_v5p_128.txt").read_text()
    given = ["launch/xpk.sh", "--cluster", "c", "--workload", "w", "--tpu-type", "v5p-8", "--num-slices", "3",
             "--dry-run", "--", "python", "-m", "bltjax.train", "--config.mesh.num_slices=3"]  # fmt: skip
    assert _bash(given, env=_clean_env()).stdout.count("num_slices=3") == 1  # not appended twice
    other = [*given[:-4], "python", "-m", "bltjax.eval", "--workdir", "w"]
    assert "num_slices" not in _bash(other, env=_clean_env()).stdout  # only programs with a mesh config


def _fake_python(path: pathlib.Path, version: str) -> pathlib.Path:
    """An executable that answers launch/venv.sh's version questions as Python ``version`` would."""
    major, minor = version.split(".")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\nexec {sys.executable} -c \"import sys; sys.version_info = ({major}, {minor}, 0); "
                    f"exec(sys.argv[2]) if len(sys.argv) > 2 else None\" \"$@\"\n")  # fmt: skip
    path.chmod(0o755)
    return path


def test_venv_refuses_a_python_older_than_python_requires(tmp_path):
    old = _fake_python(tmp_path / "bin" / "python3.10", "3.10")
    result = _bash(["-c", "source launch/venv.sh ''"], env=_clean_env(BLTJAX_VENV=str(tmp_path / "venv"),
                                                                     BLTJAX_PYTHON=str(old)))  # fmt: skip
    assert result.returncode == 2 and f"BLTJAX_PYTHON={old} is Python 3.10; expected >= 3.11" in result.stderr
    assert not (tmp_path / "venv").exists()

    _fake_python(tmp_path / "venv" / "bin" / "python", "3.10")  # a venv made earlier with the image's python3
    result = _bash(["-c", "source launch/venv.sh ''"], env=_clean_env(BLTJAX_VENV=str(tmp_path / "venv")))
    assert result.returncode == 2 and "has Python 3.10; bltjax needs >= 3.11 (setup.cfg python_requires)" in (
        result.stderr)  # fmt: skip


# --- the local supervisor, with commands that need no jax ---------------------------------------

LOCAL = ["launch/local.sh", "--processes", "2", "--devices-per-process", "3", "--"]


@pytest.mark.slow
def test_local_gives_every_process_its_index_and_devices():
    names = ("BLTJAX_PROCESS_ID", "BLTJAX_NUM_PROCESSES", "JAX_NUM_CPU_DEVICES", "XLA_FLAGS", "BLTJAX_COORDINATOR")
    code = f"import os; print(*[os.environ[n] for n in {names!r}])"
    result = _bash([*LOCAL, sys.executable, "-c", code], env=_clean_env(XLA_FLAGS="--xla_dump_to=/x"))
    assert result.returncode == 0, result.stderr
    out = sorted(result.stdout.splitlines())
    flags = "--xla_dump_to=/x --xla_force_host_platform_device_count=3"
    assert [line.rsplit(":", 1)[0] for line in out] == [f"[0] 0 2 3 {flags} 127.0.0.1", f"[1] 1 2 3 {flags} 127.0.0.1"]
    assert "every process exited with status 0" in result.stderr


@pytest.mark.slow
def test_local_reports_each_failure_and_exits_with_the_first():
    code = "import os, sys, time; i = int(os.environ['BLTJAX_PROCESS_ID']); time.sleep(3 * (1 - i)); sys.exit(3 + i)"
    result = _bash([*LOCAL, sys.executable, "-c", code], env=_clean_env())
    assert result.returncode == 4  # process 1 failed first
    assert "process 1 exited with status 4; waiting up to" in result.stderr
    assert "process 0 exited with status 3" in result.stderr


@pytest.mark.slow
def test_local_terminates_a_process_that_outlives_the_grace_period():
    code = "import os, sys, time; i = int(os.environ['BLTJAX_PROCESS_ID']); time.sleep(60 * (1 - i)); sys.exit(i)"
    start = time.monotonic()
    result = _bash(["launch/local.sh", "--processes", "2", "--devices-per-process", "1", "--grace", "1", "--",
                    sys.executable, "-c", code], env=_clean_env())  # fmt: skip
    assert time.monotonic() - start < 30
    assert result.returncode == 1
    assert "process 0 still runs 1 s after the failure: terminating it" in result.stderr
    assert "process 0 was terminated by the launcher" in result.stderr


@pytest.mark.slow
def test_local_forwards_sigterm_to_every_process():
    code = ("import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
            "print('ready', flush=True)\ntime.sleep(60)")  # fmt: skip
    proc = subprocess.Popen(["bash", *LOCAL, sys.executable, "-c", code], cwd=REPO, env=_clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    ready = 0
    for line in proc.stdout:
        ready += line.endswith("ready\n")
        if ready == 2:
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert "received SIGTERM: sending SIGTERM to every process" in err
    for index in (0, 1):
        assert f"process {index} exited with status 143 (stopped after SIGTERM" in err
