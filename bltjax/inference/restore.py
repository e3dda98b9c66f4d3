"""Loads a trained model for inference (eval, generation): parameters only, onto any devices.

Three kinds of folder are accepted, told apart by what they hold:

    WORKDIR/checkpoints/<step>/{state,data,meta}   a training run (bltjax/train.py); the
                                                    newest complete step unless `step` is given
    MODEL_DIR/{config.json,params/}                 `checkpoint_io.save_model` (an exported
                                                    entropy model, a Hugging Face import)
    HF_DIR/{config.json,model.safetensors}          a `transformers` BLT checkpoint, imported
                                                    on the fly (`bltjax.convert.hf`), with its
                                                    own patching rule

Why it is written this way:

* The model is rebuilt from the config stored *with the checkpoint* (the `meta` item of the
  step, which the trainer writes with `hash_rows_multiple` already resolved), never from an
  experiment file that may have changed since. Hash tables keep the padded row count of the
  run that wrote them, so every parameter shape matches.
* Only the `params` subtree of the train state is read (orbax's `partial_restore`): the Adam
  moments, twice the size of the model, are never loaded.
* Shapes and dtypes are checked against the model the config builds before anything is read,
  so a mismatch names the parameter instead of failing deep inside orbax (or, for dtypes,
  being cast silently).
* Parameters land on a fresh mesh over the given devices (default: all local devices), data
  parallel unless `mesh_overrides` say otherwise; orbax reshards, so a checkpoint written on
  an 8-device (2, 2, 2) mesh restores on 1 device and vice versa. A dimension the new mesh
  cannot divide is replicated (`sharding.placements`).
* Reading never writes: no orbax `CheckpointManager` is opened (it would create folders and
  sweep up the temporary folder of a save that a running training job is writing).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from jax.sharding import Mesh

from bltjax.config import ConfigError
from bltjax.models.factory import build_model, example_inputs
from bltjax.training import checkpoint_io, sharding
from bltjax.training.checkpoints import ITEMS, METADATA_FILE

CHECKPOINTS_DIR = "checkpoints"
EVAL_MESH = {"data": -1, "fsdp": 1, "tensor": 1}


class RestoreError(ValueError):
    """A folder that cannot be loaded for inference; the message names the path and what was expected."""


@dataclasses.dataclass(frozen=True)
class InferenceModel:
    """A model ready for `model.apply({"params": params}, ...)`, with where it came from."""

    config: ml_collections.ConfigDict  # the experiment config saved with the checkpoint
    model: nn.Module
    params: Any  # plain (unboxed) jax.Arrays placed on `mesh`
    step: int | None  # training step; None for a save_model folder
    mesh: Mesh
    source: str  # the step folder or model folder read


# --- finding the checkpoint --------------------------------------------------------------------


def is_model_dir(path: str | os.PathLike) -> bool:
    """True for a folder written by `checkpoint_io.save_model` (config.json + params/)."""
    path = pathlib.Path(path)
    return (path / checkpoint_io.CONFIG_FILE).is_file() and (path / checkpoint_io.PARAMS_DIR).is_dir()


def is_hf_dir(path: str | os.PathLike) -> bool:
    """True for a Hugging Face `transformers` BLT folder (config.json + model.safetensors)."""
    from bltjax.convert import hf

    path = pathlib.Path(path)
    return (path / hf.CONFIG_FILE).is_file() and (path / hf.WEIGHTS_FILE).is_file()


def _checkpoints_dir(path: pathlib.Path) -> pathlib.Path:
    """WORKDIR/checkpoints, or the path itself when it already is a checkpoints folder."""
    if (path / CHECKPOINTS_DIR).is_dir():
        return path / CHECKPOINTS_DIR
    if path.name == CHECKPOINTS_DIR:
        return path
    return path / CHECKPOINTS_DIR


def _is_complete(step_dir: pathlib.Path) -> bool:
    """The trainer's rule (bltjax/training/checkpoints.py): every item plus orbax's metadata file."""
    return (step_dir / METADATA_FILE).is_file() and all((step_dir / item).is_dir() for item in ITEMS)


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """Complete checkpoint steps of a training workdir, oldest first (empty when there are none).

    Folders of a save still in progress (``<step>.orbax-checkpoint-tmp*``) and step folders
    missing an item are not listed.
    """
    directory = _checkpoints_dir(pathlib.Path(workdir))
    if not directory.is_dir():
        return []
    steps = [int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit() and _is_complete(p)]
    return sorted(steps)


# --- config and mesh ---------------------------------------------------------------------------


@contextmanager
def _quiet_orbax() -> Iterator[None]:
    """orbax logs every file it opens (and warns about a per-item metadata file it never writes)."""
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(verbosity)


def _build(config: ml_collections.ConfigDict, where: str) -> nn.Module:
    try:
        return build_model(config)
    except (ConfigError, TypeError, KeyError, AttributeError, ValueError) as err:
        raise RestoreError(f"{where}: the saved config cannot be built by this bltjax: {err}") from err


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


def _abstract_params(model: nn.Module, config: ml_collections.ConfigDict) -> Any:
    """Boxed ShapeDtypeStructs (with logical axis names) of the model's parameters."""
    inputs = example_inputs(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))["params"]


