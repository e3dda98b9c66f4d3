"""`transformers` BltConfig dictionaries (config.json) <-> bltjax's model records.

    record = blt_config_from_hf(json.loads(text), path)          # BLTConfig, checked field by field
    raw = blt_config_to_hf(record, entropy_model_record, threshold)  # refuses what transformers cannot run
    config = experiment_config_from_hf(model_dir)                 # the experiment ConfigDict of a folder

Every error is a `CheckpointError` that names the file and the field. The weights that go with
a config are `bltjax.convert.hf_weights`'s; parameter names and layouts are `bltjax.convert.hf`'s.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import warnings
from typing import Any

from bltjax.models.configs import BLTConfig, ByteLMConfig, TransformerConfig
from bltjax.tokenizer import BOE_ID, BOS_ID, EOS_ID, VOCAB_SIZE

CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A Hugging Face checkpoint that bltjax cannot read; the message names file and field."""


def read_config_json(path: pathlib.Path) -> dict:
    """The JSON object of a folder's config.json; FileNotFoundError / CheckpointError name the file."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file (a Hugging Face BLT folder holds {CONFIG_FILE} and its safetensors weights)"
        )
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


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


def blt_config_to_hf(
    cfg: BLTConfig,
    entropy_model: ByteLMConfig | None = None,
    threshold: float | None = None,
    dtype: str = "float32",
) -> dict:
    """A `transformers` BltConfig dictionary for ``cfg``; raises if transformers cannot run it.

    ``dtype`` ('float32' or 'bfloat16') is the one the weights are stored in, recorded so that
    `from_pretrained(dtype="auto")` loads them as stored.
    """
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
        # The ids of bltjax.tokenizer, so that generate() starts, pads and stops as bltjax does.
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": BOE_ID,
        "dtype": dtype,
    }
    if entropy_model is not None:
        patcher = _stack_to_hf(entropy_model.stack, "blt_patcher")
        patcher["sliding_window"] = entropy_model.stack.window
        out["patcher_config"] = patcher
    return out


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
    raw = read_config_json(config_path)
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
