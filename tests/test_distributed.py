"""Multi-process runs on this machine: 2 processes x 2 fake CPU devices against 1 process x 4.

The processes are started by `launch/local.sh`, exactly as a user does, and join through jax's
coordination service on 127.0.0.1 (CPU collectives over gloo). The joining rules themselves
(`distributed.plan_join`) are checked without starting anything.
"""

from __future__ import annotations

import io
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import test_trainer

from bltjax.config import load_config
from bltjax.inference.evaluate import evaluate_and_write
from bltjax.runtime import distributed
from bltjax.runtime.cli import normalise_argv
from bltjax.training.metrics import read_jsonl
from bltjax.training.trainer import train

REPO = pathlib.Path(__file__).resolve().parents[1]
CORPUS = REPO / "bltjax" / "data" / "corpus"
TINY = str(REPO / "experiments" / "blt_tiny.py")
LOCAL = str(REPO / "launch" / "local.sh")
# The smallest useful run: 4 steps, a validation at the end, a checkpoint at the end; the state
# sharded over all 4 devices (fsdp), so both processes hold, and save, shards of it.
# tests/test_aot.py compiles the same program: the persistent cache serves both.
OVERRIDES = {**test_trainer.OVERRIDES, "mesh.data": 1, "mesh.fsdp": 4, "train.steps": 4}


@pytest.fixture(scope="module")
def data_dir(corpus_data) -> pathlib.Path:
    return corpus_data  # conftest's session folder, the one the training tests read


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["BLTJAX_COMPILE_CACHE"] = jax.config.jax_compilation_cache_dir  # the suite's cache
    env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"  # as conftest sets in process
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _train_cli(workdir: pathlib.Path, data: pathlib.Path) -> list[str]:
    args = [sys.executable, "-m", "bltjax.train", "--config", TINY, "--workdir", str(workdir)]
    return args + [f"--config.{k}={v}" for k, v in OVERRIDES.items()] + [f"--config.data.path={data}"]


def _records(workdir: pathlib.Path, split: str) -> dict[int, dict]:
    return {r["step"]: r for r in read_jsonl(workdir / "metrics.jsonl") if r["split"] == split}


