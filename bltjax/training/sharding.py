"""The device mesh and how every parameter and batch is laid out on it.

    mesh axes   data    -- pure data parallelism: parameters replicated
                fsdp    -- data parallelism whose parameters (and optimizer state) are sharded
                tensor  -- model parallelism inside a layer (heads, MLP width, hash rows)

Modules name the axes of their parameters logically ("embed", "heads", "mlp", ...; see
`models/layers.py`) and `LOGICAL_RULES` maps those names onto mesh axes, in one table that
`format_rules` prints at start-up (MaxText's approach). A dimension that the mesh cannot
divide evenly is replicated instead, and reported, so any config runs on any mesh.

The same table names the activations (`bltjax.models.partitioning.constrain`): "batch",
"length" (bytes of a row), "patches" and the "act_*" feature axes. Activation features have
their own names because a parameter's "embed" is split over fsdp, which the batch already uses.
`activation_rules` can split long byte rows along their length over one mesh axis
(``config.mesh.sequence``), taking that axis away from the batch.

The mesh uses `AxisType.Auto`: Linen's logical partitioning is GSPMD-style and fails on the
Explicit axes that `jax.make_mesh` defaults to in this jax version.

Multi-slice (``config.mesh.num_slices`` > 1): the slices of a TPU job talk over the data-center
network (DCN), an order of magnitude slower than the chips' ICI links inside a slice. One mesh
axis, ``config.mesh.dcn_axis`` ("data" by default: one gradient all-reduce per step crosses
it), spans the slices. The sizes in ``config.mesh`` describe one slice and the DCN axis is
multiplied by the slice count (`mesh_shape`), so a config sized for a slice runs on several; the
device array is one ICI block per slice (`hybrid_device_array`). Every other axis stays inside a slice.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axes (None: replicated). Order matters only for readability.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("patch_slots", "tensor"),
    # Hash tables split their rows over "tensor" and their width over "fsdp", never their rows over
    # the batch's axis: the lookup's SPMD partition then replicated the indices, and every chip
    # gathered every row of the micro-batch from its shard of every table, [tables, rows, bytes,
    # width] in float32 (docs/design.md, "Where the pod memory went").
    ("hash_rows", "tensor"),
    ("head_dim", None),
    ("vocab", None),
    ("norm", None),
    ("hash_tables", None),
    ("hash_embed", "fsdp"),
    # activations
    ("length", None),
    ("patches", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_vocab", None),
)


class MeshError(ValueError):
    """A mesh shape that does not fit the devices or the batch; names the config field."""


def activation_rules(sequence_axis: str | None = None) -> tuple[tuple[str, Any], ...]:
    """`LOGICAL_RULES`, or with byte rows split along "length" over ``sequence_axis`` (no longer a batch axis)."""
    if sequence_axis is None:
        return LOGICAL_RULES
    if sequence_axis not in MESH_AXES:
        raise MeshError(f"config.mesh.sequence: expected None or one of {MESH_AXES}, got {sequence_axis!r}")
    batch = tuple(axis for axis in BATCH_AXES if axis != sequence_axis) or None
    changed = {"batch": batch, "length": sequence_axis}
    return tuple((name, changed.get(name, entry)) for name, entry in LOGICAL_RULES)


def mesh_shape(config: ml_collections.ConfigDict, n_devices: int) -> dict[str, int]:
    """Resolves `config.mesh` (-1 = the remaining devices) against the number of devices.

    With ``config.mesh.num_slices`` = S > 1 the sizes describe one slice (n_devices / S devices)
    and the DCN axis is multiplied by S, so a config sized for one slice runs unchanged on S of them.
    """
    num_slices = int(config.mesh.get("num_slices", 1))
    if n_devices % num_slices:
        raise MeshError(f"config.mesh.num_slices: {n_devices} devices do not split into {num_slices} equal slices")
    per_slice = n_devices // num_slices
    where = f"{per_slice} devices per slice" if num_slices > 1 else f"{n_devices} devices"
    sizes = {axis: int(config.mesh[axis]) for axis in MESH_AXES}
    fixed = math.prod(size for size in sizes.values() if size != -1)
    for axis, size in sizes.items():
        if size == -1:
            if per_slice % fixed:
                raise MeshError(f"config.mesh: the fixed axes ({fixed} devices) do not divide {where}")
            sizes[axis] = per_slice // fixed
    if math.prod(sizes.values()) != per_slice:
        raise MeshError(
            f"config.mesh: data x fsdp x tensor = {math.prod(sizes.values())} devices {sizes}, but there are "
            f"{where}; set one axis to -1 to fill"
        )
    if num_slices > 1:
        sizes[slice_axis(config)] *= num_slices
    return sizes


def slice_axis(config: ml_collections.ConfigDict) -> str:
    """The mesh axis that spans the slices (``config.mesh.dcn_axis``; configs from before it: "data")."""
    axis = config.mesh.get("dcn_axis", "data")
    if axis not in MESH_AXES:
        raise MeshError(f"config.mesh.dcn_axis: expected one of {MESH_AXES}, got {axis!r}")
    return axis


@dataclasses.dataclass(frozen=True)
class SliceLayout:
    """How the mesh splits over slices: ``dcn`` (slices per axis) x ``ici`` (devices per axis inside a slice)."""

    num_slices: int
    dcn_axis: str
    ici: dict[str, int]
    dcn: dict[str, int]

    def describe(self) -> str:
        per_slice = " x ".join(f"{axis} {self.ici[axis]}" for axis in MESH_AXES)
        axis, whole = self.dcn_axis, self.ici[self.dcn_axis] * self.num_slices
        return (f"{self.num_slices} slices over DCN on axis {axis!r} ({axis} {whole} = {self.num_slices} slices x "
                f"{self.ici[axis]}); inside each slice (ICI): {per_slice}")  # fmt: skip


def slice_layout(config: ml_collections.ConfigDict, sizes: dict[str, int]) -> SliceLayout:
    """Splits resolved mesh ``sizes`` into per-slice (ICI) and across-slice (DCN) shapes."""
    num_slices, dcn_axis = int(config.mesh.get("num_slices", 1)), slice_axis(config)
    if sizes[dcn_axis] % num_slices:
        raise MeshError(f"config.mesh.{dcn_axis}: {sizes[dcn_axis]} is not a multiple of {num_slices} slices")
    ici = {axis: size // num_slices if axis == dcn_axis else size for axis, size in sizes.items()}
    dcn = {axis: num_slices if axis == dcn_axis else 1 for axis in MESH_AXES}
    return SliceLayout(num_slices, dcn_axis, ici, dcn)


def device_slices(devices: Sequence[Any], num_slices: int) -> list[list[Any]]:
    """The devices of each slice, in slice order.

    TPU devices of a multi-slice job carry ``slice_index``. Others (GPU nodes, CPU rehearsals)
    have none; they are cut into ``num_slices`` equal runs in (process, id) order, so that a
    "slice" is a set of whole hosts, as on a cluster whose nodes are joined by a slower network.
    """
    devices = list(devices)
    if all(hasattr(d, "slice_index") for d in devices):
        groups: dict[int, list[Any]] = {}
        for device in devices:
            groups.setdefault(int(device.slice_index), []).append(device)
        if len(groups) != num_slices:
            raise MeshError(
                f"config.mesh.num_slices: expected the slice count of the devices, {len(groups)} (their "
                f"slice_index), got {num_slices}"
            )
        slices = [groups[key] for key in sorted(groups)]
        sizes = {len(group) for group in slices}
        if len(sizes) != 1:
            raise MeshError(f"config.mesh.num_slices: the slices have different device counts {sorted(sizes)}")
        return slices
    if len(devices) % num_slices:
        raise MeshError(f"config.mesh.num_slices: {len(devices)} devices do not split into {num_slices} equal slices")
    ordered = sorted(devices, key=lambda d: (getattr(d, "process_index", 0), d.id))
    per_slice = len(ordered) // num_slices
    return [ordered[i * per_slice : (i + 1) * per_slice] for i in range(num_slices)]


def hybrid_device_array(devices: Sequence[Any], layout: SliceLayout) -> np.ndarray:
    """The device array of a multi-slice mesh: one ICI block per slice, the blocks stacked along the DCN axis.

    Inside a slice, jax orders TPU devices along the physical torus (`mesh_utils.create_device_mesh`);
    devices without a physical layout keep their order.
    """
    ici_shape = tuple(layout.ici[axis] for axis in MESH_AXES)
    blocks = []
    for group in device_slices(devices, layout.num_slices):
        if group[0].platform == "tpu":
            blocks.append(mesh_utils.create_device_mesh(ici_shape, group, allow_split_physical_axes=True))
        else:
            blocks.append(np.array(group, dtype=object).reshape(ici_shape))
    return np.concatenate(blocks, axis=MESH_AXES.index(layout.dcn_axis))


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ('data', 'fsdp', 'tensor') mesh of `config.mesh` over all (or the given) devices.

    With ``config.mesh.num_slices`` > 1 the device array is `hybrid_device_array`'s (module docstring).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(config, len(devices))
    layout = slice_layout(config, sizes)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if layout.num_slices == 1:
        if len({getattr(d, "slice_index", 0) for d in devices}) > 1:
            raise MeshError(
                "config.mesh.num_slices: the devices span "
                f"{len({d.slice_index for d in devices})} slices (slice_index); expected that count, got 1"
            )
        shape = tuple(sizes[axis] for axis in MESH_AXES)
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    return Mesh(hybrid_device_array(devices, layout), MESH_AXES, axis_types=axis_types)


def mesh_slices(mesh: Mesh, config: ml_collections.ConfigDict) -> SliceLayout:
    """The slice layout of a mesh built by `make_mesh` from ``config``."""
    return slice_layout(config, {axis: int(mesh.shape[axis]) for axis in MESH_AXES})


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch axis is split."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def check_batch(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """Every micro-batch must split evenly over the batch axes (data x fsdp)."""
    micro = config.data.batch_size // config.train.grad_accum
    shards = batch_shards(mesh)
    if micro % shards:
        raise MeshError(
            f"config.data.batch_size: {config.data.batch_size} rows / grad_accum {config.train.grad_accum} = {micro} "
            f"rows per micro-batch, not divisible by the {shards} batch shards of mesh {dict(mesh.shape)}"
        )


# What `hash_rows_multiple` pads the table rows to: fsdp x tensor, from when the rows were split
# over both, so that runs keep the parameter shapes (and checkpoints) they always had.
HASH_ROW_PADDING_AXES = ("fsdp", "tensor")


def hash_rows_multiple(mesh: Mesh) -> int:
    """The row padding of the hash tables (a multiple of every axis their rows may be split over)."""
    return math.prod(mesh.shape[axis] for axis in HASH_ROW_PADDING_AXES)


def _mesh_axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one parameter lives: its mesh spec, and any dimension left replicated because of size."""

    path: str
    shape: tuple[int, ...]
    spec: P
    replicated_dims: tuple[int, ...]


