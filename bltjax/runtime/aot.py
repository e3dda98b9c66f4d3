r"""Ahead-of-time compilation of the train step for a target topology: does it shard, does it fit?

  from bltjax.runtime import aot
  report = aot.compile_for_target(config, topology="v5p-128")   # or devices=8, hbm_gib=16

`python -m bltjax.compile` is the command around `compile_for_target`. A pod's first minutes
go to compiling, and an out-of-memory or sharding mistake found then wastes them. This
compiles the exact train step `python -m bltjax.train` would run (same model, optimizer, mesh
rules, batch sharding and donation) for the target's devices, reads the per-device memory of
the compiled program, and raises `CompileError` (or the config / mesh errors) with a clear
message when the mesh does not fit the devices or the batch, when compilation fails, or when
the peak estimate exceeds the device's HBM times ``hbm_fraction``
(`OutOfMemoryError`). Nothing runs and nothing is allocated.

Two compilers (``backend``, default ``auto``: tpu when possible):

* ``tpu``: the real TPU compiler for the target topology, on any machine where the `libtpu`
  package is installed (a CPU box is enough: `jax.experimental.topologies` describes the pod's
  devices without a pod). Memory numbers are those of the TPU program.
* ``cpu``: a fake CPU mesh with the target's device count. Sharding errors and the per-device
  size of the train state are exact; the buffers the CPU compiler plans (temporaries) are an
  estimate of what an accelerator would need. Used for GPU targets, a bare device count, and
  TPU targets without libtpu. The fake devices must exist before jax starts, so run
  `python -m bltjax.compile` as its own process (or give `compile_train_step` devices you
  already have).

Targets (``topology`` names; HBM is the vendor's nominal figure per device, in GiB):

    name             devices           HBM    TPU layout of the devices
    v4-N             N / 2 chips       32     3-D (v4-8: 2x2x1 ... v4-4096: 8x16x16)
    v5p-N            N / 2 chips       95     3-D (v5p-128: 4x4x4)
    v5e-N, v5litepod-N  N chips        16     2-D (v5e-16: 4x4, v5e-256: 16x16)
    v6e-N            N chips           32     2-D
    h100-N, h200-N, a100-N   N GPUs    80 / 141 / 80
    v5p:4x4x8        an explicit TPU layout (any generation above)

For v4 and v5p the number in the name counts TensorCores, two per chip, and a chip is one jax
device (megacore). ``num_slices`` multiplies the devices (multi-slice, over DCN): libtpu
describes every slice's devices (each with its ``slice_index``), the mesh spans the slices on
``config.mesh.dcn_axis`` (`bltjax.training.sharding.make_mesh`), and the report says how.

The report explains its figure: the compiler dumps its buffer assignment into a temporary
folder and `memory_report` lists the buffers live at the compiler's peak, by the jax op that
made them and summed per layer kind (the dump is written only by a real compilation, so
explaining skips the persistent cache). It also carries `roofline`'s estimate: XLA's FLOPs
and HBM bytes per device, the step time they imply on the target's published peaks
(max of compute and memory time) and the MFU of the analytic model FLOPs.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import pathlib
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import ml_collections

from bltjax import kernels
from bltjax.config import validate
from bltjax.models.factory import build_model
from bltjax.runtime import hlo_loops, memory_report, paths, provenance
from bltjax.runtime.atomic import write_atomic
from bltjax.runtime.roofline import Roofline, chip_peaks, estimate, model_flops_per_step
from bltjax.training import sharding
from bltjax.training.optimizer import learning_rate_schedule, make_optimizer
from bltjax.training.state import abstract_state, restore_target, state_placements
from bltjax.training.step import batch_fields, jit_train_step, train_step_of_config

GIB = 1 << 30
DEFAULT_HBM_FRACTION = 0.9  # room for the runtime, fragmentation and the evaluation program


class CompileError(ValueError):
    """The train step cannot be compiled for the target; the message says why and what to change."""


class OutOfMemoryError(CompileError):
    """The compiled train step needs more memory per device than the target has."""


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str
    platform: str  # "tpu" or "gpu"
    hbm_gib: float  # nominal, per jax device
    count_per_device: int  # v5p-128 counts 128 TensorCores = 64 devices
    dims: int  # TPU layout rank (2 or 3); 0 for GPUs
    chip_config: str | None = None  # libtpu's chip configuration ("megacore": one device per chip)


ACCELERATORS = {
    "v4": Accelerator("v4", "tpu", 32, 2, 3, "megacore"),
    "v5p": Accelerator("v5p", "tpu", 95, 2, 3, "megacore"),
    "v5e": Accelerator("v5e", "tpu", 16, 1, 2),
    "v6e": Accelerator("v6e", "tpu", 32, 1, 2),
    "h100": Accelerator("h100", "gpu", 80, 1, 0),
    "h200": Accelerator("h200", "gpu", 141, 1, 0),
    "a100": Accelerator("a100", "gpu", 80, 1, 0),
}
ALIASES = {"v5litepod": "v5e"}
# Slice shapes of the Cloud TPU documentation, by chip count.
LAYOUTS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}  # fmt: skip
LAYOUTS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


@dataclasses.dataclass(frozen=True)
class Target:
    """What to compile for: a device count, a per-device memory, and (TPU) the physical layout."""

    name: str
    platform: str  # "tpu", "gpu" or "cpu" (a bare --devices count)
    devices: int
    hbm_bytes: int
    tpu_layout: str | None = None  # e.g. "v5p:4x4x4", for jax.experimental.topologies
    chip_config: str | None = None
    num_slices: int = 1
    accelerator: str | None = None  # an ACCELERATORS key, for the roofline's peak figures


def _known() -> str:
    names = sorted([*ACCELERATORS, *ALIASES])
    return ", ".join(f"{n}-N" for n in names) + ", or a TPU layout such as v5p:4x4x8"


def parse_topology(text: str, num_slices: int = 1) -> Target:
    """`v5p-128`, `v5litepod-16`, `h100-32` or `v5p:4x4x8` -> a Target (the module docstring's table)."""
    if num_slices < 1:
        raise CompileError(f"--num-slices: expected a positive integer, got {num_slices}")
    layout_match = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+){1,2})", text)
    count_match = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    match = layout_match or count_match
    generation = ALIASES.get(match.group(1), match.group(1)) if match else None
    accel = ACCELERATORS.get(generation) if generation else None
    if accel is None:
        raise CompileError(f"--topology: unknown target {text!r}; expected one of {_known()}")
    hbm = int(accel.hbm_gib * GIB)
    if layout_match:
        if accel.platform != "tpu":
            raise CompileError(f"--topology {text!r}: an explicit layout is for TPUs; use {accel.name}-N for GPUs")
        sizes = [int(n) for n in layout_match.group(2).split("x")]
        if len(sizes) != accel.dims:
            raise CompileError(f"--topology {text!r}: {accel.name} layouts have {accel.dims} dimensions")
        chips = math.prod(sizes)
        layout = f"{accel.name}:{layout_match.group(2)}"
    else:
        count = int(count_match.group(2))
        if count % accel.count_per_device or count == 0:
            raise CompileError(f"--topology {text!r}: the number of a {accel.name} name counts TensorCores, "
                               f"a multiple of {accel.count_per_device}")  # fmt: skip
        chips = count // accel.count_per_device
        layout = None
        if accel.platform == "tpu":
            table = LAYOUTS_3D if accel.dims == 3 else LAYOUTS_2D
            if chips not in table:
                raise CompileError(
                    f"--topology {text!r}: no standard {accel.name} layout for {chips} chips (known: "
                    f"{sorted(table)}); give it explicitly, e.g. {accel.name}:{next(iter(table.values()))}"
                )
            layout = f"{accel.name}:{table[chips]}"
    return Target(text, accel.platform, chips * num_slices, hbm, layout, accel.chip_config, num_slices, accel.name)


