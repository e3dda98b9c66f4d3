"""bltjax's two on-disk formats, and the checks that every reader of them runs.

    WORKDIR/checkpoints/<step>/state   a training step: the TrainState (sharded arrays),
                              /data    the grain iterator state (one JSON per process),
                              /meta    JSON: step, resolved config, mesh, versions, wall time
    MODEL_DIR/config.json              an exported model: the experiment config as JSON,
             /params/                  and its parameter tree (orbax)

Use:

    ckpt = Checkpointer(workdir / "checkpoints")        # the trainer: save / restore / steps
    save_model(model_dir, config, params)                # export one model, atomically
    config, model, params = load_model(model_dir)        # read it back onto one device
    fingerprint(config, params)                          # the identity sidecars record

Inference (`bltjax.inference.restore`) picks what to read and where to place it, and reads
through `complete_steps`, `read_step_config`, `build_saved_model` and `restore_params`, so
that a training step and a model folder pass the same completeness, name, shape and dtype
checks. Every error is a `CheckpointError` naming the file and what was expected. Why these
formats and checks: docs/design.md, "Checkpoint formats".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import flax.linen as nn
import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath

from bltjax.config import ConfigError
from bltjax.models import layout
from bltjax.models.configs import BLTConfig, ByteLMConfig
from bltjax.models.factory import build_model, example_inputs
from bltjax.runtime import paths

CHECKPOINTS_DIR = "checkpoints"
ITEMS = ("state", "data", "meta")
METADATA_FILE = "_CHECKPOINT_METADATA"  # orbax writes it last into every finished save
COMMIT_SUCCESS_FILE = "commit_success.txt"  # orbax's mark of a finished save on an object store
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
# Replica-parallel saving slices each replicated array across its replicas with a jitted
# slice per array shape: worth it for big arrays on a pod, but below this size the slicing
# compilations cost more than the write.
MIN_REPLICA_PARALLEL_SLICE_BYTES = 64 << 20


class CheckpointError(ValueError):
    """A checkpoint or model folder that cannot be read; the message names the file and what was expected."""


class CheckpointFileMissing(CheckpointError, FileNotFoundError):
    """A file or folder that the format requires is absent (also a FileNotFoundError for OS-error handlers)."""


@contextmanager
def quiet_orbax() -> Iterator[None]:
    """orbax logs every file it opens and warns about replaced handlers; only errors are worth showing."""
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(verbosity)


# --- training checkpoints ----------------------------------------------------------------------

_registered = False


def _register_array_handler() -> None:
    global _registered
    if _registered:
        return
    handler = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_PARALLEL_SLICE_BYTES)
    with quiet_orbax():
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    _registered = True


def is_complete_step(step_dir: epath.Path) -> bool:
    """A step folder holds every item and orbax's metadata file (a half-copied folder does not).

    In a bucket orbax writes the step under its final name (a folder rename would copy every
    object) and marks it finished with ``commit_success.txt``, so that file is required there too.
    """
    if paths.is_uri(step_dir) and not (step_dir / COMMIT_SUCCESS_FILE).is_file():
        return False
    return (step_dir / METADATA_FILE).is_file() and all((step_dir / item).is_dir() for item in ITEMS)


def checkpoints_dir(path: str | os.PathLike) -> epath.Path:
    """WORKDIR/checkpoints, or ``path`` itself when it already is a checkpoints folder."""
    path = paths.resolve(path)
    if path.name == CHECKPOINTS_DIR and not (path / CHECKPOINTS_DIR).is_dir():
        return path
    return path / CHECKPOINTS_DIR


def complete_steps(workdir: str | os.PathLike) -> list[int]:
    """Complete steps of a training workdir (or its checkpoints folder), oldest first.

    Reads the folder listing only: no orbax manager is opened, because one would create folders
    and delete the temporary folder of a save that a running trainer is writing.
    """
    directory = checkpoints_dir(workdir)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and is_complete_step(p))


class Checkpointer:
    """Saves and restores training steps under ``directory`` with an orbax `CheckpointManager`.

    The manager writes each step into a temporary folder and renames it when complete, saves
    asynchronously and applies the retention policy (latest ``keep`` plus every ``keep_every``-th).
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, keep_every: int = 0, async_save: bool = True):
        self.directory = paths.resolve(directory)
        _register_array_handler()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_every or None,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def steps(self) -> list[int]:
        """Complete steps on disk, oldest first."""
        return [step for step in sorted(self.manager.all_steps()) if is_complete_step(self.directory / str(step))]

    def latest_complete_step(self) -> int | None:
        """The newest step that holds every item; incomplete folders are logged and skipped."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            if is_complete_step(self.directory / str(step)):
                return step
            logging.warning(
                "checkpoint %s is incomplete (missing items or %s): skipped", self.directory / str(step), METADATA_FILE
            )
        return None

    def save(self, step: int, state: Any, data_iterator: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
        """Starts saving `step` (async by default); False if the step already exists or policy skips it."""
        if step in self.manager.all_steps():
            return False
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )

    def restore(self, step: int, target: Any, data_iterator: Any) -> tuple[Any, dict[str, Any]]:
        """(state resharded onto `target`'s shardings, metadata); the iterator is restored in place."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                data=grain.checkpoint.CheckpointRestore(data_iterator),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored.state, restored.meta

    def restore_meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def wait(self) -> None:
        """Blocks until any asynchronous save is on disk (committed and renamed)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _read_json_object(path: epath.Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable {what} ({err})") from err
    if not isinstance(value, Mapping):
        raise CheckpointError(f"{path}: expected {what} as a JSON object, got {type(value).__name__}")
    return dict(value)


def read_step_config(step_dir: epath.Path) -> tuple[ml_collections.ConfigDict, str]:
    """(config, where it was read): field 'config' of the step's `meta` item, else WORKDIR/config.json.

    The config saved with the step (with `hash_rows_multiple` already resolved) rebuilds exactly
    the shapes that were saved, unlike an experiment file that may have changed since.
    """
    meta_dir = step_dir / "meta"
    try:
        with quiet_orbax(), ocp.Checkpointer(ocp.JsonCheckpointHandler()) as reader:
            meta = reader.restore(meta_dir)
    except Exception as err:  # orbax raises many types for unreadable folders
        raise CheckpointError(f"{meta_dir}: unreadable checkpoint metadata ({type(err).__name__}: {err})") from err
    config = meta.get("config") if isinstance(meta, Mapping) else None
    source = f"{meta_dir} (field 'config')"
    if config is None:  # older checkpoints: the run's config.json holds the same resolved config
        path = step_dir.parent.parent / CONFIG_FILE
        if not path.is_file():
            raise CheckpointFileMissing(f"{meta_dir}: holds no field 'config', and {path} does not exist")
        return ml_collections.ConfigDict(_read_json_object(path, "the experiment config")), str(path)
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{source}: expected the experiment config as a JSON object, got {type(config).__name__}")
    return ml_collections.ConfigDict(dict(config)), source


# --- exported model folders --------------------------------------------------------------------


def is_model_dir(path: str | os.PathLike) -> bool:
    """True for a folder laid out by `save_model` (config.json + params/); `check_model_dir` says what is missing."""
    path = paths.resolve(path)
    return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def check_model_dir(path: str | os.PathLike) -> None:
    """Raises CheckpointFileMissing naming the first file a complete model folder lacks."""
    path = paths.resolve(path)
    layout = f"a bltjax model folder holds {CONFIG_FILE} and {PARAMS_DIR}/ (written by save_model)"
    for required, is_there in (
        (path / CONFIG_FILE, "is_file"),
        (path / PARAMS_DIR, "is_dir"),
        (path / PARAMS_DIR / METADATA_FILE, "is_file"),
    ):
        if not getattr(required, is_there)():
            kind = "folder" if required.name == PARAMS_DIR else "file"
            raise CheckpointFileMissing(f"{required}: no such {kind}; {layout}, orbax's {METADATA_FILE} last")


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
) -> epath.Path:
    """Writes `config.json` and `params/` into ``directory``, atomically.

    Locally everything goes into a temporary sibling folder first and is renamed into place, so
    a reader never sees a half-written model. In a bucket (gs://...), where renaming a folder
    copies every object, the params are written in place and `config.json` last: `is_model_dir`
    and `check_model_dir` accept the folder only once both are there. With several processes
    every process must call this (orbax writes each process's shards); process 0 writes the
    config and does the rename. Raises FileExistsError if ``directory`` exists, unless ``overwrite``.
    """
    directory = paths.resolve(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory}: already exists (pass overwrite=True to replace it)")
    build_model(config)  # validates the config before anything is written
    primary = jax.process_index() == 0
    if paths.is_uri(directory):
        _save_model_in_place(directory, config, params, primary)
        return directory
    tmp = directory.parent / f".{directory.name}.saving"
    if primary:
        directory.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left over by an interrupted save
            shutil.rmtree(tmp)
        tmp.mkdir()
        (tmp / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    _sync("bltjax.save_model.start")
    with quiet_orbax(), ocp.StandardCheckpointer() as checkpointer:
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


def _save_model_in_place(directory: epath.Path, config: ml_collections.ConfigDict, params: Any, primary: bool) -> None:
    """`save_model` on an object store: params (orbax commits them with its own marker), then config.json."""
    if primary and directory.exists():
        directory.rmtree()  # the old model stops being a model folder before the new one starts
    _sync("bltjax.save_model.start")
    with quiet_orbax(), ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / PARAMS_DIR, nn.meta.unbox(params))
        checkpointer.wait_until_finished()
    _sync("bltjax.save_model.written")
    if primary:
        (directory / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    _sync("bltjax.save_model.done")


def load_config_json(directory: str | os.PathLike) -> ml_collections.ConfigDict:
    """The experiment config stored in ``directory/config.json``."""
    path = paths.resolve(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointFileMissing(
            f"{path}: no such file (a bltjax model folder holds {CONFIG_FILE} and {PARAMS_DIR}/)"
        )
    return ml_collections.ConfigDict(_read_json_object(path, "the experiment config"))


def load_model(
    directory: str | os.PathLike, *, sharding: jax.sharding.Sharding | None = None, scan_layers: bool | None = None
) -> tuple[ml_collections.ConfigDict, nn.Module, Any]:
    """(config, model, params) of a folder written by `save_model`; params land on ``sharding``.

    The default sharding is the first local device; `bltjax.inference.restore` places a model
    on a mesh instead. ``scan_layers`` True / False loads the model with its layers scanned or
    unrolled whichever layout the folder holds (the returned config says which); None: as saved.
    """
    directory = paths.resolve(directory)
    check_model_dir(directory)
    config = load_config_json(directory)
    config_source = str(directory / CONFIG_FILE)
    if scan_layers is not None:
        config.model.scan_layers = bool(scan_layers)
    model = build_saved_model(config, config_source)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = nn.meta.unbox(abstract_params(model, config))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)
    params = restore_params(directory / PARAMS_DIR, target, config_source, model_config=model.config)
    return config, model, params


def leaf_name(key_path: tuple) -> str:
    """'a/b/c' for a parameter's tree path (dict keys, attribute names or indices)."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in key_path)


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
    for name, value in sorted(((leaf_name(k), v) for k, v in leaves), key=lambda item: item[0]):
        array = np.asarray(jax.device_get(value))
        if array.dtype.byteorder == ">":
            array = array.byteswap().view(array.dtype.newbyteorder("<"))
        digest.update(f"\n{name}:{array.dtype.name}:{list(array.shape)}\n".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


# --- checks shared by every reader -------------------------------------------------------------


def build_saved_model(config: ml_collections.ConfigDict, config_source: str) -> nn.Module:
    """The model a saved config describes; CheckpointError naming ``config_source`` if this bltjax cannot build it."""
    try:
        return build_model(config)
    except (ConfigError, TypeError, KeyError, AttributeError, ValueError) as err:
        raise CheckpointError(f"{config_source}: the saved config cannot be built by this bltjax: {err}") from err


def abstract_params(model: nn.Module, config: ml_collections.ConfigDict) -> Any:
    """Boxed ShapeDtypeStructs (with logical axis names) of the model's parameters; nothing is allocated."""
    inputs = example_inputs(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))["params"]


def check_params(stored: Any, expected: Any, where: epath.Path, config_source: str) -> None:
    """Raises CheckpointError naming the first parameter whose name, shape or dtype differs.

    Checked before anything is read: orbax would fail deep inside for a shape, and cast a
    dtype silently.
    """
    got = {leaf_name(k): v for k, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
    want = {leaf_name(k): v for k, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    for name in sorted(set(got) | set(want)):
        if name not in got:
            raise CheckpointError(
                f"{where}: parameter '{name}' is missing (the model built from {config_source} has it)"
            )
        if name not in want:
            raise CheckpointError(f"{where}: parameter '{name}' is not part of the model built from {config_source}")
        g, w = got[name], want[name]
        if tuple(g.shape) != tuple(w.shape) or np.dtype(g.dtype) != np.dtype(w.dtype):
            raise CheckpointError(
                f"{where}: parameter '{name}' is {np.dtype(g.dtype).name}{list(g.shape)} in the checkpoint, but the "
                f"model built from {config_source} expects {np.dtype(w.dtype).name}{list(w.shape)}"
            )


def restore_params(
    directory: epath.Path,
    target: Any,
    config_source: str,
    *,
    subtree: str | None = None,
    model_config: BLTConfig | ByteLMConfig | None = None,
) -> Any:
    """The parameters stored in an orbax folder, checked against ``target`` and placed on its shardings.

    ``directory`` is a model's params/ folder, or a step's state/ folder with ``subtree='params'``:
    then only that entry is read (orbax's partial restore), never the optimizer moments.
    ``target`` holds ShapeDtypeStructs whose `sharding` says where each parameter lands. With
    ``model_config`` (the target model's record) parameters stored in the other layer layout
    (per-layer vs stacked, `bltjax.models.layout`) are read in theirs and converted.
    """
    entry = f" with a '{subtree}' entry" if subtree else ""
    with quiet_orbax(), ocp.PyTreeCheckpointer() as reader:
        try:
            stored = reader.metadata(directory).item_metadata
            if subtree:
                stored = stored[subtree]
        except Exception as err:  # orbax raises many types for unreadable folders
            raise CheckpointError(
                f"{directory}: not a readable orbax checkpoint{entry} ({type(err).__name__}: {err})"
            ) from err
        stored_layout = _stored_layout(stored, target, model_config, directory, config_source)
        if stored_layout is not None:
            restored = _read(reader, directory, stored_layout, subtree)
            placements = jax.tree.map(lambda t: t.sharding, target)
            return jax.device_put(layout.to_layout(restored, model_config), placements)
        check_params(stored, target, directory, config_source)
        return _read(reader, directory, target, subtree)


def _leaf_names(tree: Any) -> set[str]:
    return {leaf_name(k) for k, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _stored_layout(
    stored: Any, target: Any, model_config: BLTConfig | ByteLMConfig | None, where: epath.Path, config_source: str
) -> Any:
    """``target`` planned in the other layer layout when that is how ``stored`` holds it, else None."""
    if model_config is None or _leaf_names(stored) == _leaf_names(target):
        return None
    other = layout.with_scan(model_config, not model_config.scan_layers)
    try:
        planned = layout.to_layout(target, other)
    except layout.LayoutError:
        return None
    if _leaf_names(stored) != _leaf_names(planned):
        return None
    check_params(stored, planned, where, f"{config_source} in the other layer layout (scan_layers={other.scan_layers})")
    return planned


def _read(reader: Any, directory: epath.Path, target: Any, subtree: str | None) -> Any:
    item = {subtree: target} if subtree else target
    restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), item)
    try:
        restored = reader.restore(
            directory,
            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=bool(subtree)),
        )
    except Exception as err:
        raise CheckpointError(f"{directory}: cannot restore the parameters ({type(err).__name__}: {err})") from err
    return restored[subtree] if subtree else restored
