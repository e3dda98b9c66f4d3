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
    "xpk_image_follow": [
        "launch/xpk.sh", "--cluster", "c", "--workload", "w", "--tpu-type", "v6e-256", "--num-slices", "2",
        "--docker-image", "us-docker.pkg.dev/p/r/bltjax:1", "--project", "p", "--zone", "us-east1-d",
        "--priority", "high", "--follow", "--dry-run", "--", *TRAIN_1B, "--workdir", "/mnt/runs/b",
    ],
    "slurm_per_gpu": [
        "launch/slurm.sbatch", "--dry-run", *TRAIN_1B, "--workdir", "/shared/runs/blt-1b",
        "--config.data.path=/shared/data", "--config.mesh.fsdp=8",
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
