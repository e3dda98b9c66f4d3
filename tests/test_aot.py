"""Ahead-of-time compilation for a target topology: the target table, the memory report, early failures."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest
import test_distributed
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bltjax.config import load_config
from bltjax.models.factory import parameter_shapes
from bltjax.models.hash_embed import _lookup_sum
from bltjax.runtime import aot
from bltjax.training.sharding import MeshError

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "experiments" / "blt_tiny.py")
GIB = 1 << 30


# The program of tests/test_distributed.py (same config): the persistent cache compiles it once.
OVERRIDES = test_distributed.OVERRIDES


def tiny(batch_size: int = 8, **mesh: int):
    config = load_config(TINY)
    for name, value in OVERRIDES.items():
        section, key = name.split(".")
        config[section][key] = value
    config.data.batch_size = batch_size
    config.mesh.update({"data": -1, "fsdp": 1, "tensor": 1, **mesh})
    return config


@pytest.mark.parametrize(
    "name, slices, devices, hbm_gib, layout",
    [
        ("v5p-128", 1, 64, 95, "v5p:4x4x4"),
        ("v5p-128", 2, 128, 95, "v5p:4x4x4"),
        ("v4-8", 1, 4, 32, "v4:2x2x1"),
        ("v5litepod-16", 1, 16, 16, "v5e:4x4"),
        ("v5e-256", 1, 256, 16, "v5e:16x16"),
        ("v6e-8", 1, 8, 32, "v6e:2x4"),
        ("v5p:4x4x8", 1, 128, 95, "v5p:4x4x8"),
        ("h100-32", 1, 32, 80, None),
        ("h200-32", 1, 32, 141, None),
    ],
)
def test_targets_map_to_devices_and_memory(name, slices, devices, hbm_gib, layout):
    target = aot.parse_topology(name, slices)
    assert (target.devices, target.hbm_bytes, target.tpu_layout) == (devices, hbm_gib * GIB, layout)
    assert target.platform == ("gpu" if name.startswith("h") else "tpu")


@pytest.mark.parametrize(
    "name, message",
    [
        ("v7x-8", "unknown target 'v7x-8'; expected one of a100-N"),
        ("v5p-127", "a multiple of 2"),
        ("v5p-6", r"no standard v5p layout for 3 chips .* e\.g\. v5p:2x2x1"),
        ("v5p:4x4", "v5p layouts have 3 dimensions"),
        ("h100:2x2", "an explicit layout is for TPUs"),
    ],
)
def test_unknown_or_odd_targets_are_refused(name, message):
    with pytest.raises(aot.CompileError, match=message):
        aot.parse_topology(name)


def test_backend_choice():
    assert aot.choose_backend(aot.parse_topology("h100-8")) == "cpu"
    assert aot.choose_backend(aot.device_count_target(8, None)) == "cpu"
    assert aot.choose_backend(aot.parse_topology("v5p-8"), "cpu") == "cpu"
    with pytest.raises(aot.CompileError, match="--backend tpu: h100-8 is not a TPU target"):
        aot.choose_backend(aot.parse_topology("h100-8"), "tpu")
    if not aot.libtpu_available():
        assert aot.choose_backend(aot.parse_topology("v5p-8")) == "cpu"
        with pytest.raises(aot.CompileError, match="needs the libtpu package"):
            aot.choose_backend(aot.parse_topology("v5p-8"), "tpu")


@pytest.mark.slow
def test_compiled_step_reports_per_device_memory_and_refuses_what_does_not_fit():
    devices = jax.devices()[:4]
    config = tiny(data=1, fsdp=4)
    report = aot.compile_train_step(config, devices, target="4 devices", backend="cpu", hbm_bytes=16 * GIB)
    assert report.devices == 4 and report.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
    assert report.state_bytes == aot.plan_step(config, devices).state_bytes
    assert report.argument_bytes >= report.state_bytes
    assert report.alias_bytes >= report.state_bytes  # the donated state becomes the new state
    assert report.temp_bytes > 0
    assert report.fits and report.limit_bytes == int(16 * GIB * aot.DEFAULT_HBM_FRACTION)
    assert "peak estimate" in report.table() and "fits:" in report.table()
    # What is live at the peak, by the jax op that made it, and a roofline without peak figures for cpu.
    breakdown = report.breakdown
    assert breakdown is not None and breakdown.peak_live_bytes > report.state_bytes
    assert {"train state", "latent transformer", "local encoder", "local decoder"} <= set(breakdown.by_kind())
    assert all(b.op_name.startswith("jit(train_step)") for b in breakdown.temporaries()[:10])
    assert "largest 10 temporaries at the peak:" in report.table()
    assert report.roofline.flops_per_device > 0 and report.roofline.bytes_per_device > 0
    assert "no peak figures for this target (cpu)" in report.table()
    assert report.to_json()["breakdown"]["top_temporaries"][0]["bytes"] == breakdown.temporaries()[0].bytes

    tight = dataclasses.replace(report, limit_bytes=report.peak_bytes - 1)
    with pytest.raises(aot.OutOfMemoryError, match=r"4 devices \(4 devices, mesh .*\): the compiled train step needs "
                       r"about .* per device .* more than the limit .* Shard more \(config\.mesh\.fsdp"):  # fmt: skip
        aot.check_fits(tight, config)


def test_the_state_per_device_follows_the_mesh():
    params = sum(x.size for x in jax.tree.leaves(parameter_shapes(tiny())))
    replicated = aot.plan_step(tiny(), jax.devices()[:4]).state_bytes  # data parallel: all of it everywhere
    assert 3 * 4 * params <= replicated < 3 * 4 * params + 4096  # params + 2 Adam moments, float32
    sharded = aot.plan_step(tiny(data=1, fsdp=4), jax.devices()[:4]).state_bytes
    assert replicated / 4 <= sharded < replicated / 3  # a quarter, plus what 4 does not divide


def test_a_state_larger_than_the_memory_fails_before_compiling():
    start = time.monotonic()
    with pytest.raises(aot.OutOfMemoryError, match=r"the train state alone needs .* MiB per device, more than the "
                       r"limit .* found before compiling"):  # fmt: skip
        aot.compile_train_step(tiny(), jax.devices()[:4], target="t", backend="cpu", hbm_bytes=1 << 20)
    assert time.monotonic() - start < 20


@pytest.mark.parametrize(
    "batch, mesh, message",
    [
        (4, {}, r"config\.data\.batch_size: 4 rows .* not divisible by the 8 batch shards"),
        (8, {"fsdp": 3}, r"config\.mesh: the fixed axes \(3 devices\) do not divide 8 devices"),
    ],
)
def test_sharding_mistakes_fail_at_once(batch, mesh, message):
    config = tiny(batch)
    for axis, size in mesh.items():
        config.mesh[axis] = size
    with pytest.raises(MeshError, match=message):
        aot.compile_train_step(config, jax.devices(), target="8 devices", backend="cpu")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["BLTJAX_COMPILE_CACHE"] = jax.config.jax_compilation_cache_dir
    env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"  # as in process: the same program, one compilation
    overrides = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    command = [sys.executable, "-m", "bltjax.compile", "--config", TINY, *overrides, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)


@pytest.mark.slow
def test_cli_compiles_for_a_topology_on_fake_cpu_devices(tmp_path):
    out = tmp_path / "report.json"
    result = _cli("--topology", "v5p-8", "--backend", "cpu", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train step compiled for v5p-8 (4 devices, cpu compiler)" in result.stdout
    assert "fake CPU devices: memory is an estimate" in result.stdout
    report = json.loads(out.read_text())
    assert report["fits"] and report["devices"] == 4 and report["limit_bytes"] == int(95 * GIB * 0.9)
    assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert report["breakdown"]["top_temporaries"] and "largest 10 temporaries at the peak" in result.stdout
    roof = report["roofline"]
    assert roof["chip"]["bf16_flops"] == 459e12 and roof["step_seconds"] > 0 and 0 < roof["mfu"] < 1
    assert "estimated MFU" in result.stdout and "on TPU v5p (459 TFLOP/s bf16" in result.stdout
    # The JSON carries the printout and where it was made, so docs render the report from it (benchmarks/tables.py).
    assert report["table"] in result.stdout and report["table"].startswith("train step compiled for v5p-8")
    assert report["date"] and report["machine"] and report["versions"]["jax"] == jax.__version__
    assert report["command"].startswith("python -m bltjax.compile --config ") and report["command"].endswith(str(out))


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--devices", "4", "--hbm-gib", "0.001"], "found before compiling"),
        (["--topology", "v5p-16", "--config.mesh.fsdp=-1"], "not divisible by the 8 batch shards"),
    ],
)
def test_cli_fails_early_with_the_reason(args, message):
    result = _cli("--backend", "cpu", *args, "--config.data.batch_size=4")
    assert result.returncode == 1 and message in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize(
    "topology, devices, message",
    [("v5p-16", 8, "give exactly one of --topology"), (None, None, "give exactly one of --topology"),
     ("tpu-9000", None, "unknown target 'tpu-9000'")],
)  # fmt: skip
def test_compile_for_target_checks_its_arguments_first(topology, devices, message):
    with pytest.raises(aot.CompileError, match=message):
        aot.compile_for_target(tiny(), topology=topology, devices=devices, backend="cpu")


@pytest.mark.slow
@pytest.mark.skipif(not aot.libtpu_available(), reason="needs the libtpu package (pip install libtpu)")
def test_cli_compiles_for_a_real_v5p_128_with_libtpu():
    result = _cli("--topology", "v5p-128", "--backend", "tpu", "--config.mesh.fsdp=-1", "--config.data.batch_size=64")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train step compiled for v5p-128 (64 devices, tpu compiler)" in result.stdout


def _lookup_temp_bytes(tables_spec, mesh, shape) -> int:
    """Temporaries of the hash lookup's forward and backward pass, tables sharded by ``tables_spec``."""
    t, v, e, b, n = shape

    def forward_backward(tables, ids, d_out):
        summed, vjp = jax.vjp(lambda x: _lookup_sum(x, ids), tables)
        return jax.lax.with_sharding_constraint(summed, NamedSharding(mesh, P("fsdp"))), vjp(d_out)[0]

    tables_sharding, rows = NamedSharding(mesh, tables_spec), NamedSharding(mesh, P("fsdp"))
    args = (
        jax.ShapeDtypeStruct((t, v, e), jnp.float32, sharding=tables_sharding),
        jax.ShapeDtypeStruct((t, b, n), jnp.int32, sharding=NamedSharding(mesh, P(None, "fsdp"))),
        jax.ShapeDtypeStruct((b, n, e), jnp.float32, sharding=rows),
    )
    compiled = jax.jit(forward_backward, out_shardings=(rows, tables_sharding)).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_hash_tables_split_their_width_so_the_lookup_divides_with_the_mesh():
    """With rows split over fsdp (the batch's axis) every device gathered the whole micro-batch from
    its shard of every table, or the whole table: docs/design.md, "Where the pod memory went"."""
    plan = aot.plan_step(tiny(data=1, fsdp=4), jax.devices()[:4])
    spec = plan.shardings.params["local_encoder"]["hash_embedding"]["tables"].spec
    assert spec[2] == "fsdp" and "fsdp" not in jax.tree.leaves(spec[1])
    shape = (6, 4000, 256, 8, 2048)  # tables, rows, width, batch rows, bytes
    full_batch_lookup = 6 * 8 * 2048 * 256 * 4  # [tables, rows, bytes, width] float32 on every device
    assert _lookup_temp_bytes(spec, plan.mesh, shape) < full_batch_lookup / 2
    assert _lookup_temp_bytes(P(None, "fsdp", None), plan.mesh, shape) > full_batch_lookup / 2  # the old split


@pytest.mark.slow
@pytest.mark.skipif(not aot.libtpu_available(), reason="needs the libtpu package (pip install libtpu)")
def test_a_tpu_compile_traces_auto_attention_as_splash(monkeypatch):
    """The host is a CPU, but the step is traced for the target: `auto` must pick the TPU kernel."""
    from bltjax import kernels

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # another process may hold libtpu's lockfile
    used = []
    splash = kernels._SELF_ATTENTION["splash"]
    monkeypatch.setitem(kernels._SELF_ATTENTION, "splash", lambda *a: used.append(a[0].shape) or splash(*a))
    config = tiny(batch_size=8, data=1, fsdp=-1)
    config.model.attention = "auto"
    aot.compile_train_step(config, aot.tpu_devices(aot.parse_topology("v5p-8")), target="v5p-8", backend="tpu",
                           explain=False)  # fmt: skip
    assert used, "auto resolved to an XLA attention although the step was compiled for a TPU"


@pytest.mark.slow
def test_cli_targets_the_slice_a_config_records_when_no_topology_is_given():
    result = _cli("--config.topology=v4-8", "--backend", "cpu", "--noexplain")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train step compiled for v4-8 (4 devices, cpu compiler)" in result.stdout