def _leaf_name(key_path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in key_path)


def _check_shapes(stored: Any, expected: Any, where: pathlib.Path, config_source: str) -> None:
    """Raises RestoreError naming the first parameter whose name, shape or dtype disagrees."""
    got = {_leaf_name(k): v for k, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
    want = {_leaf_name(k): v for k, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    for name in sorted(set(got) | set(want)):
        if name not in got:
            raise RestoreError(f"{where}: parameter '{name}' is missing (the model built from {config_source} has it)")
        if name not in want:
            raise RestoreError(f"{where}: parameter '{name}' is not part of the model built from {config_source}")
        g, w = got[name], want[name]
        if tuple(g.shape) != tuple(w.shape) or np.dtype(g.dtype) != np.dtype(w.dtype):
            raise RestoreError(
                f"{where}: parameter '{name}' is {np.dtype(g.dtype).name}{list(g.shape)} in the checkpoint, but the "
                f"model built from {config_source} expects {np.dtype(w.dtype).name}{list(w.shape)}"
            )


def _target(abstract_boxed: Any, mesh: Mesh) -> Any:
    """ShapeDtypeStructs carrying the inference mesh's shardings: what orbax restores into."""
    shardings = sharding.shardings_of(sharding.placements(abstract_boxed, mesh), mesh)
    plain = nn.meta.unbox(abstract_boxed)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), plain, shardings)


# --- the two folder kinds -------------------------------------------------------------------------


def _read_step_config(workdir: pathlib.Path, step_dir: pathlib.Path) -> tuple[ml_collections.ConfigDict, str]:
    """(config, where it came from): the step's `meta` item, else the workdir's config.json."""
    meta_dir = step_dir / "meta"
    try:
        with _quiet_orbax(), ocp.Checkpointer(ocp.JsonCheckpointHandler()) as reader:
            meta = reader.restore(meta_dir)
    except Exception as err:  # orbax raises many types for unreadable folders
        raise RestoreError(f"{meta_dir}: unreadable checkpoint metadata ({type(err).__name__}: {err})") from err
    config = meta.get("config") if isinstance(meta, Mapping) else None
    source = f"{meta_dir} (field 'config')"
    if config is None:  # older checkpoints: the run's config.json holds the same resolved config
        path = workdir / "config.json"
        if not path.is_file():
            raise RestoreError(f"{meta_dir}: holds no field 'config', and {path} does not exist")
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise RestoreError(f"{path}: unreadable config ({err})") from err
        source = str(path)
    if not isinstance(config, Mapping):
        raise RestoreError(f"{source}: expected the experiment config as a JSON object, got {type(config).__name__}")
    return ml_collections.ConfigDict(dict(config)), source


def _load_training_step(
    path: pathlib.Path, step: int | None, devices: Sequence[jax.Device] | None, mesh_overrides: Mapping | None
) -> InferenceModel:
    directory = _checkpoints_dir(path)
    steps = checkpoint_steps(path)
    if not steps:
        found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
        detail = f"; it holds only {found}" if found else ""
        raise RestoreError(
            f"{directory}: no complete checkpoint (expected step folders <step>/ holding {', '.join(ITEMS)} and "
            f"{METADATA_FILE}, written by python -m bltjax.train){detail}"
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise RestoreError(f"{directory}: no complete checkpoint for step {step}; available steps: {steps}")
    step_dir = directory / str(step)
    workdir = directory.parent
    config, config_source = _read_step_config(workdir, step_dir)
    model = _build(config, config_source)
    abstract = _abstract_params(model, config)
    state_dir = step_dir / "state"
    with _quiet_orbax(), ocp.PyTreeCheckpointer() as reader:
        try:
            stored = reader.metadata(state_dir).item_metadata
            stored_params = stored["params"]
        except Exception as err:
            raise RestoreError(
                f"{state_dir}: not a readable train state with a 'params' entry ({type(err).__name__}: {err})"
            ) from err
        _check_shapes(stored_params, nn.meta.unbox(abstract), state_dir, config_source)
        mesh = eval_mesh(config, devices, mesh_overrides)
        target = {"params": _target(abstract, mesh)}
        restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), target)
        try:  # partial_restore: leaves absent from `target` (step, opt_state) are never read
            restored = reader.restore(
                state_dir, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
            )
        except Exception as err:
            raise RestoreError(f"{state_dir}: cannot restore the parameters ({type(err).__name__}: {err})") from err
    return InferenceModel(config, model, restored["params"], step, mesh, str(step_dir))


