"""Loading an entropy model for the entropy pass (`bltjax.data.entropy`): a bltjax model folder, a
training workdir or step of one, a Hugging Face BLT folder's patcher, or a Hub id of one.

    from bltjax.data.entropy import load_entropy_model   # re-exported there
    entropy_model = load_entropy_model("runs/quickstart/entropy_model")
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from bltjax import checkpoints
from bltjax.config import base_byte_lm_config
from bltjax.data.sidecars import SidecarError
from bltjax.models.byte_lm import ByteLM
from bltjax.models.configs import ByteLMConfig
from bltjax.runtime import paths

HF_DEFAULT_CONTEXT = 8192  # rows of the official entropy pass (docs/architecture.md §2.3)
DEFAULT_BATCH_SIZE = 8


@dataclasses.dataclass(frozen=True)
class EntropyModel:
    """A loaded entropy model and what identifies it."""

    model: ByteLM
    params: Any
    config: ml_collections.ConfigDict
    fingerprint: str
    source: str  # "bltjax" or "huggingface"
    path: str
    default_threshold: float | None
    default_context: int
    default_batch_size: int

    @property
    def record(self) -> ByteLMConfig:
        return self.model.config


def config_from_byte_lm(record: ByteLMConfig, seq_len: int = HF_DEFAULT_CONTEXT) -> ml_collections.ConfigDict:
    """The experiment ConfigDict of a ByteLM record (so an imported model can be fingerprinted/saved)."""
    config = base_byte_lm_config()
    config.model.stack = ml_collections.ConfigDict(dataclasses.asdict(record.stack))
    for name in ("vocab_size", "document_mask", "dtype", "param_dtype", "init_std_factor"):
        config.model[name] = getattr(record, name)
    config.data.seq_len = seq_len
    return config


def load_entropy_model(directory: str | os.PathLike) -> EntropyModel:
    """A bltjax model folder or training workdir (model_type byte_lm), or a Hugging Face BLT folder's patcher.

    A training workdir (``python -m bltjax.train --config experiments/entropy_model.py``) gives its
    newest complete step, a step folder (WORKDIR/checkpoints/<step>) that step; its fingerprint is
    the one `save_model` of the same parameters would have. ``directory`` may be a Hugging Face
    Hub id (`bltjax.convert.hub`).
    """
    from bltjax.convert.hub import resolve_model_source

    path = resolve_model_source(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder (expected an entropy model checkpoint)")
    is_run = checkpoints.is_complete_step(path) or bool(checkpoints.complete_steps(path))
    if (path / checkpoints.PARAMS_DIR).is_dir() or is_run:
        config, model, params = _load_training_step(path) if is_run else _load_model_folder(path)
        return EntropyModel(
            model,
            params,
            config,
            checkpoints.fingerprint(config, params),
            "bltjax",
            os.fspath(path),
            None,
            int(config.data.seq_len),
            int(config.data.batch_size),
        )
    from bltjax.convert import hf

    if hf.has_weights(path):
        paths.require_local(path, "a Hugging Face entropy model folder (safetensors are memory-mapped)")
        model, params, threshold = hf.load_hf_entropy_model(path)
        config = config_from_byte_lm(model.config)
        return EntropyModel(
            model,
            params,
            config,
            checkpoints.fingerprint(config, params),
            "huggingface",
            os.fspath(path),
            None if threshold is None else float(threshold),
            HF_DEFAULT_CONTEXT,
            DEFAULT_BATCH_SIZE,
        )
    raise SidecarError(
        f"{path}: neither a bltjax model folder ({checkpoints.CONFIG_FILE} + {checkpoints.PARAMS_DIR}/, "
        f"from bltjax.checkpoints.save_model), nor a training workdir with a complete checkpoint "
        f"({checkpoints.CHECKPOINTS_DIR}/<step>/, from python -m bltjax.train), nor a Hugging Face BLT folder "
        f"({hf.CONFIG_FILE} + {hf.WEIGHTS_FILE} or {hf.INDEX_FILE})"
    )


def _require_byte_lm(config: ml_collections.ConfigDict, source: str) -> None:
    if config.get("model_type") != "byte_lm":
        raise SidecarError(
            f"{source}: field 'model_type' is {config.get('model_type')!r}; an entropy model must be a 'byte_lm'"
        )


def _load_model_folder(path) -> tuple[ml_collections.ConfigDict, ByteLM, Any]:
    _require_byte_lm(checkpoints.load_config_json(path), str(path / checkpoints.CONFIG_FILE))
    return checkpoints.load_model(path)


def _load_training_step(path) -> tuple[ml_collections.ConfigDict, ByteLM, Any]:
    """The parameters of a training step (the newest complete one of a workdir) on the first local device."""
    if checkpoints.is_complete_step(path):
        step_dir = path
    else:
        step_dir = checkpoints.checkpoints_dir(path) / str(checkpoints.complete_steps(path)[-1])
    config, source = checkpoints.read_step_config(step_dir)
    _require_byte_lm(config, source)
    model = checkpoints.build_saved_model(config, source)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = nn.meta.unbox(checkpoints.abstract_params(model, config))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    params = checkpoints.restore_params(step_dir / "state", target, source, subtree="params")
    return config, model, params
