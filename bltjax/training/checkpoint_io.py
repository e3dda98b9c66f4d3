"""The "exported model" format: one folder holding an experiment config and its parameters.

    MODEL_DIR/
      config.json   the experiment ConfigDict as JSON (`ConfigDict.to_json_best_effort()`)
      params/       the parameter tree, written by `orbax.checkpoint.StandardCheckpointer`

This is what inference tools read (`python -m bltjax.entropy --checkpoint MODEL_DIR`, eval,
generation): a model plus the config that rebuilds it, nothing of a training run. Training
checkpoints (optimizer state, data position, several steps) are the business of an orbax
`CheckpointManager` in the trainer; this module stays deliberately minimal.

Why orbax and not safetensors: params may be sharded `jax.Array`s across hosts, and orbax saves
and restores those (re-sharding on restore) without gathering them on one host.

`fingerprint(config, params)` is the identity of a model: sidecars computed by a model record it,
so that data prepared by another model is never mixed in silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from bltjax.models.factory import build_model, example_inputs

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


class CheckpointError(ValueError):
    """A model folder that cannot be read; the message names the file and what is wrong."""


def _sync(name: str) -> None:
    """A barrier across processes (nothing to do in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def save_model(
    directory: str | os.PathLike,
    config: ml_collections.ConfigDict,
    params: Any,
    *,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes `config.json` and `params/` into ``directory``, atomically.

    Everything is written into a temporary sibling folder first and renamed into place, so a
    reader never sees a half-written model. With several processes every process must call this
    (orbax writes each process's shards); process 0 writes the config and does the rename.
    Raises FileExistsError if ``directory`` exists, unless ``overwrite``.
    """
    directory = pathlib.Path(directory).absolute()
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory}: already exists (pass overwrite=True to replace it)")
    build_model(config)  # validates the config before anything is written
    primary = jax.process_index() == 0
    tmp = directory.parent / f".{directory.name}.saving"
    if primary:
        directory.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left over by an interrupted save
            shutil.rmtree(tmp)
        tmp.mkdir()
        (tmp / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    _sync("bltjax.save_model.start")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp / PARAMS_DIR, nn.meta.unbox(params))
        checkpointer.wait_until_finished()
    _sync("bltjax.save_model.written")
    if primary:
        old = directory.parent / f".{directory.name}.replaced"
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old.exists():
            shutil.rmtree(old)
    _sync("bltjax.save_model.done")
    return directory


def load_config_json(directory: str | os.PathLike) -> ml_collections.ConfigDict:
    """The experiment config stored in ``directory/config.json``."""
    path = pathlib.Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a bltjax model folder holds {CONFIG_FILE} and {PARAMS_DIR}/)")
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err


def _leaf_name(key_path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in key_path)


def load_model(
    directory: str | os.PathLike, *, sharding: jax.sharding.Sharding | None = None
) -> tuple[ml_collections.ConfigDict, nn.Module, Any]:
    """(config, model, params) of a folder written by `save_model`.

    The expected tree comes from ``jax.eval_shape`` of the model's init, so a checkpoint whose
    parameter names, shapes or dtypes differ from what the config builds is refused with the
    parameter named (orbax alone would silently cast dtypes). Params land on ``sharding``
    (default: the first local device).
    """
    directory = pathlib.Path(directory).absolute()
    config = load_config_json(directory)
    model = build_model(config)
    inputs = example_inputs(config)
    abstract = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))["params"])
    params_dir = directory / PARAMS_DIR
    if not params_dir.is_dir():
        raise FileNotFoundError(f"{params_dir}: no such folder (a bltjax model folder holds {CONFIG_FILE} and params/)")
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            stored = checkpointer.metadata(params_dir).item_metadata
        except Exception as err:  # orbax raises many types for unreadable folders
            raise CheckpointError(
                f"{params_dir}: not a readable orbax checkpoint ({type(err).__name__}: {err})"
            ) from err
        stored_leaves = {_leaf_name(k): v for k, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
        expected = {_leaf_name(k): v for k, v in jax.tree_util.tree_flatten_with_path(abstract)[0]}
        for name in sorted(set(expected) | set(stored_leaves)):
            if name not in stored_leaves:
                raise CheckpointError(f"{params_dir}: parameter '{name}' is missing (expected from {CONFIG_FILE})")
            if name not in expected:
                raise CheckpointError(f"{params_dir}: parameter '{name}' is not part of the model {CONFIG_FILE} builds")
            want, got = expected[name], stored_leaves[name]
            if tuple(got.shape) != tuple(want.shape) or np.dtype(got.dtype) != np.dtype(want.dtype):
                raise CheckpointError(
                    f"{params_dir}: parameter '{name}' is {np.dtype(got.dtype).name}{list(got.shape)}, "
                    f"expected {np.dtype(want.dtype).name}{list(want.shape)} from {CONFIG_FILE}"
                )
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)
        try:
            params = checkpointer.restore(params_dir, target)
        except Exception as err:
            raise CheckpointError(f"{params_dir}: cannot restore the parameters ({type(err).__name__}: {err})") from err
    return config, model, params


def model_identity_json(config: ml_collections.ConfigDict) -> str:
    """Canonical JSON of what defines the function a model computes: `model_type` and `model`.

    Data, batch and seed settings are left out on purpose: re-exporting the same weights with
    another batch size must not invalidate the data prepared with them.
    """
    full = json.loads(config.to_json_best_effort())
    return json.dumps({"model_type": full.get("model_type"), "model": full.get("model")}, sort_keys=True)


def fingerprint(config: ml_collections.ConfigDict, params: Any) -> str:
    """sha256 (hex) over the model's config JSON and every parameter's name, dtype, shape and bytes.

    Leaves are visited in sorted path order and serialised little-endian, so the value depends
    only on the model, not on the host, the sharding or the order a dict was built in.
    """
    digest = hashlib.sha256()
    digest.update(model_identity_json(config).encode())
    leaves = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(params))[0]
    for name, value in sorted(((_leaf_name(k), v) for k, v in leaves), key=lambda item: item[0]):
        array = np.asarray(jax.device_get(value))
        if array.dtype.byteorder == ">":
            array = array.byteswap().view(array.dtype.newbyteorder("<"))
        digest.update(f"\n{name}:{array.dtype.name}:{list(array.shape)}\n".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()