def _fit(shape: tuple[int, ...], spec: P, mesh: Mesh) -> tuple[P, tuple[int, ...]]:
    """Drops mesh axes from dimensions they do not divide (replicating those dimensions)."""
    entries, dropped = [], []
    for dim, entry in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = _mesh_axes(entry)
        ways = math.prod(mesh.shape[a] for a in axes)
        if axes and shape[dim] % ways:
            entries.append(None)
            dropped.append(dim)
        else:
            entries.append(entry)
    return P(*entries), tuple(dropped)


def _path_name(path: tuple) -> str:
    return "/".join(str(getattr(key, "key", getattr(key, "name", key))) for key in path)


def placements(abstract_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Any:
    """A tree of `Placement` for a tree of (possibly logically boxed) abstract arrays."""
    logical_specs = nn.get_partition_spec(abstract_tree)
    mesh_specs = nn.logical_to_mesh(logical_specs, rules)
    leaves = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract_tree))[0]
    spec_leaves = jax.tree.leaves(mesh_specs, is_leaf=lambda x: isinstance(x, P))
    if len(leaves) != len(spec_leaves):
        raise RuntimeError("sharding: parameter tree and partition specs disagree in structure")
    result = []
    for (path, leaf), spec in zip(leaves, spec_leaves, strict=True):
        shape = tuple(getattr(leaf, "shape", ()))
        fitted, dropped = _fit(shape, spec if isinstance(spec, P) else P(), mesh)
        result.append(Placement(_path_name(path), shape, fitted, dropped))
    treedef = jax.tree.structure(nn.meta.unbox(abstract_tree))
    return jax.tree.unflatten(treedef, result)


