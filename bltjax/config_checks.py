"""Value checks of the config, field by field; `bltjax.config.validate` runs them in order.

They live apart from the schema so that config.py stays the one place that says what a config
*has*, and this module the one that says what values *work*. Every message starts with the
dotted field name, then what was expected and what was given.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from bltjax.models.configs import (
    ATTENTION_IMPLEMENTATIONS,
    HASH_PRIMES,
    INIT_STD_FACTORS,
    PATCH_QUERY_INITS,
    POOLING_MODES,
    REMAT_POLICIES,
    BLTConfig,
    MegaByteConfig,
    TransformerConfig,
)
from bltjax.runtime import observability

SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A config value that cannot work; the message starts with the dotted field name."""


def require(ok: bool, field: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{field}: expected {expected}, got {got!r}")


def positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def validate_stack(stack: TransformerConfig, where: str) -> None:
    for name in ("dim", "n_layers", "n_heads"):
        require(positive_int(getattr(stack, name)), f"{where}.{name}", "a positive integer", getattr(stack, name))
    if stack.head_dim is None:
        require(stack.dim % stack.n_heads == 0, f"{where}.n_heads", f"a divisor of dim={stack.dim}", stack.n_heads)
    else:
        require(positive_int(stack.head_dim), f"{where}.head_dim", "a positive integer or None", stack.head_dim)
    require(
        stack.resolved_head_dim % 2 == 0,
        f"{where}.head_dim",
        "an even head dimension (RoPE pairs)",
        stack.resolved_head_dim,
    )
    if stack.n_kv_heads is not None:
        require(
            positive_int(stack.n_kv_heads) and stack.n_heads % stack.n_kv_heads == 0,
            f"{where}.n_kv_heads",
            f"None or a divisor of n_heads={stack.n_heads}",
            stack.n_kv_heads,
        )
    require(
        stack.ffn_hidden is None or positive_int(stack.ffn_hidden),
        f"{where}.ffn_hidden",
        "a positive integer or None",
        stack.ffn_hidden,
    )
    require(
        stack.window is None or positive_int(stack.window),
        f"{where}.window",
        "a positive integer or None",
        stack.window,
    )
    require(stack.rope_theta > 0, f"{where}.rope_theta", "a positive number", stack.rope_theta)
    require(0 < stack.norm_eps < 1, f"{where}.norm_eps", "a small positive number", stack.norm_eps)


def validate_common(model, where: str, *, token_vocabulary: bool = False) -> None:
    require(model.remat in REMAT_POLICIES, f"{where}.remat", f"one of {REMAT_POLICIES}", model.remat)
    require(
        model.attention in ATTENTION_IMPLEMENTATIONS,
        f"{where}.attention",
        f"one of {ATTENTION_IMPLEMENTATIONS}",
        model.attention,
    )
    require(model.dtype in DTYPES, f"{where}.dtype", f"one of {DTYPES}", model.dtype)
    require(model.param_dtype in DTYPES, f"{where}.param_dtype", f"one of {DTYPES}", model.param_dtype)
    require(
        model.init_std_factor in INIT_STD_FACTORS,
        f"{where}.init_std_factor",
        f"one of {INIT_STD_FACTORS}",
        model.init_std_factor,
    )
    if token_vocabulary:  # a token LM: the BPE ids of its token folder + 4 special ids, uint16 ids
        require(positive_int(model.vocab_size) and 260 <= model.vocab_size <= 65536, f"{where}.vocab_size",
                "the token folder's BPE ids + 4, in [260, 65536]", model.vocab_size)  # fmt: skip
    else:
        require(model.vocab_size == 260, f"{where}.vocab_size", "260 (256 bytes + 4 special ids)", model.vocab_size)
    require(isinstance(model.scan_layers, bool), f"{where}.scan_layers", "True or False", model.scan_layers)


def validate_bytes_per_token(value: Any) -> None:
    require(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0),
            "config.data.bytes_per_token", "None or the token folder's positive bytes_per_token", value)  # fmt: skip


def validate_blt(model: BLTConfig) -> None:
    w = "config.model"
    for stack in ("encoder", "latent", "decoder"):
        validate_stack(getattr(model, stack), f"{w}.{stack}")
    validate_common(model, w)
    require(
        model.encoder.dim == model.decoder.dim,
        f"{w}.decoder.dim",
        f"the encoder width {model.encoder.dim} (the decoder reads encoder states unprojected)",
        model.decoder.dim,
    )
    require(positive_int(model.cross_attn_k), f"{w}.cross_attn_k", "a positive integer", model.cross_attn_k)
    require(
        not (model.scan_layers and model.cross_attn_all_layers_encoder),
        f"{w}.cross_attn_all_layers_encoder",
        "False with scan_layers=True (the encoder re-pools patch queries between its layers, so they do not scan)",
        model.cross_attn_all_layers_encoder,
    )
    heads = model.cross_attn_heads
    if heads is not None:
        require(
            positive_int(heads) and model.encoder.dim % heads == 0,
            f"{w}.cross_attn_heads",
            f"None or a divisor of the local width {model.encoder.dim}",
            heads,
        )
    for name in ("cross_attn_window_encoder", "cross_attn_window_decoder"):
        require(
            positive_int(getattr(model, name)),
            f"{w}.{name}",
            "a positive number of patches (1 = own patch)",
            getattr(model, name),
        )
    require(model.pooling in POOLING_MODES, f"{w}.pooling", f"one of {POOLING_MODES}", model.pooling)
    require(
        model.patch_query_init in PATCH_QUERY_INITS,
        f"{w}.patch_query_init",
        f"one of {PATCH_QUERY_INITS}",
        model.patch_query_init,
    )
    validate_hashing(model, w)