def device_count_target(devices: int, hbm_gib: float | None) -> Target:
    """`--devices N`: a fake CPU mesh of N devices, with the given HBM (default: unlimited)."""
    if devices < 1:
        raise CompileError(f"--devices: expected a positive integer, got {devices}")
    hbm = int(hbm_gib * GIB) if hbm_gib else 0
    return Target(f"{devices} devices", "cpu", devices, hbm)


# --- devices ------------------------------------------------------------------------------------


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def choose_backend(target: Target, requested: str = "auto") -> str:
    """The compiler to use: tpu (libtpu's, for a TPU target) or cpu (a fake CPU mesh)."""
    if requested not in ("auto", "tpu", "cpu"):
        raise CompileError(f"--backend: expected auto, tpu or cpu, got {requested!r}")
    if requested == "tpu":
        if target.platform != "tpu":
            raise CompileError(f"--backend tpu: {target.name} is not a TPU target")
        if not libtpu_available():
            raise CompileError("--backend tpu needs the libtpu package (pip install libtpu); or use --backend cpu")
        return "tpu"
    if requested == "auto" and target.platform == "tpu" and libtpu_available():
        return "tpu"
    return "cpu"


def tpu_devices(target: Target) -> list[Any]:
    """The target's TPU devices, described by libtpu without any TPU attached."""
    from jax.experimental import topologies

    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # not on a TPU VM: don't ask the metadata server
    options: dict[str, Any] = {}
    if target.chip_config:
        options["chip_config_name"] = target.chip_config
    if target.num_slices > 1:
        options["num_slices"] = target.num_slices
    shape = [int(n) for n in str(target.tpu_layout).split(":")[1].split("x")]
    if len(shape) == 2 and math.prod(shape) <= 8:
        options["chips_per_host_bounds"] = (*shape, 1)  # a single-host v5e / v6e slice
    try:
        description = topologies.get_topology_desc(topology_name=target.tpu_layout, platform="tpu", **options)
    except Exception as err:  # libtpu raises its own runtime errors
        raise CompileError(f"libtpu cannot describe {target.tpu_layout} ({target.name}): {err}") from err
    devices = list(description.devices)
    if len(devices) != target.devices:
        raise CompileError(f"libtpu describes {len(devices)} devices for {target.name}, expected {target.devices}")
    return devices


