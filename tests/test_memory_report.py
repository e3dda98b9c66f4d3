"""What is live at a compiled program's memory peak, read from the compiler's own dump files."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from bltjax.runtime import memory_report

LIVE_RANGE = """HloLiveRange (max 9):
  InstructionSequence:
    0:p0
  BufferLiveRange:
    p0{}:0-9
  Live ranges at 4 (peak):
    fusion.7{}: 4096 bytes (cumulative: 4096 bytes)
    wide.param.12{3}: 2048 bytes (cumulative: 6144 bytes)
    param.1{}: 1024 bytes (cumulative: 5120 bytes)
    tuple.3{1}: 512 bytes (cumulative: 5632 bytes)
  Stack trace breakdown for peak usage: 5 632 bytes
"""
ASSIGNMENT = """BufferAssignment:
allocation 0: size 1024, parameter 0, shape |f32[256]| at ShapeIndex {}, maybe-live-out:
 value: <1 param.1 @0> (size=1024,offset=0): f32[256]{0:T(256)}
allocation 1: size 4608, preallocated-temp:
 value: <7 fusion.7 @0> (size=4096,offset=0): bf16[2,1024]{1,0:T(8,128)(2,1)}
 value: <9 tuple.3{1} (phi) @0> (size=512,offset=4096): f32[128]{0}
"""
SCATTER = "jit(train_step)/transpose(jvp(BLT))/local_encoder/hash_embedding/scatter-add"
DOT = "jit(train_step)/jvp(BLT)/latent/transformer/layers_3/ffn/up/dot_general"
HLO = f"""HloModule jit_train_step
ENTRY %main {{
  %param.1 = f32[256]{{0}} parameter(0), metadata={{op_name="state.params[\\'latent\\'][\\'w\\']"}}
  %fusion.7 = bf16[2,1024]{{1,0}} fusion(%param.1), kind=kLoop, metadata={{op_name="{SCATTER}" \
source_file="/x/hash_embed.py" source_line=88}}
  ROOT %tuple.3 = (f32[128]{{0}}, f32[128]{{0}}) tuple(%param.1), metadata={{op_name="{DOT}"}}
}}
"""


def _write(tmp_path, prefix="module_0001.jit_train_step.cl_1"):
    (tmp_path / f"{prefix}.after_optimizations-live-range.txt").write_text(LIVE_RANGE)
    (tmp_path / f"{prefix}.after_optimizations-buffer-assignment.txt").write_text(ASSIGNMENT)
    (tmp_path / f"{prefix}.after_optimizations.txt").write_text(HLO)


def test_the_peak_buffers_get_their_shapes_sources_and_layer_kinds(tmp_path):
    _write(tmp_path)
    breakdown = memory_report.read_dump(tmp_path, "train_step")
    assert breakdown.peak_live_bytes == 5632 + 2048
    top = breakdown.buffers[0]
    assert (top.value, top.bytes, top.shape, top.source) == ("fusion.7{}", 4096, "bf16[2,1024]", "/x/hash_embed.py:88")
    assert top.kind == "hash embeddings" and top.backward
    state = next(b for b in breakdown.buffers if b.value == "param.1{}")
    assert state.op_name == "state.params['latent']['w']" and state.kind == "train state"
    assert [b.value for b in breakdown.temporaries()] == ["fusion.7{}", "wide.param.12{3}", "tuple.3{1}"]
    assert breakdown.by_kind() == {
        "hash embeddings": {"forward": 0, "backward": 4096},
        "no jax op: wide.param": {"forward": 2048, "backward": 0},  # a loop carry: no metadata
        "train state": {"forward": 1024, "backward": 0},
        "latent transformer": {"forward": 512, "backward": 0},
    }
    table = breakdown.table()
    assert "hash embeddings" in table and "bf16[2,1024]" in table and "[/x/hash_embed.py:88]" in table
    assert breakdown.to_json()["top_temporaries"][0]["kind"] == "hash embeddings"


def test_no_dump_means_no_breakdown(tmp_path):
    assert memory_report.read_dump(tmp_path) is None
    (tmp_path / "m.after_optimizations-live-range.txt").write_text("HloLiveRange (max 1):\n")
    assert memory_report.read_dump(tmp_path) is None


@pytest.mark.parametrize(
    "op_name, kind",
    [
        ("jit(train_step)/jvp(BLT)/local_encoder/cross_attention_0/attend/mul", "encoder cross-attention"),
        ("jit(train_step)/jvp(BLT)/local_encoder/layers_0/attention/dot_general", "local encoder"),
        ("jit(train_step)/transpose(jvp(BLT))/local_decoder/cross_attention_1/x", "decoder cross-attention"),
        ("jit(train_step)/jvp(BLT)/local_decoder/local_decoder.logits/output/dot_general", "logits and loss"),
        ("jit(train_step)/jvp(BLT)/latent/transformer/layers_0/x", "latent transformer"),
        ("batch['tokens']", "batch"),
        ("", "other"),
    ],
)
def test_layer_kinds_follow_the_flax_module_path(op_name, kind):
    assert memory_report.layer_kind(op_name) == kind


def test_a_real_cpu_compilation_names_the_op_that_holds_the_peak(tmp_path):
    def program(x):
        with jax.named_scope("widen"):
            wide = jnp.dot(jnp.tile(x, (64, 1)), x)  # a matmul output is materialised: [16384, 256] float32
        return jnp.sort(wide, axis=0)[-1]

    lowered = jax.jit(program).lower(jax.ShapeDtypeStruct((256, 256), jnp.float32))
    memory_report.compile_with_dump(lowered, tmp_path)  # twice: a cached program must not lose its dump
    memory_report.compile_with_dump(lowered, tmp_path / "again")
    breakdown = memory_report.read_dump(tmp_path / "again", "program")
    assert breakdown is not None and breakdown.peak_live_bytes >= 64 * 256 * 256 * 4
    widened = [b for b in breakdown.buffers if "widen" in b.op_name]
    assert widened and widened[0].bytes == 64 * 256 * 256 * 4 and widened[0].shape == "f32[16384,256]"
    assert breakdown.buffers[0].bytes == 64 * 256 * 256 * 4  # largest first
