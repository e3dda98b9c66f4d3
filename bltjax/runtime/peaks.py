"""Peak FLOP/s of the devices a job runs on, and MFU: the device half of model FLOPs utilisation.

  from bltjax.runtime import peaks
  peak, source = peaks.peak_flops_total(jax.devices(), "bfloat16")
  peaks.mfu(train_flops_per_byte, bytes_per_second, peak)

`peak_flops_per_device` reads a table of published dense peaks keyed by
``jax.Device.device_kind`` and otherwise measures a jitted matmul (`measured_matmul_peak`);
`peak_flops_total` gives the whole job's peak, counting a CPU host once however many fake
devices it exposes. The FLOPs per byte come from `bltjax.models.flops`.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from bltjax.runtime import xla_options


def mfu(train_flops_per_byte: float, bytes_per_second: float, peak_flops_per_second: float) -> float:
    """Model FLOPs utilisation in [0, 1]: achieved training FLOP/s over the job's peak."""
    return train_flops_per_byte * bytes_per_second / peak_flops_per_second


# Dense (no 2:4 sparsity) peak FLOP/s per JAX device. TPU v4 and later expose one device per
# chip. "float32" on NVIDIA is the TF32 tensor-core peak, which XLA uses for float32 matmuls at
# JAX's default precision; with jax_default_matmul_precision = "highest" the table is skipped
# and the peak is measured. TPU float32 throughput depends on the precision passes: measured.
# Sources: NVIDIA datasheets list peaks "with sparsity"; the dense peak is half.
_PEAKS: dict[str, tuple[dict[str, float], str]] = {
    "tpu_v4": ({"bfloat16": 275e12}, "cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16 per chip"),
    "tpu_v5e": ({"bfloat16": 197e12}, "cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16 per chip"),
    "tpu_v5p": ({"bfloat16": 459e12}, "cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16 per chip"),
    "tpu_v6e": ({"bfloat16": 918e12}, "cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16 per chip"),
    "nvidia_h100_sxm": (
        {"bfloat16": 989.5e12, "float32": 494.5e12},
        "NVIDIA H100 datasheet (SXM): BF16 1979, TF32 989 TFLOP/s with sparsity",
    ),
    "nvidia_h100_pcie": (
        {"bfloat16": 756.5e12, "float32": 378e12},
        "NVIDIA H100 datasheet (PCIe): BF16 1513, TF32 756 TFLOP/s with sparsity",
    ),
    "nvidia_h200": (
        {"bfloat16": 989.5e12, "float32": 494.5e12},
        "NVIDIA H200 datasheet (SXM): BF16 1979, TF32 989 TFLOP/s with sparsity",
    ),
    "nvidia_a100": (
        {"bfloat16": 312e12, "float32": 156e12},
        "NVIDIA A100 datasheet: BF16 312, TF32 156 TFLOP/s dense",
    ),
}


def device_family(device_kind: str) -> str | None:
    """The `_PEAKS` key of a ``jax.Device.device_kind`` string, or None when unknown."""
    kind = device_kind.lower().strip()
    if kind == "tpu v4":
        return "tpu_v4"
    if kind in ("tpu v5 lite", "tpu v5e", "tpu v5litepod"):
        return "tpu_v5e"
    if kind in ("tpu v5", "tpu v5p"):
        return "tpu_v5p"
    if kind in ("tpu v6 lite", "tpu v6e"):
        return "tpu_v6e"
    if kind.startswith("nvidia h100"):
        return "nvidia_h100_pcie" if "pcie" in kind else "nvidia_h100_sxm"
    if kind.startswith("nvidia h200"):
        return "nvidia_h200"
    if kind.startswith("nvidia a100"):
        return "nvidia_a100"
    return None


def _dtype_name(dtype: Any) -> str:
    return jnp.dtype(dtype).name


def _timed_matmul(dtype_name: str, size: int, device: jax.Device) -> float:
    matmul = xla_options.jit(jnp.matmul, [device])  # the options the train step compiles with
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(key_a, (size, size), dtype_name), device)
    b = jax.device_put(jax.random.normal(key_b, (size, size), dtype_name), device)
    matmul(a, b).block_until_ready()  # compile and warm up
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


@functools.cache
def _measured(dtype_name: str, size: int, device: jax.Device) -> float:
    return _timed_matmul(dtype_name, size, device)


def measured_matmul_peak(dtype: Any = "float32", size: int = 1024, device: jax.Device | None = None) -> float:
    """FLOP/s of a jitted ``size``³ matmul on ``device`` (best of 5 after a warm-up), cached per process.

    On CPU this is the whole host (XLA's thread pool spans every core), not one fake device.
    1024³ is large enough to reach the host's matmul rate and small enough that the measurement,
    compile included, costs a fraction of a second (docs/design.md, "Programs and library").
    """
    device = device or jax.local_devices()[0]
    return _measured(_dtype_name(dtype), int(size), device)


def _table_peak(device: jax.Device, dtype_name: str) -> tuple[float, str] | None:
    family = device_family(getattr(device, "device_kind", ""))
    if family is None:
        return None
    if dtype_name == "float32" and str(jax.config.jax_default_matmul_precision) in ("highest", "float32"):
        return None
    peaks, source = _PEAKS[family]
    if dtype_name not in peaks:
        return None
    return peaks[dtype_name], f"table: {device.device_kind} {dtype_name} ({source})"


def peak_flops_per_device(device: jax.Device, dtype: Any = "bfloat16") -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from) for one device and matmul dtype.

    Known accelerators come from the table; anything else (CPU, unknown kinds, TPU float32) is
    measured on a local device of the same kind. For CPU devices the value is the host's peak.
    """
    dtype_name = _dtype_name(dtype)
    known = _table_peak(device, dtype_name)
    if known is not None:
        return known
    local_devices = jax.local_devices()
    if device not in local_devices:  # another host's device (or a description of one): measure a local twin
        device = next((d for d in local_devices if d.device_kind == device.device_kind), local_devices[0])
    source = f"measured: 1024^3 {dtype_name} matmul on {device.device_kind}"
    return measured_matmul_peak(dtype_name, device=device), source


def peak_flops_total(devices: Iterable[jax.Device] | None = None, dtype: Any = "bfloat16") -> tuple[float, str]:
    """The whole job's peak FLOP/s: accelerators add up, a CPU host counts once per process.

    With ``--xla_force_host_platform_device_count=8`` one host exposes 8 CPU devices that share
    the same cores, so their peak is the host's measured peak, not 8 times it.
    """
    devices: Sequence[jax.Device] = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("peak_flops_total: expected at least one device")
    total, sources = 0.0, []
    cpu_processes: set[int] = set()
    for device in devices:
        if device.platform == "cpu":
            if device.process_index in cpu_processes:
                continue
            cpu_processes.add(device.process_index)
        value, source = peak_flops_per_device(device, dtype)
        total += value
        if source not in sources:
            sources.append(source)
    count = f"{len(cpu_processes)} CPU host(s)" if cpu_processes else f"{len(devices)} device(s)"
    return total, f"{count}; " + "; ".join(sources)
