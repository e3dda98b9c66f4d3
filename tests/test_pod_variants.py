"""Pod variants of the paper configs (`experiments/blt_1b.py:v5p-128`): fast checks, nothing compiled.

Each variant loads, validates, trains on the paper's step (about 16M bytes: 1024 rows x 16 KiB),
accumulates at most 4 micro-batches, records its slice, and its mesh fits that slice: the
devices fill the mesh and every micro-batch splits evenly over the batch axes.
"""

from __future__ import annotations

import configparser
import json
import os
import pathlib
import subprocess
import sys

import pytest

from bltjax.config import POD_VARIANTS, ConfigError, load_config, recorded_topology, validate
from bltjax.runtime.aot import libtpu_available, parse_topology
from bltjax.training import sharding

REPO = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = [(size, slice_name) for size, slices in POD_VARIANTS.items() for slice_name in slices]
PAPER_BYTES_PER_STEP = 16 * 2**20


def test_every_paper_size_has_a_variant():
    assert sorted(POD_VARIANTS) == ["1b", "2b", "400m", "4b", "8b"]
    assert POD_VARIANTS["1b"] == ("v5p-128",)


@pytest.mark.parametrize("size, slice_name", VARIANTS, ids=[f"{s}:{t}" for s, t in VARIANTS])
def test_variant_loads_validates_and_fits_its_slice(size, slice_name):
    config = load_config(f"experiments/blt_{size}.py:{slice_name}")
    validate(config)
    assert config.topology == slice_name and recorded_topology(config) == slice_name
    assert config.data.seq_len == 16384
    assert config.data.batch_size * config.data.seq_len == PAPER_BYTES_PER_STEP
    assert 1 <= config.train.grad_accum <= 4
    assert config.model.remat == "block"
    assert config.model.scan_layers is True

    target = parse_topology(slice_name)
    shape = sharding.mesh_shape(config, target.devices)  # raises MeshError if the mesh does not fill the slice
    assert shape["data"] * shape["fsdp"] * shape["tensor"] == target.devices
    assert shape["fsdp"] == target.devices  # FSDP over every chip: the state is divided by the slice
    micro = config.data.batch_size // config.train.grad_accum
    assert micro % (shape["data"] * shape["fsdp"]) == 0, "every micro-batch splits evenly over the chips"


def test_unknown_variant_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"blt_1b.py:v5p-8: unknown pod variant; expected one of \['v5p-128'\]"):
        load_config("experiments/blt_1b.py:v5p-8")


@pytest.mark.parametrize("size", sorted(POD_VARIANTS))
def test_paper_configs_carry_the_pod_settings_as_shipped(size):
    """Without a variant: the variant's settings on any device count, no slice recorded, a schedule that runs."""
    config = load_config(f"experiments/blt_{size}.py")
    validate(config)
    assert recorded_topology(config) is None
    assert config.train.grad_accum == 4 and config.model.remat == "block" and config.model.scan_layers is True
    assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == (1, -1, 1)
    assert config.optimizer.warmup_steps == 2000 < config.train.steps
    variant = load_config(f"experiments/blt_{size}.py:{POD_VARIANTS[size][0]}")
    variant.topology = ""
    assert variant.to_dict() == config.to_dict(), "a pod variant adds only its slice"


def test_warmup_that_outlasts_the_run_is_rejected_naming_both_fields():
    config = load_config("experiments/blt_1b.py")
    config.train.steps = 2000
    with pytest.raises(
        ConfigError, match=r"config.optimizer.warmup_steps: expected fewer than config.train.steps=2000"
    ):
        validate(config)
    validate(config, for_training=False)  # a model built to evaluate an older workdir still loads


def test_sequence_axis_is_validated():
    config = load_config("experiments/blt_tiny.py")
    config.mesh.sequence = "tensor"
    validate(config)
    config.mesh.sequence = "rows"
    with pytest.raises(ConfigError, match="config.mesh.sequence: expected None or one of the mesh axes"):
        validate(config)


def test_extras_bring_the_accelerator_stacks():
    """`pip install bltjax[tpu]` (TPU VMs), `[cuda]` (NVIDIA GPUs), `[aot]` (the TPU compiler on any machine)."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    extras = cfg["options.extras_require"]
    requirement = {name: [line.split("#")[0].strip() for line in extras[name].splitlines() if line.strip()]
                   for name in ("tpu", "cuda", "aot")}  # fmt: skip
    assert requirement["tpu"][0] == "jax[tpu]>=0.10.2"  # then the gcs extra's pins: TPU VMs read gs:// buckets
    assert requirement["cuda"] == ["jax[cuda12]>=0.10.2"]
    assert requirement["aot"] == ["libtpu==0.0.52"]


@pytest.mark.slow
@pytest.mark.skipif(not libtpu_available(), reason="needs the libtpu package (pip install bltjax[aot])")
def test_tiny_pod_shaped_config_compiles_for_v5p_8_with_libtpu(tmp_path):
    """What a pod variant sets (FSDP over the slice, block remat, accumulation), on blt_tiny, by libtpu's compiler.

    `JAX_PLATFORMS=cpu`: jax must not probe for a TPU; libtpu only compiles.
    """
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"  # other compiles (test workers, pod checks) may hold libtpu's lockfile
    overrides = ["--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.model.remat=block",
                 "--config.train.grad_accum=2", "--config.data.batch_size=8"]  # fmt: skip
    command = [sys.executable, "-m", "bltjax.compile", "--config", str(REPO / "experiments" / "blt_tiny.py"),
               "--topology", "v5p-8", "--backend", "tpu", "--out", str(out), *overrides]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train step compiled for v5p-8 (4 devices, tpu compiler)" in result.stdout
    report = json.loads(out.read_text())
    assert report["fits"] and report["backend"] == "tpu" and report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}


@pytest.mark.slow
@pytest.mark.skipif(not libtpu_available(), reason="needs the libtpu package (pip install bltjax[aot])")
def test_blt_1b_pod_variant_fits_v5p_128_within_the_targets(tmp_path):
    """Issue #18's target, by libtpu's compiler: at most 40 GiB per chip with at most 4 micro-batches."""
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    command = [sys.executable, "-m", "bltjax.compile", "--config", "experiments/blt_1b.py:v5p-128", "--noexplain",
               "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1500, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["target"] == "v5p-128" and report["backend"] == "tpu" and report["fits"]
    assert report["peak_bytes"] <= 40 * 2**30
    assert load_config(str(REPO / "experiments" / "blt_1b.py") + ":v5p-128").train.grad_accum <= 4


def test_benchmark_data_covers_every_variant_and_each_fits():
    """The JSON docs/launching.md's pod table is rendered from (tests/test_docs_figures.py checks the rendering)."""
    data = json.loads((REPO / "benchmarks" / "pod_variants.json").read_text())
    assert [row["config"] for row in data["rows"]] == [f"experiments/blt_{s}.py:{v}" for s, v in VARIANTS]
    assert all(row["fits"] for row in data["rows"])
