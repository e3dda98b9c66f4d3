"""Hugging Face `transformers` BLT checkpoints <-> bltjax (no torch needed).

    model, params = load_hf_blt(hf_dir)                         # BltForCausalLM weights as a BLT
    byte_lm, params, threshold = load_hf_entropy_model(hf_dir)  # its entropy patcher
    save_hf_blt(model, params, out_dir, entropy_model=(byte_lm, params), threshold=threshold)

A checkpoint folder holds ``config.json`` (a `BltConfig` with four sub-configs) and
``model.safetensors`` (a `BltForCausalLM` state dict, linear weights as [out, in]), read
through safetensors' numpy API (bfloat16 included, as ml_dtypes arrays). Import maps every
parameter by name, checks its shape and reshapes it into the Linen tree; export does the
reverse so that `BltForCausalLM.from_pretrained` loads a model trained here.

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
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from bltjax.models.blt import BLT
from bltjax.models.byte_lm import ByteLM
from bltjax.models.configs import BLTConfig, ByteLMConfig, TransformerConfig
from bltjax.models.layout import stack_layers, unstack_layers, with_scan
from bltjax.runtime.atomic import write_atomic
from bltjax.tokenizer import VOCAB_SIZE

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A Hugging Face checkpoint that bltjax cannot read; the message names file and field."""


# --- config.json <-> model records -----------------------------------------------------------


def _field(config: dict, key: str, where: str, path: pathlib.Path, default: Any = KeyError) -> Any:
    if key in config and config[key] is not None:
        return config[key]
    if default is KeyError:
        raise CheckpointError(f"{path}: field '{where}{key}' is missing")
    return default


def _rope_theta(sub: dict, where: str, path: pathlib.Path, default: float) -> float:
    rope = sub.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise CheckpointError(
            f"{path}: field '{where}rope_parameters.rope_type' is {rope_type!r}; only 'default' is supported"
        )
    if sub.get("rope_scaling"):
        raise CheckpointError(f"{path}: field '{where}rope_scaling' is set; RoPE scaling is not supported")
    return float(rope.get("rope_theta", sub.get("rope_theta", default)))


# transformers' class defaults (those of the released blt-1b): `save_pretrained` leaves out
# nothing of a sub-config, but hand-written config.json files may.
_STACK_DEFAULTS = {
    "encoder_config.": dict(hidden_size=1024, num_attention_heads=16, num_hidden_layers=1, rope_theta=500000.0),
    "decoder_config.": dict(hidden_size=1024, num_attention_heads=16, num_hidden_layers=9, rope_theta=500000.0),
    "global_config.": dict(hidden_size=2048, num_attention_heads=16, num_hidden_layers=25, rope_theta=500000.0),
    "patcher_config.": dict(hidden_size=768, num_attention_heads=12, num_hidden_layers=14, rope_theta=10000.0),
}


def _stack_from_hf(sub: dict, where: str, path: pathlib.Path, window: int | None) -> TransformerConfig:
    defaults = _STACK_DEFAULTS[where]
    act = sub.get("hidden_act", "silu")
    if act != "silu" and where != "patcher_config.":  # transformers forces silu in the patcher
        raise CheckpointError(f"{path}: field '{where}hidden_act' is {act!r}; BLT blocks use 'silu' (SwiGLU)")
    dim = int(_field(sub, "hidden_size", where, path, defaults["hidden_size"]))
    heads = int(_field(sub, "num_attention_heads", where, path, defaults["num_attention_heads"]))
    kv_heads = int(sub.get("num_key_value_heads") or heads)
    head_dim = sub.get("head_dim")
    if head_dim is not None and head_dim != dim // heads:
        raise CheckpointError(
            f"{path}: field '{where}head_dim' is {head_dim}, but transformers' BLT attention uses "
            f"hidden_size // num_attention_heads = {dim // heads}; such a checkpoint is not supported"
        )
    hidden = sub.get("intermediate_size") or int(8 * dim / 3)
    return TransformerConfig(
        dim=dim,
        n_layers=int(_field(sub, "num_hidden_layers", where, path, defaults["num_hidden_layers"])),
        n_heads=heads,
        n_kv_heads=kv_heads if kv_heads != heads else None,
        ffn_hidden=int(hidden),
        rope_theta=_rope_theta(sub, where, path, defaults["rope_theta"]),
        norm_eps=float(sub.get("rms_norm_eps", 1e-5)),
        window=window,
    )