def use_fake_cpu_devices(count: int) -> None:
    """Makes jax start with `count` CPU devices; must run before anything initialises a backend."""
    try:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError as err:
        raise CompileError(
            f"jax has already started with {len(jax.devices())} devices; run python -m bltjax.compile as its own "
            f"process to get {count} fake CPU devices ({err})"
        ) from err


# --- the compilation ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """Per-device memory of the compiled train step (bytes), and whether it fits the limit."""

    target: str
    backend: str
    devices: int
    mesh: dict[str, int]
    batch_shape: tuple[int, int]
    state_bytes: int  # parameters + optimizer state + step, this device's shards
    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs written into donated inputs (the new state into the old)
    temp_bytes: int
    code_bytes: int
    limit_bytes: int  # 0: no limit
    compile_seconds: float
    breakdown: memory_report.MemoryBreakdown | None = None  # what is live at the peak, by source
    breakdown_note: str = ""  # why there is no breakdown
    roofline: Roofline | None = None
    slices: str = ""  # the multi-slice layout (sharding.SliceLayout.describe); "" for one slice

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return self.limit_bytes == 0 or self.peak_bytes <= self.limit_bytes

    def to_json(self) -> dict[str, Any]:
        plain = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        plain.update(
            breakdown=self.breakdown.to_json() if self.breakdown else None,
            roofline=self.roofline.to_json() if self.roofline else None,
        )
        return {**plain, "peak_bytes": self.peak_bytes, "fits": self.fits, "table": self.table()}

    def table(self) -> str:
        rows = [
            ("train state (params + Adam moments)", self.state_bytes),
            ("arguments (state + batch)", self.argument_bytes),
            ("outputs (new state + metrics)", self.output_bytes),
            ("aliased outputs (donated state)", -self.alias_bytes),
            ("temporaries (activations, gradients)", self.temp_bytes),
            ("generated code", self.code_bytes),
            ("peak estimate", self.peak_bytes),
        ]
        if self.limit_bytes:
            rows.append(("limit", self.limit_bytes))
        width = max(len(name) for name, _ in rows)
        lines = [f"  {name:<{width}}  {format_bytes(value):>12}" for name, value in rows]
        head = (f"train step compiled for {self.target} ({self.devices} devices, {self.backend} compiler) in "
                f"{self.compile_seconds:.1f} s; mesh {self.mesh}; global batch {self.batch_shape[0]} x "
                f"{self.batch_shape[1]} bytes\n")  # fmt: skip
        head += (f"{self.slices}\n" if self.slices else "") + "per device:"
        verdict = "no memory limit given" if not self.limit_bytes else (
            f"fits: {100 * self.peak_bytes / self.limit_bytes:.1f} % of the limit"
            if self.fits else "DOES NOT FIT")  # fmt: skip
        parts = [head, *lines, verdict]
        if self.breakdown is not None:
            parts.append(self.breakdown.table(top=10, format_bytes=format_bytes))
        elif self.breakdown_note:
            parts.append(f"no per-buffer breakdown: {self.breakdown_note}")
        if self.roofline is not None:
            parts += ["roofline:", *self.roofline.lines()]
        return "\n".join(parts)


