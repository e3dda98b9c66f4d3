"""The roofline estimate: the chip table, the arithmetic, and what XLA's cost analysis counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bltjax.config import load_config
from bltjax.models import flops
from bltjax.runtime import aot, roofline


@pytest.mark.parametrize(
    "name, tflops, gbps",
    [("v4", 275, 1200), ("v5e", 197, 819), ("v5p", 459, 2765), ("v6e", 918, 1640),
     ("h100", 989.5, 3350), ("h200", 989.5, 4800), ("a100", 312, 2039)],
)  # fmt: skip
def test_the_chip_table_holds_the_published_peaks(name, tflops, gbps):
    chip = roofline.chip_peaks(name)
    assert chip.bf16_flops == pytest.approx(tflops * 1e12) and chip.hbm_bytes_per_second == pytest.approx(gbps * 1e9)
    assert chip.source


def test_every_target_has_peak_figures_and_cpu_has_none():
    for name in aot.ACCELERATORS:
        assert roofline.chip_peaks(name) is not None, name
    assert aot.parse_topology("v5litepod-16").accelerator == "v5e"
    assert roofline.chip_peaks(aot.device_count_target(8, None).accelerator) is None
    assert roofline.chip_peaks("cpu") is None


def test_step_time_is_the_slower_of_compute_and_memory_and_mfu_divides_model_flops():
    chip = roofline.ChipPeaks("test chip", 100e12, 1e12, "made up")
    cost = {"flops": 50e12, "bytes accessed": 0.2e12, "utilization0{}": 7.0}
    estimate = roofline.estimate(cost, devices=4, chip=chip, model_flops=120e12)
    assert estimate.compute_seconds == pytest.approx(0.5) and estimate.memory_seconds == pytest.approx(0.2)
    assert estimate.step_seconds == pytest.approx(0.5) and estimate.bound == "compute"
    assert estimate.mfu == pytest.approx(120e12 / (0.5 * 100e12 * 4))  # 60 %
    assert estimate.xla_over_model == pytest.approx(200e12 / 120e12)
    memory_bound = roofline.estimate([{"flops": 1e12, "bytes accessed": 1e12}], devices=1, chip=chip, model_flops=1e12)
    assert memory_bound.step_seconds == pytest.approx(1.0) and memory_bound.bound == "memory"
    assert memory_bound.mfu == pytest.approx(0.01)
    text = "\n".join(estimate.lines())
    assert "step time >= max(compute 0.500 s, memory 0.200 s) = 0.500 s (compute-bound)" in text
    assert "estimated MFU 60.0 %" in text and "50.00 TFLOP" in text and "200.00 GB" in text
    assert estimate.to_json()["mfu"] == pytest.approx(0.6) and estimate.compiler_seconds is None
    with_compiler = roofline.estimate({**cost, "optimal_seconds": 0.25}, devices=4, chip=chip, model_flops=1.0)
    assert "the compiler's own estimate of the step time: 0.250 s" in "\n".join(with_compiler.lines())
    assert roofline.estimate({**cost, "optimal_seconds": -0.99}, devices=4, chip=chip).compiler_seconds is None


def test_without_peaks_there_is_no_time_and_the_output_says_so():
    estimate = roofline.estimate({"flops": 1e9, "bytes accessed": 1e6}, devices=8, chip=None, model_flops=2e9)
    assert estimate.step_seconds is None and estimate.mfu is None
    assert "no peak figures for this target (cpu)" in "\n".join(estimate.lines())
    assert roofline.cost_totals(None) == (0.0, 0.0) and roofline.cost_totals([]) == (0.0, 0.0)


def test_cost_analysis_counts_one_devices_share():
    """The compiled SPMD program is one device's: 4 devices with a quarter of the rows each do a quarter."""

    def program(a, b):
        return a @ b

    a = jax.ShapeDtypeStruct((1024, 512), jnp.float32)
    b = jax.ShapeDtypeStruct((512, 512), jnp.float32)
    alone = roofline.cost_totals(jax.jit(program).lower(a, b).compile().cost_analysis())[0]
    mesh = Mesh(np.array(jax.devices()[:4]), ("rows",))
    rows, whole = NamedSharding(mesh, P("rows")), NamedSharding(mesh, P())
    split = jax.jit(program, in_shardings=(rows, whole), out_shardings=rows).lower(a, b).compile().cost_analysis()
    assert alone == pytest.approx(2 * 1024 * 512 * 512, rel=0.01)
    assert roofline.cost_totals(split)[0] == pytest.approx(alone / 4, rel=0.01)


def test_model_flops_of_a_step_are_the_analytic_count_of_its_batch():
    config = load_config("experiments/blt_tiny.py")
    expected = flops.analytic_flops_per_byte(config).train * config.data.batch_size * config.data.seq_len
    assert roofline.model_flops_per_step(config) == pytest.approx(expected)


def test_counts_are_printed_with_a_readable_prefix():
    assert roofline.format_count(1.5e15, "FLOP") == "1.50 PFLOP"
    assert roofline.format_count(2.0e9, "B") == "2.00 GB"
    assert roofline.format_count(12, "B") == "12 B"


def test_loop_bodies_counted_once_are_scaled_up_to_the_model_flops():
    def program(x):
        return jax.lax.scan(lambda c, _: (c @ x, None), x, None, length=4)[0]

    square = jax.ShapeDtypeStruct((256, 256), jnp.float32)
    counted = roofline.cost_totals(jax.jit(program).lower(square).compile().cost_analysis())[0]
    assert counted == pytest.approx(2 * 256**3, rel=0.01)  # one matmul of the four
    chip = roofline.ChipPeaks("test chip", 1e12, 1e12, "made up")
    estimate = roofline.estimate(
        {"flops": counted, "bytes accessed": 1e6}, devices=1, chip=chip, model_flops=4 * counted
    )
    assert estimate.loop_factor == pytest.approx(4)
    assert estimate.compute_seconds == pytest.approx(4 * counted / 1e12)
    assert estimate.memory_seconds == pytest.approx(4e-6)
    assert estimate.mfu == pytest.approx(1.0) and "scaled by 4.00" in "\n".join(estimate.lines())
    plain = roofline.estimate({"flops": 2e12, "bytes accessed": 1e6}, devices=1, chip=chip, model_flops=1e12)
    assert plain.loop_factor == 1.0 and plain.mfu == pytest.approx(0.5)