def blt_config_from_hf(config: dict, path: pathlib.Path = pathlib.Path(CONFIG_FILE)) -> BLTConfig:
    """The BLTConfig equivalent to a `transformers` BltConfig dictionary."""
    if config.get("model_type", "blt") != "blt":
        raise CheckpointError(f"{path}: field 'model_type' is {config.get('model_type')!r}; expected 'blt'")
    if config.get("vocab_size", VOCAB_SIZE) != VOCAB_SIZE:
        raise CheckpointError(f"{path}: field 'vocab_size' is {config['vocab_size']}; expected {VOCAB_SIZE}")
    if config.get("tie_word_embeddings"):
        raise CheckpointError(f"{path}: field 'tie_word_embeddings' is true; BLT never ties weights")
    window = config.get("local_attention_window_len", 512)  # null: full causal attention
    encoder_sub = config.get("encoder_config") or {}
    decoder_sub = config.get("decoder_config") or {}
    global_sub = config.get("global_config") or {}
    # transformers applies the encoder's sliding-window mask to the decoder as well, and never
    # uses decoder_config.sliding_window.
    encoder = _stack_from_hf(encoder_sub, "encoder_config.", path, window)
    decoder = _stack_from_hf(decoder_sub, "decoder_config.", path, window)
    latent = _stack_from_hf(global_sub, "global_config.", path, None)
    if decoder.dim != encoder.dim:
        raise CheckpointError(
            f"{path}: field 'decoder_config.hidden_size' is {decoder.dim}; it must equal the encoder's {encoder.dim}"
        )
    k = int(config.get("cross_attn_k", 2))
    for where, sub in (("encoder_config", encoder_sub), ("decoder_config", decoder_sub)):
        if sub.get("cross_attn_k", k) != k:
            raise CheckpointError(
                f"{path}: field '{where}.cross_attn_k' is {sub['cross_attn_k']}; expected the top-level {k}"
            )
    if decoder_sub.get("hidden_size_global", latent.dim) != latent.dim:
        raise CheckpointError(
            f"{path}: field 'decoder_config.hidden_size_global' is {decoder_sub['hidden_size_global']}; "
            f"expected the global width {latent.dim}"
        )
    return BLTConfig(
        encoder=encoder,
        latent=latent,
        decoder=decoder,
        cross_attn_k=k,
        cross_attn_all_layers_encoder=bool(encoder_sub.get("cross_attn_all_layers", False)),
        cross_attn_all_layers_decoder=bool(decoder_sub.get("cross_attn_all_layers", True)),
        repool_every_cross_attn_layer=True,
        hash_sizes=tuple(int(n) for n in config.get("encoder_hash_byte_group_size") or (3, 4, 5, 6, 7, 8)),
        hash_functions=int(config.get("encoder_hash_byte_group_nb_functions", 1)),
        hash_vocab=int(config.get("encoder_hash_byte_group_vocab", 500002)),
        document_mask=False,
    )


def entropy_model_config_from_hf(config: dict, path: pathlib.Path = pathlib.Path(CONFIG_FILE)) -> ByteLMConfig:
    """The ByteLMConfig of the checkpoint's entropy patcher (`patcher_config`)."""
    if config.get("patch_in_forward") is False or "patcher_config" not in config:
        raise CheckpointError(f"{path}: field 'patcher_config' is missing (the checkpoint has no entropy patcher)")
    sub = config["patcher_config"] or {}
    stack = _stack_from_hf(sub, "patcher_config.", path, sub.get("sliding_window", 512))
    return ByteLMConfig(stack=stack, document_mask=False)


