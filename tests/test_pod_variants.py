"""Pod variants of the paper configs (`experiments/blt_1b.py:v5p-128`): fast checks, nothing compiled.

Each variant loads, validates, trains on the paper's step (about 16M bytes: 1024 rows x 16 KiB),
accumulates at most 4 micro-batches, records its slice, and its mesh fits that slice: the
devices fill the mesh and every micro-batch splits evenly over the batch axes.
"""

from __future__ import annotations

import pytest

from bltjax.config import POD_VARIANTS, ConfigError, load_config, recorded_topology, validate
from bltjax.runtime.aot import parse_topology
from bltjax.training import sharding

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
    if "scan_layers" in config.model:
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


def test_no_variant_keeps_the_single_host_defaults():
    config = load_config("experiments/blt_1b.py")
    validate(config)
    assert recorded_topology(config) is None
    assert config.train.grad_accum == 1 and config.model.remat == "none" and config.mesh.data == -1


def test_sequence_axis_is_validated():
    config = load_config("experiments/blt_tiny.py")
    config.mesh.sequence = "tensor"
    validate(config)
    config.mesh.sequence = "rows"
    with pytest.raises(ConfigError, match="config.mesh.sequence: expected None or one of the mesh axes"):
        validate(config)
