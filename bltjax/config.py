"""Experiment configs: the ml_collections schema, its validation, and the model records.

Every experiment file in `experiments/` starts from `base_config()` and changes values, never
keys, so a typo on the command line (``--config.model.encodr.dim=8``) fails in ml_collections
itself, and `validate()` rejects inconsistent values before any device work, naming the field.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import pathlib
from typing import Any

import ml_collections
from ml_collections import config_dict

from bltjax import config_checks
from bltjax.config_checks import ConfigError, positive_int, require
from bltjax.models.configs import (
    BLTConfig,
    ByteLMConfig,
    MegaByteConfig,
    TransformerConfig,
)
from bltjax.patching.rule import PatchingError, PatchingRule
from bltjax.runtime import observability

MODEL_TYPES = ("blt", "byte_lm", "megabyte", "token_lm")


def stack_config(
    dim: int,
    n_layers: int,
    n_heads: int,
    *,
    window: int | None = None,
    rope_theta: float = 500000.0,
    n_kv_heads: int | None = None,
    head_dim: int | None = None,
    ffn_hidden: int | None = None,
    norm_eps: float = 1e-5,
) -> ml_collections.ConfigDict:
    """One transformer stack as a ConfigDict (the fields of `TransformerConfig`)."""
    return ml_collections.ConfigDict(
        dict(
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            ffn_hidden=ffn_hidden,
            rope_theta=float(rope_theta),
            norm_eps=norm_eps,
            window=window,
        )
    )


def _common() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = ml_collections.ConfigDict(
        dict(
            path="",  # a folder written by `python -m bltjax.prepare` (+ `bltjax.entropy` for entropy patching)
            seq_len=128,  # bytes per row fed to the model (N)
            batch_size=4,  # global batch, rows
            max_patches=64,  # static patch columns per row (P); overflow is the pipeline's business
            verify="eager",  # content hashes of shards at start: eager / lazy / size (pipeline docstring)
            rows="windows",  # windows: fixed seq_len-byte rows; packed: max_patches patches, <= seq_len bytes
            mixture="",  # "FOLDER:WEIGHT,FOLDER:WEIGHT": weighted folders instead of path (bltjax/data/mixture.py)
        )
    )
    # Device mesh (bltjax/training/sharding.py): -1 on one axis = all remaining devices.
    # sequence: None, or the mesh axis over which long byte rows are split along their length
    # (activation sharding, bltjax/training/sharding.py); the batch then uses the other batch axes.
    # num_slices: TPU slices joined over the data-center network (DCN). With more than one, the
    # sizes above describe one slice and the axis dcn_axis is multiplied by num_slices (one block
    # of it per slice, sharding.make_mesh); the other axes stay inside a slice's ICI.
    config.mesh = ml_collections.ConfigDict(
        dict(data=-1, fsdp=1, tensor=1, sequence=None, num_slices=1, dcn_axis="data")
    )
    # The slice this config is sized for (a pod variant sets it; `bltjax.compile` defaults --topology to it).
    config.topology = ""
    # AdamW of docs/architecture.md §13; the official code decays every parameter (decay_all=True).
    config.optimizer = ml_collections.ConfigDict(
        dict(
            learning_rate=4e-4,
            warmup_steps=100,  # < config.train.steps (validate); the paper configs use the paper's 2000
            schedule="cosine",  # cosine / linear decay after warm-up, or constant
            final_lr_ratio=0.0,  # the paper decays to 0; the official default is 0.1
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            decay_all=True,  # False: no weight decay on norms, embeddings and hash tables
            clip_norm=1.0,  # global gradient-norm clipping, once per optimizer step
        )
    )
    config.train = ml_collections.ConfigDict(
        dict(
            steps=1000,  # optimizer steps
            grad_accum=1,  # micro-batches per step (batch_size must divide evenly)
            log_every=10,  # console / TensorBoard / JSONL metrics
            # validation bits-per-byte every this many steps and at the last step; 0 = only at the last
            # step, and not at all when the data has no eval_split (a corpus of a few large files).
            eval_every=200,
            eval_batches=4,  # validation batches per evaluation
            eval_split="validation",
            checkpoint_every=200,  # 0 = only at the end and on SIGTERM
            keep=3,  # latest checkpoints kept
            keep_every=0,  # also keep every step divisible by this; 0 = none
            async_checkpoint=True,
            data_threads=0,  # grain read threads; 0 is fastest on small hosts
            profile_steps=config_dict.placeholder(tuple),  # (first_step, count): a trace in WORKDIR/profile
        )
    )
    config.metrics = observability.metrics_defaults()  # where metrics go: TensorBoard, JSONL, W&B
    return config


def base_blt_config() -> ml_collections.ConfigDict:
    """Every key a BLT experiment may set, with the defaults of the released checkpoints."""
    config = _common()
    config.model_type = "blt"
    fields = {
        f.name: f.default for f in dataclasses.fields(BLTConfig) if f.name not in ("encoder", "latent", "decoder")
    }
    fields["hash_sizes"] = list(fields["hash_sizes"])
    config.model = ml_collections.ConfigDict(fields)
    config.model.encoder = stack_config(1024, 1, 16, window=512)
    config.model.latent = stack_config(2048, 25, 16)
    config.model.decoder = stack_config(1024, 9, 16, window=512)
    config.patching = ml_collections.ConfigDict(
        dict(
            mode="entropy",
            threshold=1.335442066192627,  # released models (docs/architecture.md §3.4)
            threshold_add=None,
            monotonicity=False,
            patch_size=4.5,  # target mean for static/top-k/calibration
            max_patch_length=None,
            entropy_reset_on_newline=False,  # entropy context restarts after each newline (architecture.md §2.5)
        )
    )
    return config


def base_byte_lm_config() -> ml_collections.ConfigDict:
    """Every key of a byte-level LM experiment (entropy model or baseline)."""
    config = _common()
    config.model_type = "byte_lm"
    config.model = ml_collections.ConfigDict(
        dict(
            stack=stack_config(768, 14, 12, window=512, rope_theta=10000.0),
            vocab_size=260,
            document_mask=True,
            dtype="float32",
            param_dtype="float32",
            init_std_factor="disabled",
            remat="none",
            attention="auto",
            scan_layers=False,
        )
    )
    return config


def base_token_lm_config() -> ml_collections.ConfigDict:
    """Every key of a token-level LM, the BPE baseline: the byte LM's stack over the ids of `bltjax.data.bpe`.

    ``data.path`` is a token folder (``python -m bltjax.bpe``) and ``data.seq_len`` counts tokens.
    """
    config = base_byte_lm_config()
    config.model_type = "token_lm"
    config.model.vocab_size = 4096 + 4  # the token folder's BPE ids + 4 special ids (bltjax.bpe prints it)
    # Bytes per token of the tokenizer (its manifest's bytes_per_token): the FLOPs per byte of plans and
    # `bltjax.flops`; None = read from data.path's manifest where needed. Training measures its own.
    config.data.bytes_per_token = config_dict.placeholder(float)
    return config


def base_megabyte_config() -> ml_collections.ConfigDict:
    """Every key of a MegaByte baseline experiment (docs/architecture.md §19): no patching section."""
    config = _common()
    config.model_type = "megabyte"
    stacks = ("encoder", "latent", "decoder")
    fields = {f.name: f.default for f in dataclasses.fields(MegaByteConfig) if f.name not in stacks}
    fields["hash_sizes"] = list(fields["hash_sizes"])
    config.model = ml_collections.ConfigDict(fields)
    config.model.encoder = stack_config(1024, 1, 16, window=512)
    config.model.latent = stack_config(2048, 25, 16)
    config.model.decoder = stack_config(1024, 9, 16, window=512)
    return config


# Paper model sizes (docs/architecture.md §15.2). Only the 1B row is confirmed by a released checkpoint;
# the others are the spec's best reading of the paper's Table 10 ([UNSURE] there).
PAPER_SIZES = {
    #        encoder (layers, heads, dim), global, decoder, cross_attn_k
    "400m": ((1, 12, 768), (24, 10, 1280), (7, 12, 768), 2),
    "1b": ((1, 16, 1024), (25, 16, 2048), (9, 16, 1024), 2),
    "2b": ((1, 16, 1024), (26, 20, 2560), (9, 16, 1024), 3),
    "4b": ((1, 16, 1024), (36, 24, 3072), (9, 16, 1024), 3),
    "8b": ((1, 20, 1280), (32, 32, 4096), (6, 20, 1280), 4),  # k unknown in the spec: 4 chosen
}


# Pod variants: the TPU slice each paper size is sized for (`experiments/blt_1b.py:v5p-128`). The
# paper's step of 1024 rows x 16 KiB (about 16M bytes) is kept; at most 4 micro-batches keep the
# per-step overhead of accumulation small, and FSDP over every chip divides the state by the slice.
# Per-chip activations scale with the rows each chip holds per micro-batch (256 / chips); the
# measured peaks are in docs/design.md ("Activation sharding and pod variants").
POD_VARIANTS = {
    "400m": ("v5p-64",),
    "1b": ("v5p-128",),
    "2b": ("v5p-256",),
    "4b": ("v5p-256",),
    "8b": ("v5p-512",),
}
POD_GRAD_ACCUM = 4
POD_REMAT = "block"
# The paper's schedule (docs/architecture.md §13: 2000 warm-up steps) over the official training
# template's 100k steps (§2.4); a shorter run sets config.train.steps and, below 2001, the warm-up.
PAPER_WARMUP_STEPS = 2000
PAPER_STEPS = 100_000


def pod_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """What a paper-size step needs on accelerators: FSDP over every device, block remat, scan, accumulation.

    The paper configs carry these by default, so they run as shipped on any slice that holds them;
    a pod variant adds only the slice it was measured on.
    """
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
    config.model.remat = POD_REMAT
    config.train.grad_accum = POD_GRAD_ACCUM
    config.model.scan_layers = True  # identical blocks under nn.scan: compile time independent of depth
    return config


def pod_variant(config: ml_collections.ConfigDict, size: str, variant: str) -> ml_collections.ConfigDict:
    """`pod_settings`, plus the slice ``variant`` the paper config ``size`` is sized for (``config.topology``)."""
    known = POD_VARIANTS[size]
    if variant not in known:
        raise ConfigError(
            f"experiments/blt_{size}.py:{variant}: unknown pod variant; expected one of {list(known)} "
            f"(or no variant for the same settings on any device count)"
        )
    config.topology = variant
    return pod_settings(config)


def recorded_topology(config: ml_collections.ConfigDict) -> str | None:
    """The slice a config records (``config.topology``), or None: `bltjax.compile`'s default --topology."""
    return config.get("topology") or None