def _stack_to_hf(stack: TransformerConfig, model_type: str) -> dict:
    return {
        "model_type": model_type,
        "hidden_size": stack.dim,
        "num_hidden_layers": stack.n_layers,
        "num_attention_heads": stack.n_heads,
        "num_key_value_heads": stack.kv_heads,
        "intermediate_size": stack.hidden_dim,
        "rms_norm_eps": stack.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": stack.rope_theta},
        "hidden_act": "silu",
        "vocab_size": VOCAB_SIZE,
        "dropout": 0.0,
    }


def blt_config_to_hf(cfg: BLTConfig, entropy_model: ByteLMConfig | None = None, threshold: float | None = None) -> dict:
    """A `transformers` BltConfig dictionary for ``cfg``; raises if transformers cannot run it."""
    unsupported = {
        "cross_attn_window_encoder": cfg.cross_attn_window_encoder != 1,
        "cross_attn_window_decoder": cfg.cross_attn_window_decoder != 1,
        "double_cross_attn_residual": not cfg.double_cross_attn_residual,
        "pooling": cfg.pooling != "max",
        "patch_query_init": cfg.patch_query_init != "hidden",
        "hash_normalize": cfg.hash_normalize,
        # transformers' cross-attentions use each local stack's own (kv) head counts.
        "cross_attn_heads": cfg.cross_attn_heads is not None
        and any(cfg.cross_attn_heads != s.n_heads or s.kv_heads != s.n_heads for s in (cfg.encoder, cfg.decoder)),
        "decoder.window": cfg.decoder.window != cfg.encoder.window,
        "latent.window": cfg.latent.window is not None,
        "repool_every_cross_attn_layer": (
            not cfg.repool_every_cross_attn_layer and cfg.cross_attn_all_layers_encoder and cfg.encoder.n_layers > 1
        ),
    }
    for stack in ("encoder", "latent", "decoder"):
        s = getattr(cfg, stack)
        unsupported[f"{stack}.head_dim"] = s.head_dim not in (None, s.dim // s.n_heads)
    bad = [name for name, flag in unsupported.items() if flag]
    if bad:
        raise CheckpointError(
            f"config.model.{bad[0]}: this value has no equivalent in transformers' BLT; cannot export"
        )
    if cfg.document_mask:
        warnings.warn(
            "config.model.document_mask is on, transformers' BLT has no document masks: rows holding "
            "several documents (an EOS before the end) will give different logits there",
            stacklevel=2,
        )
    encoder = _stack_to_hf(cfg.encoder, "blt_local_encoder")
    encoder.update(
        cross_attn_all_layers=cfg.cross_attn_all_layers_encoder,
        cross_attn_k=cfg.cross_attn_k,
        hidden_size_global=cfg.latent.dim,
        sliding_window=cfg.encoder.window,
    )
    decoder = _stack_to_hf(cfg.decoder, "blt_local_decoder")
    decoder.update(
        cross_attn_all_layers=cfg.cross_attn_all_layers_decoder,
        cross_attn_k=cfg.cross_attn_k,
        hidden_size_global=cfg.latent.dim,
    )
    latent = _stack_to_hf(cfg.latent, "blt_global_transformer")
    latent.pop("vocab_size")
    out = {
        "model_type": "blt",
        "architectures": ["BltForCausalLM"],
        "vocab_size": VOCAB_SIZE,
        "cross_attn_k": cfg.cross_attn_k,
        "local_attention_window_len": cfg.encoder.window,
        "encoder_hash_byte_group_size": list(cfg.hash_sizes),
        "encoder_hash_byte_group_nb_functions": cfg.hash_functions,
        "encoder_hash_byte_group_vocab": cfg.hash_vocab,
        "encoder_config": encoder,
        "decoder_config": decoder,
        "global_config": latent,
        "tie_word_embeddings": False,
        "use_cache": False,
        "patch_in_forward": entropy_model is not None,
        "patch_size": 4,  # transformers only tests it against None to enable its patcher
        "patching_mode": "entropy",
        "patching_threshold": threshold if threshold is not None else 1.335442066192627,
        "max_patch_length": None,
    }
    if entropy_model is not None:
        patcher = _stack_to_hf(entropy_model.stack, "blt_patcher")
        patcher["sliding_window"] = entropy_model.stack.window
        out["patcher_config"] = patcher
    return out


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


# --- safetensors ------------------------------------------------------------------------------


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file (a Hugging Face BLT folder holds {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err


@contextmanager
def _weights(model_dir: pathlib.Path) -> Iterator[Any]:
    """safetensors' own reader of ``model.safetensors``, yielding numpy arrays (bfloat16 as ml_dtypes')."""
    path = model_dir / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file (a Hugging Face BLT folder holds {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    try:
        reader = safe_open(path, framework="np")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    with reader:
        yield reader


def _load_tree(
    module: nn.Module,
    example_args: tuple,
    name_of: Callable[[tuple[str, ...]], str],
    model_dir: pathlib.Path,
    dtype: Any,
    hash_vocab: int | None = None,
) -> dict:
    """Fills the module's parameter tree from the folder's safetensors file, checking every name and shape."""
    shapes = nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), *example_args))["params"])
    path = model_dir / WEIGHTS_FILE

    with _weights(model_dir) as weights:
        available = set(weights.keys())

        def load(key_path, leaf):
            tree_path = tuple(k.key for k in key_path)
            name = name_of(tree_path)
            if name not in available:
                raise CheckpointError(f"{path}: parameter '{name}' (bltjax {'/'.join(tree_path)}) is missing")
            expected = _hf_shape(tree_path, leaf.shape, hash_vocab)
            stored = tuple(weights.get_slice(name).get_shape())
            if stored != expected:
                raise CheckpointError(
                    f"{path}: parameter '{name}' has shape {list(stored)}, expected {list(expected)} from {CONFIG_FILE}"
                )
            return _from_hf(tree_path, weights.get_tensor(name), leaf.shape, hash_vocab).astype(dtype)

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
    cfg = blt_config_from_hf(_read_json(config_path), config_path)
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
    raw = _read_json(config_path)
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
) -> pathlib.Path:
    """Exports to a `transformers` BLT folder (config.json + model.safetensors, float32).

    With ``entropy_model=(byte_lm, params)`` the patcher is included, so that
    `BltForCausalLM` can patch by itself. Each file is written atomically.
    """
    patcher_cfg = entropy_model[0].config if entropy_model is not None else None
    hf_config = blt_config_to_hf(model.config, patcher_cfg, threshold)  # refuses before writing
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(model, params)
    if entropy_model is not None:
        tensors.update(to_hf_state_dict(*entropy_model))
    write_atomic(out_dir / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_atomic(
        out_dir / CONFIG_FILE,
        lambda tmp: pathlib.Path(tmp).write_text(json.dumps(hf_config, indent=2) + "\n"),
    )
    return out_dir


def experiment_config_from_hf(model_dir: str | os.PathLike) -> Any:
    """The experiment ConfigDict of a `transformers` BLT folder, so that it loads like a bltjax run.

    Model fields come from `blt_config_from_hf`; patching is the checkpoint's own: entropy
    patching with its ``patching_threshold`` and ``max_patch_length`` when it carries an
    entropy patcher, otherwise static patches of ``patch_size`` bytes. Data and training fields
    keep bltjax's defaults (a Hugging Face folder records neither).
    """
    import ml_collections

    from bltjax.config import base_blt_config

    model_dir = pathlib.Path(model_dir)
    config_path = model_dir / CONFIG_FILE
    raw = _read_json(config_path)
    record = blt_config_from_hf(raw, config_path)
    config = base_blt_config()
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        if isinstance(value, TransformerConfig):
            value = ml_collections.ConfigDict(dataclasses.asdict(value))
        elif isinstance(value, tuple):
            value = list(value)
        config.model[field.name] = value
    if raw.get("patch_in_forward") is not False and raw.get("patcher_config"):
        config.patching.mode = "entropy"
        threshold = raw.get("patching_threshold")
        if threshold is not None:
            config.patching.threshold = float(threshold)
        config.patching.max_patch_length = raw.get("max_patch_length")
    else:
        config.patching.mode = "static"
        config.patching.patch_size = float(raw.get("patch_size") or config.patching.patch_size)
    return config
