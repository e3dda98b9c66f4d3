"""Multi-slice meshes (`config.mesh.num_slices`): one ICI block per slice, the slices joined on the DCN axis.

CPU devices carry no ``slice_index``; the arrangement logic is tested on stand-in devices that do
(as libtpu's do), and on conftest's 8 CPU devices, which `device_slices` cuts into equal runs.
The libtpu test compiles a tiny train step for two v5p-8 slices and reads the report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from bltjax.config import ConfigError, load_config, validate
from bltjax.runtime import aot
from bltjax.training import sharding

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "experiments" / "blt_tiny.py")


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """What `device_slices` / `hybrid_device_array` read of a TPU device of a multi-slice job."""

    id: int
    slice_index: int
    process_index: int = 0
    platform: str = "cpu"


def _config(**mesh):
    config = load_config(TINY)
    config.data.batch_size = 16
    for key, value in mesh.items():
        config.mesh[key] = value
    return config


def test_mesh_sizes_describe_one_slice_and_the_dcn_axis_multiplies_them():
    config = _config(data=2, fsdp=2, num_slices=2)
    assert sharding.mesh_shape(config, 8) == {"data": 4, "fsdp": 2, "tensor": 1}
    layout = sharding.slice_layout(config, sharding.mesh_shape(config, 8))
    assert layout.ici == {"data": 2, "fsdp": 2, "tensor": 1} and layout.dcn == {"data": 2, "fsdp": 1, "tensor": 1}
    assert layout.describe() == ("2 slices over DCN on axis 'data' (data 4 = 2 slices x 2); inside each slice "
                                 "(ICI): data 2 x fsdp 2 x tensor 1")  # fmt: skip


def test_a_pod_config_runs_unchanged_on_two_slices_with_data_parallelism_across_them():
    config = load_config("experiments/blt_1b.py")  # FSDP over every device of a slice: data 1, fsdp -1
    config.mesh.num_slices = 2
    assert sharding.mesh_shape(config, 128) == {"data": 2, "fsdp": 64, "tensor": 1}
    config.mesh.dcn_axis = "fsdp"
    assert sharding.mesh_shape(config, 128) == {"data": 1, "fsdp": 128, "tensor": 1}


def test_devices_that_do_not_split_into_the_slices_or_a_slice_are_refused():
    with pytest.raises(sharding.MeshError, match=r"config.mesh.num_slices: 6 devices do not split into 4 equal"):
        sharding.mesh_shape(_config(num_slices=4), 6)
    with pytest.raises(sharding.MeshError, match=r"data x fsdp x tensor = 8 devices .* but there are 4 devices per"):
        sharding.mesh_shape(_config(data=4, fsdp=2, num_slices=2), 8)


def test_devices_are_grouped_by_their_slice_index_in_slice_order():
    devices = [FakeDevice(i, slice_index=1 - i // 4) for i in range(8)]  # slice 1 listed first
    slices = sharding.device_slices(devices, 2)
    assert [[d.id for d in group] for group in slices] == [[4, 5, 6, 7], [0, 1, 2, 3]]
    with pytest.raises(sharding.MeshError, match=r"config.mesh.num_slices: expected the slice count of the devices, 2"):
        sharding.device_slices(devices, 4)


def test_hybrid_array_stacks_one_block_per_slice_along_the_dcn_axis():
    devices = [FakeDevice(i, slice_index=i % 2) for i in range(8)]  # interleaved, as ids need not follow slices
    for axis, shape in (("data", (4, 2, 1)), ("fsdp", (2, 4, 1))):
        config = _config(data=2, fsdp=2, num_slices=2, dcn_axis=axis)  # one slice: 2 x 2
        layout = sharding.slice_layout(config, sharding.mesh_shape(config, 8))
        array = sharding.hybrid_device_array(devices, layout)
        assert array.shape == shape
        halves = np.split(array, 2, axis=sharding.MESH_AXES.index(axis))
        assert [{d.slice_index for d in half.flat} for half in halves] == [{0}, {1}]


def test_cpu_mesh_of_two_slices_keeps_each_slice_inside_one_half_of_the_data_axis():
    devices = jax.devices()[:8]
    mesh = sharding.make_mesh(_config(data=-1, num_slices=2), devices)
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    ids = [[d.id for d in mesh.devices[half * 4 : half * 4 + 4].flat] for half in (0, 1)]
    assert ids == [[d.id for d in devices[:4]], [d.id for d in devices[4:]]]
    # The mesh works: a batch sharded over it sums to the same value as on the host.
    x = jax.device_put(np.arange(16.0).reshape(16, 1), sharding.batch_sharding(mesh))
    assert float(jax.jit(lambda a: a.sum())(x)) == 120.0
    assert "2 slices over DCN on axis 'data'" in sharding.format_rules(mesh, slices=sharding.mesh_slices(mesh, _config(
        data=-1, num_slices=2)))  # fmt: skip


def test_one_slice_on_devices_of_two_is_refused():
    devices = [FakeDevice(i, slice_index=i // 4) for i in range(8)]
    with pytest.raises(sharding.MeshError, match=r"the devices span 2 slices \(slice_index\); expected that count"):
        sharding.make_mesh(_config(), devices)


def test_num_slices_and_dcn_axis_are_validated():
    for field, value, message in (("num_slices", 0, "a positive integer"), ("dcn_axis", "rows", "one of the mesh")):
        config = _config(**{field: value})
        with pytest.raises(ConfigError, match=f"config.mesh.{field}: expected {message}"):
            validate(config)


def test_compile_takes_the_slice_count_from_the_config_unless_the_flag_gives_it():
    from bltjax import compile as compile_program

    line = compile_program.PROGRAM.parse(["bltjax.compile", "--config", TINY, "--config.mesh.num_slices=2"])
    assert line.flags.num_slices is None  # so compile_for_target takes the config's 2 slices
    assert line.flags.config.mesh.num_slices == 2
    with pytest.raises(aot.CompileError, match=r"--num-slices 3 disagrees with config.mesh.num_slices=2"):
        aot.compile_for_target(_config(num_slices=2), devices=4, num_slices=3, backend="cpu")


@pytest.mark.slow
def test_compile_report_on_a_fake_cpu_mesh_of_two_slices():
    config = _config(data=-1, num_slices=2)
    report = aot.compile_train_step(config, jax.devices()[:8], target="2 x 4 devices", backend="cpu", explain=False)
    assert report.mesh == {"data": 8, "fsdp": 1, "tensor": 1}
    assert report.slices.startswith("2 slices over DCN on axis 'data' (data 8 = 2 slices x 4)")
    assert report.slices in report.table() and report.to_json()["slices"] == report.slices


@pytest.mark.slow
@pytest.mark.skipif(not aot.libtpu_available(), reason="needs the libtpu package (pip install bltjax[aot])")
def test_compile_for_two_v5p_slices_with_libtpu_shows_the_dcn_axis(tmp_path):
    """`python -m bltjax.compile --num-slices 2`: libtpu describes 2 x 4 chips with their slice_index."""
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    command = [sys.executable, "-m", "bltjax.compile", "--config", TINY, "--topology", "v5p-8", "--num-slices", "2",
               "--backend", "tpu", "--noexplain", "--out", str(out), "--config.mesh.data=1",
               "--config.mesh.fsdp=-1", "--config.data.batch_size=16"]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    layout = "2 slices over DCN on axis 'data' (data 2 = 2 slices x 1); inside each slice (ICI): data 1 x fsdp 4"
    assert layout in result.stdout
    report = json.loads(out.read_text())
    assert report["devices"] == 8 and report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert report["slices"].startswith(layout) and report["backend"] == "tpu"
