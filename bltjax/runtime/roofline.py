r"""A roofline estimate of a compiled train step: step time and MFU on the target, before any run.

  chip = roofline.chip_peaks("v5p")                         # or None (no figures for cpu)
  estimate = roofline.estimate(cost, devices=64, chip=chip, model_flops=...)

Inputs:

* **What the program does**, per device: ``compiled.cost_analysis()`` of the SPMD-partitioned
  train step (one device's program), keys ``"flops"`` and ``"bytes accessed"`` (both libtpu's and
  XLA:CPU's compilers report them; libtpu adds per-operand ``"bytes accessed0{}"``-style keys
  and ``"utilization..."`` keys that are not used here, and ``"optimal_seconds"``, its own
  step-time estimate, printed beside ours). They are per device: the same
  global batch compiled for four devices counts a quarter of the FLOPs of one (tested).
* **What the chip can do**: `CHIP_PEAKS`, the vendors' published dense bf16 FLOP/s and HBM
  bandwidth per jax device (a TPU v4 / v5p chip is one device).
* **What the model needs**: the analytic train FLOPs of `bltjax.models.flops` (what MFU divides
  by everywhere in bltjax), times the bytes of one global batch.

The rule: each device must both compute its FLOPs and move its bytes through HBM, so the step
takes at least ``max(flops / peak FLOP/s, bytes / HBM bandwidth)``; the larger term says whether
the step is compute- or memory-bound. It ignores communication and assumes perfect overlap:
a lower bound on the step time, an upper bound on the MFU. Then

    MFU = model FLOPs per step / (step time x peak FLOP/s x devices)

XLA's FLOPs count everything it executes (recomputation under remat, elementwise work, masked
attention blocks) while the model FLOPs count the useful work only, so MFU < flops share.

But XLA's cost analysis counts the body of a loop once, whatever its trip count (a `lax.scan`
of 4 matmuls counts 1, tested): with gradient accumulation or scanned layers the program's
counts fall far below what runs. `loop_factor` scales both the FLOPs and the bytes back up,
assuming a loop's other work and traffic repeat as its matmuls do. It is measured when the
optimized HLO is at hand (`bltjax.runtime.hlo_loops`: the program's matmul FLOPs with every
loop's trip count over the same count with each body once); otherwise it is assumed to be the
model FLOPs over XLA's (at least 1), and the output says which.

Kernels in custom calls (Pallas splash attention on TPU) are opaque to XLA: their FLOPs are in
no count, so with them the compute term is low and the MFU high; the output says how many run.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bltjax.models import flops
from bltjax.runtime import hlo_loops

TERA = 1e12
GIGA = 1e9


@dataclasses.dataclass(frozen=True)
class ChipPeaks:
    """Published per-device peaks: dense bf16 matmul FLOP/s and HBM bandwidth in bytes/s."""

    name: str
    bf16_flops: float
    hbm_bytes_per_second: float
    source: str


# Per jax device; NVIDIA's datasheets list bf16 "with sparsity", the dense figure is half.
CHIP_PEAKS: dict[str, ChipPeaks] = {
    "v4": ChipPeaks("TPU v4", 275 * TERA, 1200 * GIGA, "cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 1200 GB/s"),
    "v5e": ChipPeaks("TPU v5e", 197 * TERA, 819 * GIGA, "cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 819 GB/s"),
    "v5p": ChipPeaks("TPU v5p", 459 * TERA, 2765 * GIGA, "cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 2765 GB/s"),
    "v6e": ChipPeaks("TPU v6e", 918 * TERA, 1640 * GIGA, "cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 1640 GB/s"),
    "h100": ChipPeaks(
        "NVIDIA H100 SXM", 989.5 * TERA, 3350 * GIGA, "NVIDIA H100 datasheet (SXM): 1979 TFLOP/s bf16 sparse, 3.35 TB/s"
    ),
    "h200": ChipPeaks(
        "NVIDIA H200 SXM", 989.5 * TERA, 4800 * GIGA, "NVIDIA H200 datasheet (SXM): 1979 TFLOP/s bf16 sparse, 4.8 TB/s"
    ),
    "a100": ChipPeaks(
        "NVIDIA A100 80GB SXM", 312 * TERA, 2039 * GIGA, "NVIDIA A100 datasheet (80GB SXM): 312 TFLOP/s bf16, 2039 GB/s"
    ),
}


def format_count(value: float, unit: str) -> str:
    """1.2e15, "FLOP" -> "1.20 PFLOP": the largest SI prefix that keeps the number at least 1."""
    for prefix, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def chip_peaks(accelerator: str | None) -> ChipPeaks | None:
    """The `CHIP_PEAKS` entry of an accelerator name of `bltjax.runtime.aot` ("v5p", "h100", ...); None for cpu."""
    return CHIP_PEAKS.get(accelerator) if accelerator else None


def cost_totals(cost: Any) -> tuple[float, float]:
    """(FLOPs, HBM bytes accessed) per device from ``compiled.cost_analysis()`` (a dict, or a list of one)."""
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = cost or {}
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


@dataclasses.dataclass(frozen=True)
class Roofline:
    """The compiled step's work per device, and (with chip peaks) the time and MFU it implies."""

    flops_per_device: float  # XLA's count for one device's program
    bytes_per_device: float  # HBM bytes accessed by one device's program
    devices: int
    model_flops: float  # analytic train FLOPs of one global batch (bltjax.models.flops); 0: unknown
    chip: ChipPeaks | None
    compiler_seconds: float | None = None  # libtpu's own "optimal_seconds" estimate, when it gives one
    matmuls: hlo_loops.MatmulCounts | None = None  # counted from the optimized HLO, when available

    @property
    def loop_factor(self) -> float:
        """How many times more runs than XLA's once-per-loop-body count (measured, else assumed)."""
        if self.matmuls is not None:
            return self.matmuls.loop_factor
        counted = self.flops_per_device * self.devices
        if not self.model_flops or counted <= 0:
            return 1.0
        return max(1.0, self.model_flops / counted)

    @property
    def compute_seconds(self) -> float | None:
        return self.flops_per_device * self.loop_factor / self.chip.bf16_flops if self.chip else None

    @property
    def memory_seconds(self) -> float | None:
        return self.bytes_per_device * self.loop_factor / self.chip.hbm_bytes_per_second if self.chip else None

    @property
    def step_seconds(self) -> float | None:
        """max(compute time, memory time): each device must do both; perfect overlap assumed."""
        if self.chip is None:
            return None
        return max(self.compute_seconds, self.memory_seconds)

    @property
    def bound(self) -> str | None:
        if self.chip is None:
            return None
        return "compute" if self.compute_seconds >= self.memory_seconds else "memory"

    @property
    def mfu(self) -> float | None:
        """Model FLOPs over what the devices could do in the estimated step time."""
        if self.chip is None or not self.model_flops or not self.step_seconds:
            return None
        return self.model_flops / (self.step_seconds * self.chip.bf16_flops * self.devices)

    @property
    def xla_over_model(self) -> float | None:
        """XLA's FLOPs (all devices) over the model FLOPs: recomputation, elementwise and masked work."""
        return self.flops_per_device * self.devices / self.model_flops if self.model_flops else None

    def lines(self) -> list[str]:
        out = [
            f"  compiled step, per device (XLA cost analysis): {format_count(self.flops_per_device, 'FLOP')}, "
            f"{format_count(self.bytes_per_device, 'B')} of memory traffic"
        ]
        if self.model_flops:
            ratio = f" (XLA counts {self.xla_over_model:.2f}x that)" if self.xla_over_model else ""
            if self.loop_factor > 1:
                how = "loop trips counted in the HLO" if self.matmuls is not None else "assumed: no HLO to count"
                ratio += (f"; XLA counts loop bodies once (accumulation, scanned layers): its FLOPs and bytes "
                          f"are scaled by {self.loop_factor:.2f} below ({how})")  # fmt: skip
            model = format_count(self.model_flops, "FLOP")
            out.append(f"  model FLOPs per step (bltjax.flops, analytic): {model}{ratio}")
        if self.matmuls is not None and self.matmuls.kernel_calls:
            out.append(f"  {self.matmuls.kernel_calls} custom-call kernel runs per step (e.g. Pallas attention): "
                       "their FLOPs are in no count, so the compute term is a lower bound")  # fmt: skip
        if self.chip is None:
            out.append("  no peak figures for this target (cpu): no step time or MFU estimate")
            return out
        out.append(
            f"  on {self.chip.name} ({self.chip.bf16_flops / TERA:.0f} TFLOP/s bf16, "
            f"{self.chip.hbm_bytes_per_second / GIGA:.0f} GB/s HBM; {self.chip.source}):"
        )
        out.append(
            f"  step time >= max(compute {self.compute_seconds:.3f} s, memory {self.memory_seconds:.3f} s) = "
            f"{self.step_seconds:.3f} s ({self.bound}-bound)"
        )
        if self.mfu is not None:
            out.append(f"  estimated MFU {100 * self.mfu:.1f} % (model FLOPs / (step time x peak x {self.devices}))")
        if self.compiler_seconds:
            out.append(f"  the compiler's own estimate of the step time: {self.compiler_seconds:.3f} s")
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "flops_per_device": self.flops_per_device,
            "bytes_per_device": self.bytes_per_device,
            "devices": self.devices,
            "model_flops": self.model_flops,
            "chip": dataclasses.asdict(self.chip) if self.chip else None,
            "compute_seconds": self.compute_seconds,
            "memory_seconds": self.memory_seconds,
            "step_seconds": self.step_seconds,
            "bound": self.bound,
            "mfu": self.mfu,
            "loop_factor": self.loop_factor,
            "loop_factor_measured": self.matmuls is not None,
            "kernel_calls": self.matmuls.kernel_calls if self.matmuls is not None else None,
            "compiler_seconds": self.compiler_seconds,
        }


def estimate(
    cost: Any,
    *,
    devices: int,
    chip: ChipPeaks | None,
    model_flops: float = 0.0,
    matmuls: hlo_loops.MatmulCounts | None = None,
) -> Roofline:
    """The roofline of a compiled step from its ``cost_analysis()``, on ``devices`` devices of ``chip``."""
    flops, bytes_accessed = cost_totals(cost)
    single = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
    optimal = float(single.get("optimal_seconds", -1.0))  # libtpu only; negative: no estimate
    return Roofline(flops, bytes_accessed, devices, float(model_flops), chip, optimal if optimal > 0 else None, matmuls)


def model_flops_per_step(config: Any) -> float:
    """Analytic train FLOPs (forward + backward) of one global batch of an experiment config; 0 if unknown."""
    try:
        per_byte = flops.analytic_flops_per_byte(config).train
    except ValueError:  # e.g. a patching mode without an expected patch size
        return 0.0
    row_bytes = float(config.data.seq_len)
    if config.get("model_type") == "token_lm":  # seq_len counts tokens of data.bytes_per_token bytes
        row_bytes *= float(config.data.bytes_per_token)
    return float(per_byte) * int(config.data.batch_size) * row_bytes