@pytest.mark.slow
def test_two_processes_train_like_one_and_their_checkpoint_evaluates_on_one(data_dir, tmp_path):
    config = load_config(TINY)
    config.data.path = str(data_dir)
    for name, value in OVERRIDES.items():
        section, key = name.split(".")
        config[section][key] = value
    one = tmp_path / "one"
    train(config, one, console=io.StringIO(), devices=jax.devices()[:4])

    two = tmp_path / "two"
    command = ["bash", LOCAL, "--processes", "2", "--devices-per-process", "2", "--heartbeat-timeout", "30", "--",
               *_train_cli(two, data_dir)]  # fmt: skip
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[0] topology: 2 processes x 2 cpu devices = 4 cpu devices; joined via env" in result.stdout
    assert "every process exited with status 0" in result.stderr
    assert not re.search(r"^\[1\] (step|checkpoint|started)", result.stdout, re.M), "process 1 must stay quiet"

    a, b = _records(one, "train"), _records(two, "train")
    assert sorted(b) == [1, 2, 3, 4], "process 0 writes each step once; process 1 writes nothing"
    np.testing.assert_allclose([b[s]["loss"] for s in range(1, 5)], [a[s]["loss"] for s in range(1, 5)], rtol=2e-5)
    assert _records(two, "validation")[4]["bpb"] == pytest.approx(_records(one, "validation")[4]["bpb"], rel=2e-5)
    step_dir = two / "checkpoints" / "4"
    # Every process wrote its own shards of the state and its own data position.
    assert {p.name for p in (step_dir / "state").glob("ocdbt.process_*")} == {"ocdbt.process_0", "ocdbt.process_1"}
    assert {p.name for p in (step_dir / "data").iterdir()} >= {"process_0-of-2.json", "process_1-of-2.json"}

    # One process (4 devices here) restores the 2-process checkpoint: same bits per byte.
    kwargs = dict(model_dir=None, data_dir=data_dir, devices=jax.devices()[:4])
    from_two, _ = evaluate_and_write(workdir=two, out=tmp_path / "two.json", **kwargs)
    from_one, _ = evaluate_and_write(workdir=one, out=tmp_path / "one.json", **kwargs)
    assert from_two.step == from_one.step == 4
    assert from_two.n_targets == from_one.n_targets > 0
    assert from_two.bpb == pytest.approx(from_one.bpb, rel=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_killing_one_process_stops_the_other_with_a_clear_error(data_dir, tmp_path, victim):
    heartbeat = 5
    command = ["bash", LOCAL, "--processes", "2", "--devices-per-process", "2", "--heartbeat-timeout",
               str(heartbeat), "--grace", "120", "--", *_train_cli(tmp_path / "run", data_dir)]  # fmt: skip
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    pids: dict[int, int] = {}
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        lines.append(line)
        if match := re.search(r"\(0: pid (\d+), 1: pid (\d+)\)", line):
            pids = {0: int(match.group(1)), 1: int(match.group(2))}
        if line.startswith("[0] topology:") or time.monotonic() > deadline:
            break  # both processes have joined
    assert pids and lines[-1].startswith("[0] topology:"), "".join(lines)[-3000:]
    os.kill(pids[victim], signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        rest, _ = proc.communicate(timeout=heartbeat + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
    waited = time.monotonic() - killed_at
    output = "".join(lines) + rest
    survivor = 1 - victim
    assert proc.returncode != 0
    assert waited < heartbeat + 45, f"the survivor took {waited:.0f} s to stop"
    assert f"process {victim} was killed by SIGKILL" in output
    # It stopped by itself (not terminated by the launcher), with jax's fatal-error message.
    assert f"process {survivor} was terminated by the launcher" not in output, output[-3000:]
    assert re.search(rf"process {survivor} (was killed by SIGABRT|exited with status [1-9])", output), output[-3000:]
    assert re.search(r"another task died|unhealthy|Connection reset by peer|Connection closed by peer", output)


@pytest.mark.slow
def test_sigterm_to_one_process_makes_every_process_save_the_same_step(data_dir, tmp_path):
    """docs/launching.md, Pre-emption: the processes agree on a stop every step, so a SIGTERM that
    reaches only process 1 still gives one complete checkpoint, written by both, and status 143 twice."""
    steps = 200
    workdir = tmp_path / "run"
    cli = [arg for arg in _train_cli(workdir, data_dir) if not arg.startswith("--config.train.steps=")]
    command = ["bash", LOCAL, "--processes", "2", "--devices-per-process", "2", "--heartbeat-timeout", "30",
               "--grace", "120", "--", *cli, f"--config.train.steps={steps}"]  # fmt: skip
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    pids: dict[int, int] = {}
    deadline = time.monotonic() + 600
    for line in proc.stdout:
        lines.append(line)
        if match := re.search(r"\(0: pid (\d+), 1: pid (\d+)\)", line):
            pids = {0: int(match.group(1)), 1: int(match.group(2))}
        if (line.startswith("[0] step") and f"/{steps}" in line) or time.monotonic() > deadline:
            break  # training has started on both
    assert pids and lines[-1].startswith("[0] step"), "".join(lines)[-3000:]
    os.kill(pids[1], signal.SIGTERM)
    try:
        rest, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines) + rest
    assert re.search(r"process 0 exited with status 143", output), output[-3000:]
    assert re.search(r"process 1 exited with status 143", output), output[-3000:]
    saved = int(output.split("pre-empted: saved step ")[1].split(";")[0])
    assert 1 <= saved < steps
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [str(saved)]
    assert test_trainer._complete(workdir / "checkpoints" / str(saved))
    assert {p.name for p in (workdir / "checkpoints" / str(saved) / "data").iterdir()} >= {
        "process_0-of-2.json",
        "process_1-of-2.json",
    }


# --- deciding how to join (no processes started) --------------------------------------------


def test_flags_win_over_the_environment():
    env = {"BLTJAX_COORDINATOR": "h:1", "BLTJAX_NUM_PROCESSES": "4", "BLTJAX_PROCESS_ID": "3"}
    plan = distributed.plan_join("10.0.0.1:8476", 2, 1, environ=env)
    assert (plan.method, plan.coordinator, plan.num_processes, plan.process_id) == ("flags", "10.0.0.1:8476", 2, 1)
    plan = distributed.plan_join(environ=env)
    assert (plan.method, plan.coordinator, plan.num_processes, plan.process_id) == ("env", "h:1", 4, 3)


@pytest.mark.parametrize(
    "env, method",
    [
        ({}, "single"),
        ({"BLTJAX_DISTRIBUTED": "auto"}, "cluster"),
        ({"BLTJAX_DISTRIBUTED": "off", "SLURM_NTASKS": "8", "SLURM_PROCID": "1", "SLURM_STEP_NODELIST": "n"}, "single"),
        ({"SLURM_NTASKS": "8", "SLURM_PROCID": "1", "SLURM_STEP_NODELIST": "n[1-2]"}, "slurm"),
        ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "n1"}, "single"),
        ({"SLURM_NTASKS": "8", "SLURM_JOB_ID": "5"}, "single"),  # the batch script itself, outside srun
        ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, "cluster"),
        ({"TPU_WORKER_HOSTNAMES": "w0"}, "single"),
    ],
)
def test_the_environment_decides_how_to_join(env, method):
    assert distributed.plan_join(environ=env).method == method