def shardings_of(placement_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings from a `placements` tree."""
    return jax.tree.map(
        lambda p: NamedSharding(mesh, p.spec), placement_tree, is_leaf=lambda x: isinstance(x, Placement)
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over (data, fsdp); every other axis of a batch field is replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def sharded_init(init_fn: Callable[..., Any], shardings: Any, *args: Any) -> Any:
    """Runs `init_fn(*args)` under jit straight into `shardings`: no full-size host copy exists."""
    return jax.jit(init_fn, out_shardings=shardings)(*args)


def format_rules(
    mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES, slices: SliceLayout | None = None
) -> str:
    """The logical-axis rules as a table, with how many ways each logical axis is split."""
    lines = [f"mesh {dict(mesh.shape)} over {mesh.devices.size} {mesh.devices.flat[0].platform} devices"]
    if slices is not None and slices.num_slices > 1:
        lines.append(f"  {slices.describe()}")
    lines.append(f"  {'logical axis':<12} {'mesh axes':<18} ways")
    for logical, entry in rules:
        axes = _mesh_axes(entry)
        ways = math.prod(mesh.shape[a] for a in axes)
        lines.append(f"  {logical:<12} {','.join(axes) or '-':<18} {ways}")
    return "\n".join(lines)


def format_placements(placement_tree: Any, mesh: Mesh) -> str:
    """One line per parameter: shape, mesh spec and per-device shard shape (largest first)."""
    items = jax.tree.leaves(placement_tree, is_leaf=lambda x: isinstance(x, Placement))
    items = sorted(items, key=lambda p: -math.prod(p.shape))
    lines = []
    for p in items:
        shard = NamedSharding(mesh, p.spec).shard_shape(p.shape)
        note = f"  (dims {list(p.replicated_dims)} replicated: not divisible)" if p.replicated_dims else ""
        lines.append(f"  {p.path:<60} {str(p.shape):<22} {str(tuple(p.spec)):<34} shard {shard}{note}")
    return "\n".join(lines)


def addressable_fraction(x: jax.Array) -> float:
    """Fraction of the array's elements one device holds (1.0 = replicated)."""
    shard = x.sharding.shard_shape(x.shape)
    return float(np.prod(shard) / max(np.prod(x.shape), 1))