def _load_model_dir(
    path: pathlib.Path, devices: Sequence[jax.Device] | None, mesh_overrides: Mapping | None
) -> InferenceModel:
    config_path = path / checkpoint_io.CONFIG_FILE
    try:
        config = checkpoint_io.load_config_json(path)
    except (FileNotFoundError, checkpoint_io.CheckpointError) as err:
        raise RestoreError(str(err)) from err
    model = _build(config, str(config_path))
    abstract = _abstract_params(model, config)
    params_dir = path / checkpoint_io.PARAMS_DIR
    with _quiet_orbax(), ocp.StandardCheckpointer() as reader:
        try:
            stored = reader.metadata(params_dir).item_metadata
        except Exception as err:
            raise RestoreError(f"{params_dir}: not a readable orbax checkpoint ({type(err).__name__}: {err})") from err
        _check_shapes(stored, nn.meta.unbox(abstract), params_dir, str(config_path))
        mesh = eval_mesh(config, devices, mesh_overrides)
        try:
            params = reader.restore(params_dir, _target(abstract, mesh))
        except Exception as err:
            raise RestoreError(f"{params_dir}: cannot restore the parameters ({type(err).__name__}: {err})") from err
    return InferenceModel(config, model, params, None, mesh, str(path))


def _load_hf_dir(
    path: pathlib.Path, devices: Sequence[jax.Device] | None, mesh_overrides: Mapping | None
) -> InferenceModel:
    """Imports a `transformers` BLT folder (weights read on the host, then placed on the mesh)."""
    from bltjax.convert import hf

    try:
        config = hf.experiment_config_from_hf(path)
        model = _build(config, str(path / hf.CONFIG_FILE))
        _, host_params = hf.load_hf_blt(path)
    except hf.CheckpointError as err:
        raise RestoreError(str(err)) from err
    mesh = eval_mesh(config, devices, mesh_overrides)
    target = _target(_abstract_params(model, config), mesh)
    params = jax.tree.map(lambda x, t: jax.device_put(x, t.sharding), host_params, target)
    return InferenceModel(config, model, params, None, mesh, str(path))


def load_for_inference(
    workdir: str | os.PathLike,
    *,
    step: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    mesh_overrides: Mapping[str, int] | None = None,
) -> InferenceModel:
    """The model and parameters of a training workdir (latest or given step), a save_model or a Hugging Face folder.

    Raises RestoreError (a ValueError) naming the path for: a missing folder, a workdir without
    a complete checkpoint, a `step` that does not exist (the available ones are listed), a
    saved config this bltjax cannot build (the field is named), and parameters whose shapes
    differ from the model built from that config (the parameter is named).
    """
    path = pathlib.Path(workdir).absolute()
    if not path.is_dir():
        raise RestoreError(
            f"{path}: no such directory; expected a training workdir (with {CHECKPOINTS_DIR}/) or a model folder "
            f"written by save_model ({checkpoint_io.CONFIG_FILE} + {checkpoint_io.PARAMS_DIR}/) or a Hugging Face "
            "BLT folder (config.json + model.safetensors)"
        )
    if is_model_dir(path) and not (path / CHECKPOINTS_DIR).is_dir():
        if step is not None:
            raise RestoreError(f"{path}: a save_model folder holds one model, not training steps (got step={step})")
        return _load_model_dir(path, devices, mesh_overrides)
    if is_hf_dir(path) and not (path / CHECKPOINTS_DIR).is_dir():
        if step is not None:
            raise RestoreError(f"{path}: a Hugging Face folder holds one model, not training steps (got step={step})")
        return _load_hf_dir(path, devices, mesh_overrides)
    if not _checkpoints_dir(path).is_dir() and not (path / "config.json").is_file():
        raise RestoreError(
            f"{path}: neither a training workdir (no {CHECKPOINTS_DIR}/ or config.json) nor a model folder written "
            f"by save_model ({checkpoint_io.CONFIG_FILE} + {checkpoint_io.PARAMS_DIR}/) nor a Hugging Face BLT folder "
            "(config.json + model.safetensors)"
        )
    return _load_training_step(path, step, devices, mesh_overrides)
