"""Hugging Face `transformers` BLT checkpoints <-> bltjax (no torch needed).

    model, params = load_hf_blt(hf_dir)                         # BltForCausalLM weights as a BLT
    byte_lm, params, threshold = load_hf_entropy_model(hf_dir)  # its entropy patcher
    save_hf_blt(model, params, out_dir, entropy_model=(byte_lm, params), threshold=threshold)

A checkpoint folder holds ``config.json`` (a `BltConfig` with four sub-configs,
`bltjax.convert.hf_config`) and its weights, ``model.safetensors`` or shards with an index
(`bltjax.convert.hf_weights`): a `BltForCausalLM` state dict, linear weights as [out, in].
Import maps every parameter by name, checks its shape and reshapes it into the Linen tree;
export does the reverse so that `BltForCausalLM.from_pretrained` loads a model trained here.
`bltjax.convert.export` writes a complete folder (tokenizer and generation config included).

The imported model reproduces `transformers`' arithmetic exactly, which differs from the
official BLT code in two switches that `load_hf_blt` sets (docs/architecture.md §18): no
document masks (``document_mask=False``) and re-pooling at every encoder cross-attention layer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from bltjax.convert.hf_config import (  # noqa: F401 - the bridge's public names, importable from here
    CONFIG_FILE,
    CheckpointError,
    blt_config_from_hf,
    blt_config_to_hf,
    entropy_model_config_from_hf,
    experiment_config_from_hf,
    read_config_json,
)
from bltjax.convert.hf_weights import INDEX_FILE, WEIGHTS_FILE, has_weights, open_weights, write_weights  # noqa: F401
from bltjax.models.blt import BLT
from bltjax.models.byte_lm import ByteLM
from bltjax.models.configs import BLTConfig, ByteLMConfig
from bltjax.models.layout import stack_layers, unstack_layers, with_scan
from bltjax.runtime.atomic import write_atomic

# --- parameter names --------------------------------------------------------------------------

_BLOCK_NAMES = {
    ("attention", "query", "kernel"): "self_attn.q_proj.weight",
    ("attention", "key", "kernel"): "self_attn.k_proj.weight",
    ("attention", "value", "kernel"): "self_attn.v_proj.weight",
    ("attention", "out", "kernel"): "self_attn.o_proj.weight",
    ("attention_norm", "scale"): "input_layernorm.weight",
    ("ffn_norm", "scale"): "post_attention_layernorm.weight",
    ("ffn", "gate", "kernel"): "mlp.gate_proj.weight",
    ("ffn", "up", "kernel"): "mlp.up_proj.weight",
    ("ffn", "down", "kernel"): "mlp.down_proj.weight",
}
_CROSS_NAMES = {
    ("query", "kernel"): "q_proj.weight",
    ("key", "kernel"): "k_proj.weight",
    ("value", "kernel"): "v_proj.weight",
    ("out", "kernel"): "o_proj.weight",
    ("query_norm", "scale"): "q_norm.weight",
    ("kv_norm", "scale"): "k_norm.weight",
}


def _layer_name(prefix: str, path: tuple[str, ...]) -> str:
    index = path[0].split("_")[-1]
    return f"{prefix}.layers.{index}.{_BLOCK_NAMES[path[1:]]}"


def _cross_name(prefix: str, path: tuple[str, ...], all_layers: bool) -> str:
    index = path[0].split("_")[-1] if all_layers else "0"  # transformers keeps one module then
    return f"{prefix}.cross_attn_layers.{index}.{_CROSS_NAMES[path[1:]]}"


def hf_parameter_name(cfg: BLTConfig, path: tuple[str, ...]) -> str:
    """The `transformers` state-dict key of the bltjax parameter at ``path``."""
    component, rest = path[0], path[1:]
    if component == "local_encoder":
        prefix = "model.local_encoder"
        fixed = {
            ("byte_embedding",): f"{prefix}.embed_tokens.weight",
            ("hash_embedding", "tables"): "model.encoder_hash_tok_embedding.weight",
            ("patch_projection", "kernel"): f"{prefix}.patch_embedding_projection.weight",
        }
        if rest in fixed:
            return fixed[rest]
        if rest[0].startswith("layers_"):
            return _layer_name(prefix, rest)
        return _cross_name(prefix, rest, cfg.cross_attn_all_layers_encoder)
    if component == "latent":
        if rest == ("input_projection", "kernel"):
            return "model.global_transformer.token_embedding_projection.weight"
        return _layer_name("model.global_transformer", rest[1:])
    if component == "local_decoder":
        prefix = "model.local_decoder"
        fixed = {
            ("patch_projection", "kernel"): f"{prefix}.patch_embedding_projection.weight",
            ("final_norm", "scale"): f"{prefix}.norm.weight",
            ("output", "kernel"): "lm_head.weight",
        }
        if rest in fixed:
            return fixed[rest]
        if rest[0].startswith("layers_"):
            return _layer_name(prefix, rest)
        return _cross_name(prefix, rest, cfg.cross_attn_all_layers_decoder)
    raise KeyError(f"no transformers name for parameter {'/'.join(path)}")


def hf_entropy_parameter_name(path: tuple[str, ...]) -> str:
    """The `transformers` key of a bltjax ByteLM parameter inside a BLT checkpoint's patcher."""
    prefix = "model.patcher"
    fixed = {
        ("embedding",): f"{prefix}.embed_tokens.weight",
        ("final_norm", "scale"): f"{prefix}.norm.weight",
        ("output", "kernel"): f"{prefix}.lm_head.weight",
    }
    if path in fixed:
        return fixed[path]
    return _layer_name(prefix, path[1:])