def test_timeouts_come_from_the_environment():
    plan = distributed.plan_join(environ={"BLTJAX_HEARTBEAT_TIMEOUT": "7", "BLTJAX_INIT_TIMEOUT": "9"})
    assert (plan.heartbeat_timeout_s, plan.init_timeout_s) == (7, 9)
    assert distributed.plan_join(environ={}).heartbeat_timeout_s == distributed.DEFAULT_HEARTBEAT_S


@pytest.mark.parametrize(
    "args, env, message",
    [
        (("h:1", None, None), {}, r"--coordinator given without --num-processes, --process-id"),
        (("h:1", 2, 2), {}, r"--process-id: expected an integer in \[0, --num-processes=2\), got 2"),
        (("h", 2, 0), {}, r"--coordinator: expected HOST:PORT of process 0, got 'h'"),
        ((None, None, None), {"BLTJAX_NUM_PROCESSES": "2"}, r"BLTJAX_NUM_PROCESSES given without BLTJAX_COORDINATOR"),
        (
            (None, None, None),
            {"BLTJAX_COORDINATOR": "h:1", "BLTJAX_NUM_PROCESSES": "two", "BLTJAX_PROCESS_ID": "0"},
            r"BLTJAX_NUM_PROCESSES: expected a positive integer, got 'two'",
        ),  # fmt: skip
        ((None, None, None), {"BLTJAX_DISTRIBUTED": "yes"}, r"BLTJAX_DISTRIBUTED: expected one of \['auto', 'off'\]"),
        ((None, None, None), {"BLTJAX_HEARTBEAT_TIMEOUT": "0"}, r"BLTJAX_HEARTBEAT_TIMEOUT: expected a positive"),
    ],
)
def test_bad_settings_are_refused_with_the_name(args, env, message):
    with pytest.raises(distributed.DistributedError, match=message):
        distributed.plan_join(*args, environ=env)


def test_one_process_has_nothing_to_join():
    assert distributed.plan_join("h:1", 1, 0, environ={}).method == "single"
    topology = distributed.initialize(environ={})
    assert (topology.process_count, topology.global_devices, topology.method) == (1, 8, "single")
    assert topology.summary() == "topology: 1 process x 8 cpu devices = 8 cpu devices"
    assert distributed.primary_console(io.StringIO()) is not None and distributed.is_primary()


def test_an_unreachable_coordinator_is_a_clear_error():
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    plan = distributed.JoinPlan("env", f"127.0.0.1:{port}", 2, 1, init_timeout_s=1)
    start = time.monotonic()
    with pytest.raises(distributed.DistributedError, match=rf"process 1/2: nothing answered at the coordinator "
                       rf"127.0.0.1:{port} within 1 s.*start process 0"):  # fmt: skip
        distributed._wait_for_coordinator(plan)
    assert time.monotonic() - start < 10


def test_dashed_flag_names_are_accepted():
    from absl import flags

    values = flags.FlagValues()
    distributed.define_flags(values)
    argv = ["prog", "--num-processes=2", "--process-id", "1", "--config.data.path=a-b", "--coordinator=h:1"]
    assert normalise_argv(argv, values) == ([
        "prog", "--num_processes=2", "--process_id", "1", "--config.data.path=a-b", "--coordinator=h:1"
    ], [])  # fmt: skip
    values(normalise_argv(argv, values)[0][:2] + ["--process_id=1", "--coordinator=h:1"])
    assert (values.num_processes, values.process_id, values.coordinator) == (2, 1, "h:1")