def run_record(command: str) -> dict[str, Any]:
    """When, where and with which compilers a report was made: the provenance its JSON carries."""
    versions = {}
    for package in ("jax", "jaxlib", "libtpu"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None  # e.g. no libtpu: the report is XLA:CPU's
    return {
        **provenance.run_stamp(),
        "command": command,
        "versions": versions,
    }


def format_bytes(value: int) -> str:
    sign, value = ("-" if value < 0 else ""), abs(value)
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{sign}{value / size:.2f} {unit}"
    return f"{sign}{value} B"


def _abstract_batch(config: ml_collections.ConfigDict, batch_sharding: Any) -> dict[str, jax.ShapeDtypeStruct]:
    rows, n = int(config.data.batch_size), int(config.data.seq_len)
    dtypes = {"tokens": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.bool_, "patch_lengths": jnp.int32,
              "target_bytes": jnp.int32}  # fmt: skip
    shapes = {"patch_lengths": (rows, int(config.data.get("max_patches", 0) or 0))}
    return {
        name: jax.ShapeDtypeStruct(shapes.get(name, (rows, n)), dtypes[name], sharding=batch_sharding)
        for name in batch_fields(config.model_type)
    }


def _shard_bytes(tree: Any) -> int:
    return sum(
        math.prod(leaf.sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
        for leaf in jax.tree.leaves(tree)
    )


def _advice(config: ml_collections.ConfigDict) -> str:
    return (f"Shard more (config.mesh.fsdp / config.mesh.tensor), lower config.data.batch_size (now "
            f"{config.data.batch_size}) or raise config.train.grad_accum (now {config.train.grad_accum}), or set "
            "config.model.remat='block'")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Everything the compilation needs, built without compiling or allocating anything."""

    config: ml_collections.ConfigDict  # with hash_rows_multiple resolved for the mesh
    mesh: Any
    model: Any
    optimizer: Any
    state: Any  # ShapeDtypeStructs carrying the state's shardings
    shardings: Any

    @property
    def state_bytes(self) -> int:
        """This device's share of the train state (parameters, Adam moments, step)."""
        return _shard_bytes(self.state)


def plan_step(config: ml_collections.ConfigDict, devices: Sequence[Any]) -> StepPlan:
    """The mesh and the sharded abstract state of `python -m bltjax.train` on `devices` (instant)."""
    config = ml_collections.ConfigDict(config.to_dict())
    validate(config)
    mesh = sharding.make_mesh(config, devices)  # MeshError names config.mesh
    sharding.check_batch(config, mesh)
    if config.model_type == "blt" and config.model.hash_rows_multiple == 1:
        config.model.hash_rows_multiple = sharding.hash_rows_multiple(mesh)  # as a first launch does
    model = build_model(config)
    optimizer = make_optimizer(config)
    abstract = abstract_state(model, optimizer, config)
    shardings = sharding.shardings_of(state_placements(abstract, mesh), mesh)
    return StepPlan(config, mesh, model, optimizer, restore_target(abstract, shardings), shardings)


def _as_text(compiled: Any) -> str | None:
    """The compiled program's optimized HLO, where this jaxlib can print it (not libtpu's)."""
    try:
        return compiled.as_text()
    except Exception:  # libtpu's HLO cannot be parsed back by this jaxlib
        return None


def compile_train_step(
    config: ml_collections.ConfigDict,
    devices: Sequence[Any],
    *,
    target: str,
    backend: str,
    hbm_bytes: int = 0,
    hbm_fraction: float = DEFAULT_HBM_FRACTION,
    accelerator: str | None = None,
    explain: bool = True,
) -> CompileReport:
    """Compiles `python -m bltjax.train`'s step for `devices`; raises CompileError / OutOfMemoryError early.

    Order: config and mesh checks (instant), then the train state's per-device size against the
    limit (instant), then the compilation (seconds to minutes), then the compiled peak. With
    ``explain`` the compiler also dumps its buffer assignment, which `memory_report` reads into
    the report's per-buffer breakdown; ``accelerator`` (an `ACCELERATORS` key) selects the
    peak figures of the roofline estimate (none for a bare CPU device count).
    """
    if not 0 < hbm_fraction <= 1:
        raise CompileError(f"--hbm-fraction: expected a number in (0, 1], got {hbm_fraction}")
    limit = int(hbm_bytes * hbm_fraction)
    plan = plan_step(config, devices)
    config, mesh = plan.config, plan.mesh
    state_bytes = plan.state_bytes
    where = f"{target} ({len(devices)} devices, mesh {dict(mesh.shape)})"
    if limit and state_bytes > limit:
        raise OutOfMemoryError(
            f"{where}: the train state alone needs {format_bytes(state_bytes)} per device, more than the limit "
            f"{format_bytes(limit)} ({format_bytes(hbm_bytes)} x {hbm_fraction:g}); found before compiling. "
            + _advice(config)
        )
    batch_sharding = sharding.batch_sharding(mesh)
    step = train_step_of_config(config, plan.model, plan.optimizer, learning_rate_schedule(config), batch_sharding)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bltjax_compile_") as dump_dir:
        try:
            # Traced as for the target's platform, so that `model.attention="auto"` picks the
            # target's kernels (splash on TPU) although this host is a CPU.
            with kernels.compiling_for(devices[0].platform):
                lowered = jit_train_step(step, plan.shardings, batch_sharding).lower(
                    plan.state, _abstract_batch(config, batch_sharding)
                )
            compiled = memory_report.compile_with_dump(lowered, dump_dir) if explain else lowered.compile()
        except Exception as err:  # XLA reports sharding and resource errors as runtime errors
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            text = str(err)
            kind = OutOfMemoryError if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() else CompileError
            raise kind(f"{where}: compiling the train step failed: {message}") from err
        seconds = time.perf_counter() - start
        breakdown = memory_report.read_dump(dump_dir, "train_step") if explain else None
        hlo_text = memory_report.optimized_hlo_text(dump_dir, "train_step") if explain else _as_text(compiled)
    note = "not asked for (--noexplain)" if not explain else "" if breakdown else "the compiler wrote no buffer dump"
    stats = compiled.memory_analysis()
    roof = estimate(
        compiled.cost_analysis(),
        devices=len(devices),
        chip=chip_peaks(accelerator),
        model_flops=model_flops_per_step(config),
        matmuls=hlo_loops.count_matmuls(hlo_text) if hlo_text else None,
    )
    report = CompileReport(
        target=target,
        backend=backend,
        devices=len(devices),
        mesh={k: int(v) for k, v in mesh.shape.items()},
        batch_shape=(int(config.data.batch_size), int(config.data.seq_len)),
        state_bytes=state_bytes,
        argument_bytes=int(getattr(stats, "argument_size_in_bytes", 0)),
        output_bytes=int(getattr(stats, "output_size_in_bytes", 0)),
        alias_bytes=int(getattr(stats, "alias_size_in_bytes", 0)),
        temp_bytes=int(getattr(stats, "temp_size_in_bytes", 0)),
        code_bytes=int(getattr(stats, "generated_code_size_in_bytes", 0)),
        limit_bytes=limit,
        compile_seconds=seconds,
        breakdown=breakdown,
        breakdown_note=note,
        roofline=roof,
        slices=_slices_text(mesh, config),
    )
    return report


def _slices_text(mesh: Any, config: ml_collections.ConfigDict) -> str:
    layout = sharding.mesh_slices(mesh, config)
    return layout.describe() if layout.num_slices > 1 else ""


def check_fits(report: CompileReport, config: ml_collections.ConfigDict) -> None:
    """Raises OutOfMemoryError naming the sizes when the compiled peak exceeds the limit."""
    if report.fits:
        return
    raise OutOfMemoryError(
        f"{report.target} ({report.devices} devices, mesh {report.mesh}): the compiled train step needs about "
        f"{format_bytes(report.peak_bytes)} per device (state {format_bytes(report.state_bytes)}, temporaries "
        f"{format_bytes(report.temp_bytes)}), more than the limit {format_bytes(report.limit_bytes)}. "
        + _advice(config)
    )


def compile_for_target(
    config: ml_collections.ConfigDict,
    *,
    topology: str | None = None,
    devices: int | None = None,
    num_slices: int | None = None,
    hbm_gib: float | None = None,
    hbm_fraction: float = DEFAULT_HBM_FRACTION,
    backend: str = "auto",
    out: str | pathlib.Path | None = None,
    console: TextIO = sys.stdout,
    explain: bool = True,
    command: str = "",
) -> CompileReport:
    """Compiles the train step for a `topology` name or a bare `devices` count (exactly one).

    Prints what it compiles for and the memory table to ``console``, writes the report as JSON
    to ``out`` (atomically; with the date, machine, compiler versions and ``command``, so a
    document quoting it can say where it came from), then raises OutOfMemoryError when the
    peak exceeds the limit.
    ``num_slices`` (default: ``config.mesh.num_slices``) copies of the target, joined over DCN,
    are compiled for as `python -m bltjax.train` would run on them.
    """
    if (topology is None) == (devices is None):
        raise CompileError("give exactly one of --topology (e.g. v5p-128) and --devices N")
    configured = int(config.mesh.get("num_slices", 1))
    if num_slices is None:
        num_slices = configured
    elif num_slices < 1:
        raise CompileError(f"--num-slices: expected a positive integer, got {num_slices}")
    elif configured not in (1, num_slices):
        raise CompileError(f"--num-slices {num_slices} disagrees with config.mesh.num_slices={configured}")
    config = ml_collections.ConfigDict(config.to_dict())
    config.mesh.num_slices = num_slices  # the train step of a run on that many slices
    if devices is not None and num_slices > 1:
        devices *= num_slices  # --devices counts one slice, as --topology names one
    target = parse_topology(topology, num_slices) if topology is not None else device_count_target(devices, hbm_gib)
    hbm = int(hbm_gib * GIB) if hbm_gib else target.hbm_bytes
    backend = choose_backend(target, backend)
    if backend == "tpu":
        jax.config.update("jax_platforms", "cpu")  # the host runs nothing; libtpu only compiles
        compile_devices = tpu_devices(target)
    else:
        use_fake_cpu_devices(target.devices)
        compile_devices = jax.devices("cpu")[: target.devices]
        if len(compile_devices) != target.devices:
            raise CompileError(f"got {len(compile_devices)} CPU devices, expected {target.devices}")
    estimate = "" if backend == "tpu" or target.platform == "cpu" else " (fake CPU devices: memory is an estimate)"
    limit = format_bytes(hbm) if hbm else "no"
    print(f"compiling the train step for {target.name}: {target.devices} devices, {limit} memory limit per device x "
          f"{hbm_fraction:g}, {backend} compiler{estimate}", file=console, flush=True)  # fmt: skip
    report = compile_train_step(
        config,
        compile_devices,
        target=target.name,
        backend=backend,
        hbm_bytes=hbm,
        hbm_fraction=hbm_fraction,
        accelerator=target.accelerator,
        explain=explain,
    )
    print(report.table(), file=console, flush=True)
    if out:
        path = paths.resolve(out)  # the report may go to a bucket next to the run
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {**run_record(command), **report.to_json()}
        write_atomic(path, (json.dumps(record, indent=2) + "\n").encode())
    check_fits(report, config)
    return report