# --- tensor layouts ---------------------------------------------------------------------------


def _hf_shape(path: tuple[str, ...], shape: tuple[int, ...], hash_vocab: int | None = None) -> tuple[int, ...]:
    """Shape of the torch tensor holding a bltjax parameter of ``shape``.

    The hash tables are one [tables * hash_vocab, dim] matrix there: rows padded here up to
    ``hash_rows_multiple`` (never read) do not exist in transformers.
    """
    if path[-1] == "tables":
        return (shape[0] * (hash_vocab or shape[1]), shape[2])
    if path[-1] == "kernel":
        n_in = 2 if path[-2] == "out" else 1
        return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
    return tuple(shape)


def _from_hf(
    path: tuple[str, ...], tensor: np.ndarray, shape: tuple[int, ...], hash_vocab: int | None = None
) -> np.ndarray:
    if path[-1] == "kernel":
        return tensor.T.reshape(shape)
    if path[-1] == "tables":
        tables = tensor.reshape(shape[0], hash_vocab or shape[1], shape[2])
        return np.pad(tables, [(0, 0), (0, shape[1] - tables.shape[1]), (0, 0)])
    return tensor.reshape(shape)


def _to_hf(path: tuple[str, ...], value: np.ndarray, hash_vocab: int | None = None) -> np.ndarray:
    if path[-1] == "tables":
        value = value[:, :hash_vocab]  # drops the padding rows
    hf_shape = _hf_shape(path, value.shape)
    if path[-1] == "kernel":
        return np.ascontiguousarray(value.reshape(hf_shape[::-1]).T)
    return np.ascontiguousarray(value.reshape(hf_shape))


# --- reading and writing folders ---------------------------------------------------------------


def _load_tree(
    module: nn.Module,
    example_args: tuple,
    name_of: Callable[[tuple[str, ...]], str],
    model_dir: pathlib.Path,
    dtype: Any,
    hash_vocab: int | None = None,
) -> dict:
    """Fills the module's parameter tree from the folder's safetensors files, checking every name and shape."""
    shapes = nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), *example_args))["params"])
    missing_in = model_dir / (WEIGHTS_FILE if (model_dir / WEIGHTS_FILE).is_file() else INDEX_FILE)

    with open_weights(model_dir) as weights:
        available = weights.names

        def load(key_path, leaf):
            tree_path = tuple(k.key for k in key_path)
            name = name_of(tree_path)
            if name not in available:
                raise CheckpointError(f"{missing_in}: parameter '{name}' (bltjax {'/'.join(tree_path)}) is missing")
            expected = _hf_shape(tree_path, leaf.shape, hash_vocab)
            stored = weights.shape(name)
            if stored != expected:
                raise CheckpointError(
                    f"{weights.path_of(name)}: parameter '{name}' has shape {list(stored)}, "
                    f"expected {list(expected)} from {CONFIG_FILE}"
                )
            return _from_hf(tree_path, weights.tensor(name), leaf.shape, hash_vocab).astype(dtype)

        return jax.tree_util.tree_map_with_path(load, shapes)


def _example_blt_args() -> tuple[np.ndarray, np.ndarray]:
    return np.ones((1, 4), np.int32), np.array([[1, 4]], np.int32)


