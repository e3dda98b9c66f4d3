"""Builds the Linen module an experiment config describes (BLT, byte LM or MegaByte)."""

from __future__ import annotations

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from bltjax.config import model_config
from bltjax.models.blt import BLT
from bltjax.models.byte_lm import ByteLM
from bltjax.models.configs import BLTConfig, MegaByteConfig
from bltjax.models.megabyte import MegaByte


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
    """The validated model of ``config`` (raises ConfigError naming the bad field)."""
    record = model_config(config)
    if isinstance(record, BLTConfig):
        return BLT(record)
    return MegaByte(record) if isinstance(record, MegaByteConfig) else ByteLM(record)


def example_inputs(config: ml_collections.ConfigDict, batch_size: int = 1) -> tuple[np.ndarray, ...]:
    """Shape-correct dummy inputs for init / eval_shape: tokens (and patch lengths for BLT)."""
    n = config.data.seq_len
    tokens = np.full((batch_size, n), 4, np.int32)
    tokens[:, 0] = 1
    if config.model_type != "blt":
        return (tokens,)
    lengths = np.zeros((batch_size, config.data.max_patches), np.int32)
    lengths[:, 0] = 1
    lengths[:, 1] = n  # N + 1 in total: the training convention
    return tokens, lengths


def parameter_shapes(config: ml_collections.ConfigDict) -> dict:
    """Parameter shapes without allocating them (jax.eval_shape of init)."""
    model = build_model(config)
    inputs = example_inputs(config)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))
    return nn.meta.unbox(variables["params"])