def validate_hashing(model: BLTConfig | MegaByteConfig, w: str) -> None:
    require(
        all(positive_int(n) for n in model.hash_sizes),
        f"{w}.hash_sizes",
        "a list of positive n-gram sizes",
        model.hash_sizes,
    )
    require(
        isinstance(model.hash_functions, int) and 0 <= model.hash_functions <= len(HASH_PRIMES),
        f"{w}.hash_functions",
        f"an integer in [0, {len(HASH_PRIMES)}]",
        model.hash_functions,
    )
    require(
        positive_int(model.hash_rows_multiple),
        f"{w}.hash_rows_multiple",
        "a positive integer (hash table rows are padded to a multiple of it)",
        model.hash_rows_multiple,
    )
    require(
        positive_int(model.hash_vocab) and model.hash_vocab < 2**31,
        f"{w}.hash_vocab",
        "an integer in [1, 2**31)",
        model.hash_vocab,
    )


def validate_megabyte(model: MegaByteConfig) -> None:
    w = "config.model"
    for stack in ("encoder", "latent", "decoder"):
        validate_stack(getattr(model, stack), f"{w}.{stack}")
    validate_common(model, w)
    require(
        model.encoder.dim == model.decoder.dim,
        f"{w}.decoder.dim",
        f"the encoder width {model.encoder.dim} (the decoder adds global slots to encoder states)",
        model.decoder.dim,
    )
    require(
        positive_int(model.patch_size) and model.patch_size >= 2,
        f"{w}.patch_size",
        "an integer >= 2 (bytes per fixed patch)",
        model.patch_size,
    )
    validate_hashing(model, w)


def validate_training(config: ml_collections.ConfigDict) -> None:
    mesh = config.mesh
    for axis in ("data", "fsdp", "tensor"):
        value = mesh[axis]
        require(value == -1 or positive_int(value), f"config.mesh.{axis}", "a positive integer or -1 (fill)", value)
    require(
        sum(mesh[a] == -1 for a in ("data", "fsdp", "tensor")) <= 1, "config.mesh", "at most one axis set to -1", mesh
    )
    require(
        mesh.get("sequence") in (None, "data", "fsdp", "tensor"),
        "config.mesh.sequence",
        "None or one of the mesh axes 'data', 'fsdp', 'tensor'",
        mesh.get("sequence"),
    )
    # Configs written before multi-slice have neither field: one slice.
    require(positive_int(mesh.get("num_slices", 1)), "config.mesh.num_slices", "a positive integer",
             mesh.get("num_slices"))  # fmt: skip
    require(
        mesh.get("dcn_axis", "data") in ("data", "fsdp", "tensor"),
        "config.mesh.dcn_axis",
        "one of the mesh axes 'data', 'fsdp', 'tensor' (the one that spans the slices)",
        mesh.get("dcn_axis"),
    )
    opt = config.optimizer
    w = "config.optimizer"
    require(opt.learning_rate > 0, f"{w}.learning_rate", "a positive number", opt.learning_rate)
    require(isinstance(opt.warmup_steps, int) and opt.warmup_steps >= 0, f"{w}.warmup_steps", "an int >= 0",
             opt.warmup_steps)  # fmt: skip
    require(opt.schedule in SCHEDULES, f"{w}.schedule", f"one of {SCHEDULES}", opt.schedule)
    require(0 <= opt.final_lr_ratio <= 1, f"{w}.final_lr_ratio", "a number in [0, 1]", opt.final_lr_ratio)
    for name in ("b1", "b2"):
        require(0 <= opt[name] < 1, f"{w}.{name}", "a number in [0, 1)", opt[name])
    require(opt.eps > 0, f"{w}.eps", "a positive number", opt.eps)
    require(opt.weight_decay >= 0, f"{w}.weight_decay", "a number >= 0", opt.weight_decay)
    require(opt.clip_norm is None or opt.clip_norm > 0, f"{w}.clip_norm", "None or a positive number", opt.clip_norm)
    train = config.train
    w = "config.train"
    require(positive_int(train.steps), f"{w}.steps", "a positive integer", train.steps)
    require(positive_int(train.grad_accum), f"{w}.grad_accum", "a positive integer", train.grad_accum)
    require(
        config.data.batch_size % train.grad_accum == 0,
        f"{w}.grad_accum",
        f"a divisor of config.data.batch_size={config.data.batch_size}",
        train.grad_accum,
    )
    require(positive_int(train.log_every), f"{w}.log_every", "a positive integer", train.log_every)
    for name in ("eval_every", "checkpoint_every", "keep_every", "data_threads"):
        value = train[name]
        require(isinstance(value, int) and value >= 0, f"{w}.{name}", "an integer >= 0", value)
    require(positive_int(train.eval_batches), f"{w}.eval_batches", "a positive integer", train.eval_batches)
    require(positive_int(train.keep), f"{w}.keep", "a positive integer", train.keep)
    try:
        observability.check(config)
    except observability.ObservabilityError as error:
        raise ConfigError(str(error)) from error
    require(config.data.verify in ("eager", "lazy", "size"), "config.data.verify", "eager, lazy or size",
             config.data.verify)  # fmt: skip


def validate_schedule(config: ml_collections.ConfigDict) -> None:
    """A run that ends inside its warm-up never reaches its learning rate (and never decays)."""
    warmup, steps = config.optimizer.warmup_steps, config.train.steps
    if warmup >= steps:
        raise ConfigError(
            f"config.optimizer.warmup_steps: expected fewer than config.train.steps={steps} (the warm-up must end "
            f"before the run does), got {warmup}; lower config.optimizer.warmup_steps or raise config.train.steps"
        )
