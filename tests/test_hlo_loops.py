"""Matmul FLOPs of a compiled program counted with its loops' trip counts (bltjax/runtime/hlo_loops.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bltjax.runtime import hlo_loops, roofline


def _compiled_text(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def test_a_scanned_matmul_counts_every_trip_and_xla_counts_one():
    def loss(ws, x):
        y, _ = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)
        return y.sum()

    x, ws = jnp.ones((8, 16)), jnp.ones((5, 16, 16))
    counts = hlo_loops.count_matmuls(_compiled_text(jax.grad(loss), ws, x))
    one_matmul = 2 * 8 * 16 * 16
    # forward: 5 matmuls; backward: 2 per layer (input and weight gradients)
    assert counts.flops == 15 * one_matmul
    assert counts.flops_once == 3 * one_matmul
    assert counts.loop_factor == 5


def test_nested_loops_multiply_their_trips():
    def outer(x, wss):
        def inner(c, ws):
            y, _ = jax.lax.scan(lambda d, w: (d @ w, None), c, ws)
            return y, None

        return jax.lax.scan(inner, x, wss)[0]

    counts = hlo_loops.count_matmuls(_compiled_text(outer, jnp.ones((4, 8)), jnp.ones((3, 2, 8, 8))))
    assert counts.flops == 6 * 2 * 4 * 8 * 8
    assert counts.loop_factor == 6


def test_a_program_without_loops_has_factor_one():
    counts = hlo_loops.count_matmuls(_compiled_text(lambda a, b: a @ b, jnp.ones((4, 8)), jnp.ones((8, 3))))
    assert (counts.flops, counts.loop_factor, counts.kernel_calls) == (2 * 4 * 8 * 3, 1.0, 0)


SYNTHETIC = """HloModule m

%body (p: (s32[], bf16[4,128])) -> (s32[], bf16[4,128]) {
  %p = (s32[], bf16[4,128]) parameter(0)
  %x = bf16[4,128]{1,0} get-tuple-element(%p), index=1
  %k = bf16[128,256]{1,0} constant({...})
  %conv = bf16[4,256]{1,0} convolution(%x, %k), dim_labels=bf_io->bf
  %splash = bf16[4,128]{1,0} custom-call(%x), custom_call_target="tpu_custom_call"
  ROOT %t = (s32[], bf16[4,128]) tuple(%i, %splash)
}

%cond (q: (s32[], bf16[4,128])) -> pred[] {
  ROOT %lt = pred[] constant(true)
}

ENTRY %main (a: bf16[4,128]) -> bf16[4,128] {
  %a = bf16[4,128]{1,0} parameter(0)
  %w = (s32[], bf16[4,128]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"7"}}
  ROOT %r = bf16[4,128]{1,0} get-tuple-element(%w), index=1
}
"""


def test_convolutions_and_kernel_calls_as_the_tpu_compiler_writes_them():
    counts = hlo_loops.count_matmuls(SYNTHETIC)
    assert counts.flops == 7 * 2 * 4 * 256 * 128
    assert counts.flops_once == 2 * 4 * 256 * 128
    assert counts.kernel_calls == 7


def test_the_roofline_scales_by_the_measured_factor_and_says_so():
    counts = hlo_loops.MatmulCounts(flops=40.0, flops_once=10.0, kernel_calls=2)
    chip = roofline.chip_peaks("v5p")
    estimate = roofline.estimate({"flops": 10.0, "bytes accessed": 100.0}, devices=1, chip=chip, model_flops=1e6,
                                 matmuls=counts)  # fmt: skip
    assert estimate.loop_factor == 4  # measured, not model FLOPs / XLA's (1e5)
    assert estimate.memory_seconds == 400.0 / chip.hbm_bytes_per_second
    text = "\n".join(estimate.lines())
    assert "scaled by 4.00 below (loop trips counted in the HLO)" in text
    assert "2 custom-call kernel runs per step" in text


def test_libtpu_loops_take_their_trips_from_the_counter_test_of_their_condition():
    # libtpu writes no known_trip_count; its conditions are jax's `counter < N`
    text = SYNTHETIC.replace(', backend_config={"known_trip_count":{"n":"7"}}', "").replace(
        "  ROOT %lt = pred[] constant(true)\n",
        "  %n = s32[]{:T(128)} constant(7)\n"
        "  %i = s32[]{:T(128)} get-tuple-element(%q), index=0\n"
        "  ROOT %lt = pred[]{:T(512)} compare(%i, %n), direction=LT\n",
    )
    counts = hlo_loops.count_matmuls(text)
    assert counts.flops == 7 * 2 * 4 * 256 * 128
    assert counts.loop_factor == 7