def load_hf_blt(
    model_dir: str | os.PathLike, *, dtype=np.float32, hash_rows_multiple: int = 1, scan_layers: bool = False
) -> tuple[BLT, dict]:
    """Imports a `transformers` BLT folder: returns (model, params) with float32 logits.

    ``model.apply({'params': params}, tokens[B, N], patch_lengths[B, P])`` then gives the
    logits `BltForCausalLM` gives for the same ids and patch lengths. With
    ``hash_rows_multiple`` > 1 the hash tables are zero-padded to that row multiple (for a mesh);
    with ``scan_layers`` the model scans its layers and ``params`` are in the stacked layout.
    """
    model_dir = pathlib.Path(model_dir)
    config_path = model_dir / CONFIG_FILE
    cfg = blt_config_from_hf(read_config_json(config_path), config_path)
    cfg = dataclasses.replace(cfg, hash_rows_multiple=hash_rows_multiple)
    name_of = lambda p: hf_parameter_name(cfg, p)  # noqa: E731
    params = _load_tree(BLT(cfg), _example_blt_args(), name_of, model_dir, dtype, cfg.hash_vocab)
    return _in_layout(BLT, cfg, params, scan_layers)


def load_hf_entropy_model(
    model_dir: str | os.PathLike, *, dtype=np.float32, scan_layers: bool = False
) -> tuple[ByteLM, dict, float | None]:
    """Imports the checkpoint's entropy patcher: (model, params, patching threshold); ``scan_layers`` as for BLT."""
    model_dir = pathlib.Path(model_dir)
    config_path = model_dir / CONFIG_FILE
    raw = read_config_json(config_path)
    cfg = entropy_model_config_from_hf(raw, config_path)
    params = _load_tree(ByteLM(cfg), (np.ones((1, 4), np.int32),), hf_entropy_parameter_name, model_dir, dtype)
    return *_in_layout(ByteLM, cfg, params, scan_layers), raw.get("patching_threshold")


def _in_layout(model_class: type, cfg: BLTConfig | ByteLMConfig, params: dict, scan_layers: bool) -> tuple:
    """(model, params) of the per-layer ``params`` read from a folder, in the layout ``scan_layers`` asks for."""
    if not scan_layers:
        return model_class(cfg), params
    cfg = with_scan(cfg, True)
    return model_class(cfg), stack_layers(params, cfg)


def to_hf_state_dict(model: BLT | ByteLM, params: dict) -> dict[str, np.ndarray]:
    """float32 tensors under their `transformers` names and layouts ([out, in] linear weights).

    A ByteLM is named as the patcher of a BLT checkpoint (``model.patcher.*``). Hash-table rows
    padded for a mesh (``hash_rows_multiple``) are dropped. Parameters of a model that scans its
    layers are exported layer by layer (`bltjax.models.layout.unstack_layers`).
    """
    params = nn.meta.unbox(params)
    if model.config.scan_layers:
        params = unstack_layers(params, model.config)
    hash_vocab = None
    if isinstance(model, BLT):
        name_of = lambda path: hf_parameter_name(model.config, path)  # noqa: E731
        hash_vocab = model.config.hash_vocab
    else:
        name_of = hf_entropy_parameter_name
    tensors = {}
    for key_path, value in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(params))[0]:
        path = tuple(k.key for k in key_path)
        tensors[name_of(path)] = _to_hf(path, np.asarray(value, np.float32), hash_vocab)
    return tensors


def save_hf_blt(
    model: BLT,
    params: dict,
    out_dir: str | os.PathLike,
    *,
    entropy_model: tuple[ByteLM, dict] | None = None,
    threshold: float | None = None,
    dtype: str = "float32",
    max_shard_bytes: int | None = None,
) -> pathlib.Path:
    """Exports the weights and config.json of a `transformers` BLT folder.

    With ``entropy_model=(byte_lm, params)`` the patcher is included, so that
    `BltForCausalLM` can patch by itself. Tensors are stored in ``dtype`` ('float32' or
    'bfloat16'), as one ``model.safetensors`` or, above ``max_shard_bytes``, as shards with
    an index. Each file is written atomically; `bltjax.convert.export` makes the whole folder
    appear at once.
    """
    patcher_cfg = entropy_model[0].config if entropy_model is not None else None
    hf_config = blt_config_to_hf(model.config, patcher_cfg, threshold, dtype)  # refuses before writing
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(model, params)
    if entropy_model is not None:
        tensors.update(to_hf_state_dict(*entropy_model))
    write_weights(out_dir, tensors, dtype=dtype, max_shard_bytes=max_shard_bytes)
    write_atomic(
        out_dir / CONFIG_FILE,
        lambda tmp: pathlib.Path(tmp).write_text(json.dumps(hf_config, indent=2) + "\n"),
    )
    return out_dir
