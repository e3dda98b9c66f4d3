"""Loads a trained model for inference (eval, generation): parameters only, onto a mesh.

    load_for_inference(path, step=None, devices=None, mesh_overrides=None) -> InferenceModel

``path`` is one of three kinds of folder, told apart by what they hold (or a Hugging Face Hub
id, whose cached snapshot is the third kind: `bltjax.convert.hub`):

    WORKDIR/checkpoints/<step>/{state,data,meta}   a training run; the newest complete step
                                                    unless ``step`` is given
    MODEL_DIR/{config.json,params/}                 an exported model (`save_model`)
    HF_DIR/{config.json,model.safetensors}          a `transformers` BLT folder, imported on
                                                    the fly with its own patching rule

This module only decides what to read and where to place it: a data-parallel mesh over the
given devices (default: all local ones), resharded by orbax from whatever mesh wrote it. The
formats and their completeness, shape and dtype checks are `bltjax.checkpoints`'s
(Hugging Face folders: `bltjax.convert.hf`'s). Why it reads this way: docs/design.md,
"Checkpoint formats".
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh

from bltjax import checkpoints
from bltjax.checkpoints import CHECKPOINTS_DIR, CONFIG_FILE, ITEMS, METADATA_FILE, PARAMS_DIR
from bltjax.runtime import paths
from bltjax.training import sharding

EVAL_MESH = {"data": -1, "fsdp": 1, "tensor": 1}

# Inference raises the format module's error: one type for every folder that cannot be loaded.
RestoreError = checkpoints.CheckpointError


@dataclasses.dataclass(frozen=True)
class InferenceModel:
    """A model ready for `model.apply({"params": params}, ...)`, with where it came from."""

    config: ml_collections.ConfigDict  # the experiment config saved with the checkpoint
    model: nn.Module
    params: Any  # plain (unboxed) jax.Arrays placed on `mesh`
    step: int | None  # training step; None for a model or Hugging Face folder
    mesh: Mesh
    source: str  # the step folder or model folder read


def is_hf_dir(path: str | os.PathLike) -> bool:
    """True for a Hugging Face `transformers` BLT folder (config.json + model.safetensors, or an index and shards)."""
    from bltjax.convert import hf

    path = paths.resolve(path)
    return (path / hf.CONFIG_FILE).is_file() and hf.has_weights(path)


def eval_mesh(
    config: ml_collections.ConfigDict,
    devices: Sequence[jax.Device] | None = None,
    overrides: Mapping[str, int] | None = None,
) -> Mesh:
    """The inference mesh: data parallel (data=-1, fsdp=1, tensor=1) unless `overrides` say otherwise."""
    shape = dict(EVAL_MESH)
    for axis, size in (overrides or {}).items():
        if axis not in shape:
            raise sharding.MeshError(f"mesh_overrides: unknown axis {axis!r}; expected one of {sharding.MESH_AXES}")
        shape[axis] = int(size)
    if sum(size == -1 for size in shape.values()) > 1:
        raise sharding.MeshError(f"mesh_overrides: at most one axis may be -1 (fill), got {shape}")
    mesh_config = ml_collections.ConfigDict({"mesh": shape})
    return sharding.make_mesh(mesh_config, devices)


def _placed(model: nn.Module, config: ml_collections.ConfigDict, mesh: Mesh) -> Any:
    """ShapeDtypeStructs carrying the mesh's shardings: where each parameter lands.

    A dimension the mesh cannot divide is replicated (`sharding.placements`).
    """
    abstract = checkpoints.abstract_params(model, config)
    shardings = sharding.shardings_of(sharding.placements(abstract, mesh), mesh)
    plain = nn.meta.unbox(abstract)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), plain, shardings)


def _load_training_step(
    path: pathlib.Path, step: int | None, devices: Sequence[jax.Device] | None, mesh_overrides: Mapping | None
) -> InferenceModel:
    directory = checkpoints.checkpoints_dir(path)
    steps = checkpoints.complete_steps(path)
    if not steps:
        found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
        detail = f"; it holds only {found}" if found else ""
        if not directory.is_dir() and (path / CONFIG_FILE).is_file():
            detail = (
                f"; and {path} holds {CONFIG_FILE} without {PARAMS_DIR}/ (a model folder) or "
                "model.safetensors (a Hugging Face folder)"
            )
        raise RestoreError(
            f"{directory}: no complete checkpoint (expected step folders <step>/ holding {', '.join(ITEMS)} and "
            f"{METADATA_FILE}, written by python -m bltjax.train){detail}"
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise RestoreError(f"{directory}: no complete checkpoint for step {step}; available steps: {steps}")
    step_dir = directory / str(step)
    config, config_source = checkpoints.read_step_config(step_dir)
    model = checkpoints.build_saved_model(config, config_source)
    mesh = eval_mesh(config, devices, mesh_overrides)
    target = _placed(model, config, mesh)
    params = checkpoints.restore_params(step_dir / "state", target, config_source, subtree="params")
    return InferenceModel(config, model, params, step, mesh, str(step_dir))


def _load_model_dir(
    path: pathlib.Path, devices: Sequence[jax.Device] | None, mesh_overrides: Mapping | None
) -> InferenceModel:
    checkpoints.check_model_dir(path)
    config = checkpoints.load_config_json(path)
    config_source = str(path / CONFIG_FILE)
    model = checkpoints.build_saved_model(config, config_source)
    mesh = eval_mesh(config, devices, mesh_overrides)
    params = checkpoints.restore_params(path / PARAMS_DIR, _placed(model, config, mesh), config_source)
    return InferenceModel(config, model, params, None, mesh, str(path))


def _load_hf_dir(
    path: pathlib.Path, devices: Sequence[jax.Device] | None, mesh_overrides: Mapping | None
) -> InferenceModel:
    """Imports a `transformers` BLT folder: weights read on the host (hf checks them), then placed on the mesh."""
    from bltjax.convert import hf

    paths.require_local(path, "a Hugging Face model folder (its safetensors are memory-mapped)")
    try:
        config = hf.experiment_config_from_hf(path)
        model = checkpoints.build_saved_model(config, str(path / hf.CONFIG_FILE))
        _, host_params = hf.load_hf_blt(path)
    except hf.CheckpointError as err:
        raise RestoreError(str(err)) from err
    mesh = eval_mesh(config, devices, mesh_overrides)
    params = jax.tree.map(lambda x, t: jax.device_put(x, t.sharding), host_params, _placed(model, config, mesh))
    return InferenceModel(config, model, params, None, mesh, str(path))


def load_for_inference(
    workdir: str | os.PathLike,
    *,
    step: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    mesh_overrides: Mapping[str, int] | None = None,
) -> InferenceModel:
    """The model and parameters of a training workdir (latest or given step), a model folder or a Hugging Face folder.

    ``workdir`` may also be a Hugging Face Hub id (``facebook/blt-1b``), read from huggingface_hub's
    cache when no local folder has that name (`bltjax.convert.hub`).

    Raises RestoreError (a ValueError) naming the path for: a missing folder, a workdir without
    a complete checkpoint, a `step` that does not exist (the available ones are listed), a
    saved config this bltjax cannot build (the field is named), and parameters whose shapes
    differ from the model built from that config (the parameter is named).
    """
    from bltjax.convert.hub import ModelSourceError, resolve_model_source

    try:  # gs://... stays a URI; a Hub id not found locally becomes its cached snapshot folder
        path = resolve_model_source(workdir)
    except ModelSourceError as err:
        raise RestoreError(str(err)) from err
    if not path.is_dir():
        raise RestoreError(
            f"{path}: no such directory; expected a training workdir ({CHECKPOINTS_DIR}/), a model folder written by "
            f"save_model ({CONFIG_FILE} + {PARAMS_DIR}/) or a Hugging Face BLT folder (config.json + model.safetensors)"
        )
    if not (path / CHECKPOINTS_DIR).is_dir():
        if checkpoints.is_model_dir(path):
            if step is not None:
                raise RestoreError(f"{path}: a model folder holds one model, not training steps (got step={step})")
            return _load_model_dir(path, devices, mesh_overrides)
        if is_hf_dir(path):
            if step is not None:
                raise RestoreError(
                    f"{path}: a Hugging Face folder holds one model, not training steps (got step={step})"
                )
            return _load_hf_dir(path, devices, mesh_overrides)
        if path.name != CHECKPOINTS_DIR and not (path / CONFIG_FILE).is_file():
            raise RestoreError(
                f"{path}: neither a training workdir (no {CHECKPOINTS_DIR}/ or {CONFIG_FILE}) nor a model folder "
                f"({CONFIG_FILE} + {PARAMS_DIR}/) nor a Hugging Face BLT folder (config.json + model.safetensors)"
            )
    return _load_training_step(path, step, devices, mesh_overrides)