def paper_blt_config(size: str, variant: str | None = None) -> ml_collections.ConfigDict:
    """A BLT of the paper's sizes with entropy patching and 16 KiB contexts (docs/architecture.md §13, §15).

    Every paper config carries `pod_settings` and the paper's schedule; ``variant`` names a TPU
    slice of `POD_VARIANTS` (``"v5p-128"``) and records it (`pod_variant`).
    """
    if size not in PAPER_SIZES:
        raise ConfigError(f"size: expected one of {sorted(PAPER_SIZES)}, got {size!r}")
    (el, eh, ed), (gl, gh, gd), (dl, dh, dd), k = PAPER_SIZES[size]
    config = base_blt_config()
    config.model.encoder = stack_config(ed, el, eh, window=512)
    config.model.latent = stack_config(gd, gl, gh)
    config.model.decoder = stack_config(dd, dl, dh, window=512)
    config.model.cross_attn_k = k
    config.model.dtype = "bfloat16"
    config.data.seq_len = 16384
    config.data.max_patches = 4096
    config.data.batch_size = 1024
    config.optimizer.warmup_steps = PAPER_WARMUP_STEPS
    config.train.steps = PAPER_STEPS
    return pod_variant(config, size, variant) if variant else pod_settings(config)


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads ``path/to/experiment.py[:arg]`` the way ``--config`` does (big_vision style)."""
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such experiment config file")
    module_spec = importlib.util.spec_from_file_location(f"bltjax_experiment_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{file}: defines no get_config(arg) function")
    return module.get_config(arg or None)


# --- from ConfigDict to the frozen model records ---------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, ml_collections.ConfigDict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def _record(cls, values: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown field; expected one of {sorted(names)}")
    return cls(**values)


def transformer_config(values: dict, where: str) -> TransformerConfig:
    return _record(TransformerConfig, dict(values), where)


def model_config(config: ml_collections.ConfigDict) -> BLTConfig | ByteLMConfig | MegaByteConfig:
    """The validated frozen record for ``config.model`` (BLTConfig, ByteLMConfig or MegaByteConfig)."""
    validate(config, for_training=False)
    return _model_record(config)


def _model_record(config: ml_collections.ConfigDict) -> BLTConfig | ByteLMConfig | MegaByteConfig:
    values = _plain(config.model)
    if config.model_type in ("blt", "megabyte"):
        for stack in ("encoder", "latent", "decoder"):
            values[stack] = transformer_config(values[stack], f"config.model.{stack}")
        record = BLTConfig if config.model_type == "blt" else MegaByteConfig
        return _record(record, values, "config.model")
    values["stack"] = transformer_config(values["stack"], "config.model.stack")
    return _record(ByteLMConfig, values, "config.model")


# --- validation ------------------------------------------------------------------------------


def _validate_patching(config: ml_collections.ConfigDict) -> None:
    """The patching rule record checks its own fields (bltjax/patching/rule.py); this names them in the config."""
    try:
        PatchingRule.from_config(config.patching)
    except PatchingError as error:
        raise ConfigError(f"config.{error}") from error


def _schema(model_type: str) -> ml_collections.ConfigDict:
    schemas = {"blt": base_blt_config, "megabyte": base_megabyte_config, "token_lm": base_token_lm_config}
    return schemas.get(model_type, base_byte_lm_config)()


def _unknown_keys(config: Any, schema: Any, where: str) -> list[str]:
    if not isinstance(schema, ml_collections.ConfigDict) or not isinstance(config, ml_collections.ConfigDict):
        return []
    if where in ("config.model.encoder", "config.model.latent", "config.model.decoder", "config.model.stack"):
        schema = stack_config(1, 1, 1)
    unknown = [f"{where}.{key}" for key in config.keys() if key not in schema]
    for key in config.keys():
        if key in schema:
            unknown += _unknown_keys(config[key], schema[key], f"{where}.{key}")
    return unknown


def check_keys(config: ml_collections.ConfigDict) -> None:
    """Rejects keys the schema of its model_type does not have (a typo would otherwise be ignored)."""
    unknown = _unknown_keys(config, _schema(config.get("model_type")), "config")
    if unknown:
        raise ConfigError(
            f"{unknown[0]}: unknown key (not in the {config.model_type} config schema of bltjax/config.py)"
        )


def validate(config: ml_collections.ConfigDict, *, for_training: bool = True) -> None:
    """Raises ConfigError, naming the field, for any value that cannot work together.

    ``for_training=False`` (building a model to evaluate or generate with) leaves out the
    optimizer schedule's checks, so that a workdir trained before a rule existed still loads.
    """
    require(
        config.get("model_type") in MODEL_TYPES, "config.model_type", f"one of {MODEL_TYPES}", config.get("model_type")
    )
    check_keys(config)
    config_checks.validate_training(config)
    if for_training:
        config_checks.validate_schedule(config)
    data = config.data
    require(
        positive_int(data.seq_len) and data.seq_len >= 2,
        "config.data.seq_len",
        "an integer >= 2",
        data.seq_len,
    )
    require(positive_int(data.batch_size), "config.data.batch_size", "a positive integer", data.batch_size)
    rows = data.get("rows", "windows")
    packed = rows == "packed"  # max_patches patches per row: no column overflow to size for
    require(rows in ("windows", "packed"), "config.data.rows", "windows or packed", rows)
    require(not packed or config.model_type == "blt", "config.data.rows", "'windows' for a model without patches", rows)
    model = _model_record(config)
    if isinstance(model, BLTConfig):
        config_checks.validate_blt(model)
        _validate_patching(config)
        require(
            positive_int(data.max_patches) and 2 <= data.max_patches <= data.seq_len + 1,
            "config.data.max_patches",
            f"an integer in [2, seq_len + 1 = {data.seq_len + 1}]",
            data.max_patches,
        )
        if config.patching.mode == "byte" and not packed:
            require(
                data.max_patches == data.seq_len + 1,
                "config.data.max_patches",
                f"seq_len + 1 = {data.seq_len + 1} with byte patching (one patch per byte)",
                data.max_patches,
            )
        if config.patching.mode == "static" and not packed:
            needed = 1 + math.ceil(data.seq_len / config.patching.patch_size)
            require(
                data.max_patches >= needed,
                "config.data.max_patches",
                f">= {needed} for static patches of {config.patching.patch_size} bytes",
                data.max_patches,
            )
    elif isinstance(model, MegaByteConfig):
        config_checks.validate_megabyte(model)
    else:
        config_checks.validate_stack(model.stack, "config.model.stack")
        config_checks.validate_common(model, "config.model", token_vocabulary=config.model_type == "token_lm")
        if config.model_type == "token_lm":
            config_checks.validate_bytes_per_token(data.get("bytes_per_token"))
