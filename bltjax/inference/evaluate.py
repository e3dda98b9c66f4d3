"""Bits-per-byte of a trained model over a whole data split: every byte counted exactly once.

  from bltjax.inference.evaluate import evaluate
  result = evaluate(load_for_inference("runs/tiny"), "data/bundled", split="validation")

`python -m bltjax.eval` is the command around `evaluate_and_write`. The training loop's
validation number is a sample (a few shuffled batches). This is the full measurement of
docs/architecture.md §11, and its conventions are chosen so that it is exact and reproducible:

* Windows. Each shard of the split is read as consecutive, non-overlapping windows of the
  model's N = `data.seq_len` inputs: window w holds tokens [wN, wN + N + 1) (N inputs and the
  target of the last one), as in training. Consecutive windows share one token, so every token
  of a shard except its first is a target exactly once; the last window of a shard is padded
  with BOE and the padded targets are masked out. Shards are never joined: the first token of
  each shard (a BOS) is the only token that is not predicted.
* Patching is the training patching (`pipeline.BatchBuilder`): entropy start bits from the
  sidecars next to the shards (chosen by threshold, as `pipeline.attach_sidecars` does),
  static / space / byte computed, the first patch of every window of length 1. `--patching.*`
  overrides the saved config (e.g. another threshold, whose sidecars must exist).
* No byte is dropped for lack of patch columns. Training truncates rows with more than
  `data.max_patches` patches (masking their tail); evaluation instead scans the split's patch
  counts first and, if some window needs more columns, evaluates with enough columns for all
  of them (rounded up to a multiple of 64, at most N + 1). Padding patch columns change
  nothing that is computed for real positions, so the numbers are those of unlimited columns.
* Batches. `batch_size` rows (default `data.batch_size`), sharded over the mesh's batch axes
  (data, fsdp). A batch size that the batch shards (or processes) do not divide is **rounded up**,
  and every batch that has fewer windows than rows (the last one) is filled with masked copies
  of a real row, so any batch size works on any device count and the counts stay exact.
* Token LMs (``model_type`` token_lm, ``data_dir`` a folder of ``python -m bltjax.bpe``): the
  same windows over token ids; bpb divides the nats by the bytes the targets cover (BOS / EOS
  one each), bpb_bytes the text targets' nats by their text bytes (training/token_metrics.py),
  so both compare with a byte-level model's on the same documents. ``n_targets`` counts tokens.
* Reported: bpb over all targets (BOS/EOS included, the official training log's number) and
  over byte targets only (the paper's), total nats, targets, bytes, patches and mean patch size
  (targets per patch; n/a for byte-level models), batches and seconds.

`evaluate_and_write` writes the numbers as JSON (atomically): ``WORKDIR/eval/<split>-step<N>.json``
for a workdir, ``MODEL_DIR/eval/<split>.json`` for a model folder, or ``out``. Patching overrides
are appended to the file name; `format_table` renders the markdown table the command prints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from bltjax.config import ConfigError, validate
from bltjax.data import bpe, pipeline, token_pipeline
from bltjax.data import shards as shard_format
from bltjax.inference.restore import InferenceModel, load_for_inference
from bltjax.patching import PatchingRule
from bltjax.runtime import distributed, paths
from bltjax.runtime.atomic import write_atomic
from bltjax.runtime.progress import progress_bar
from bltjax.tokenizer import BOE_ID
from bltjax.training import sharding
from bltjax.training.metrics import MetricsWriter, bits_per_byte
from bltjax.training.step import batch_fields, jit_eval_step, make_eval_step
from bltjax.training.token_metrics import bpb_denominator

EVAL_DIR = "eval"
PATCH_COLUMN_MULTIPLE = 64
PATCHING_KEYS = (
    "mode",
    "threshold",
    "threshold_add",
    "monotonicity",
    "patch_size",
    "max_patch_length",
    "reference_quirks",
    "entropy_reset_on_newline",
)


class EvalError(ValueError):
    """Command-line arguments that do not fit together; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """The numbers of one evaluation; `to_json` is what the CLI writes."""

    source: str  # the checkpoint step folder or model folder
    step: int | None
    data_dir: str
    split: str
    model_type: str
    patching: dict[str, Any] | None  # the patching evaluated with (None: byte-level model)
    bpb: float  # every target counts as a byte, BOS/EOS included (official training log)
    bpb_bytes: float  # byte targets only (the paper's definition)
    loss: float  # nats per target
    nats: float  # summed over all targets
    nats_bytes: float  # summed over byte targets
    n_targets: int
    n_bytes: int
    n_patches: int | None  # patches over the real inputs; None for byte-level models
    mean_patch_size: float | None  # targets per patch
    n_windows: int
    n_shards: int
    steps: int  # batches evaluated
    batch_size: int  # rows per batch, after rounding up to the batch shards
    seq_len: int
    max_patches: int | None  # patch columns used (>= the config's when some window needed more)
    devices: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- reading the split as windows ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Window:
    tokens: np.ndarray  # int32 [N + 1], BOE-padded
    starts: np.ndarray | None  # bool [N + 1] entropy start bits (False on padding)
    targets: int  # real targets in the window (N except in a shard's last window)


def _shard_windows(shard: pipeline.Shard, seq_len: int) -> Iterator[_Window]:
    """Consecutive windows [wN, wN + N + 1) of one shard; the last one BOE-padded."""
    try:
        tokens, _ = shard_format.read_shard(shard.data_dir, shard.info.split, shard.info.index)
    except (FileNotFoundError, shard_format.DataFormatError) as err:
        raise pipeline.DataError(str(err)) from err
    starts = None
    if shard.starts_path is not None:
        starts = shard_format.open_array(shard.starts_path, np.uint8, (shard.n_tokens + 7) // 8)
    total = int(tokens.shape[0])
    for offset in range(0, total - 1, seq_len):
        stop = min(offset + seq_len + 1, total)
        window = np.full(seq_len + 1, BOE_ID, np.int32)
        window[: stop - offset] = tokens[offset:stop]
        bits = None
        if starts is not None:
            first_byte = offset // 8
            unpacked = np.unpackbits(starts[first_byte : (stop + 7) // 8])
            bits = np.zeros(seq_len + 1, bool)
            bits[: stop - offset] = unpacked[offset - 8 * first_byte : stop - 8 * first_byte].astype(bool)
        yield _Window(window, bits, stop - offset - 1)


def _batches(shards: Sequence[pipeline.Shard], seq_len: int, rows: int) -> Iterator[list[_Window]]:
    """Groups of up to `rows` windows in stream order, crossing shard boundaries."""
    group: list[_Window] = []
    for shard in shards:
        for window in _shard_windows(shard, seq_len):
            group.append(window)
            if len(group) == rows:
                yield group
                group = []
    if group:
        yield group


def _stack(group: Sequence[_Window], rows: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(source elements for BatchBuilder, real targets per row); missing rows copy row 0."""
    padded = list(group) + [group[0]] * (rows - len(group))
    element = {"window": np.stack([w.tokens for w in padded])}
    if group[0].starts is not None:
        element["starts"] = np.stack([w.starts for w in padded])
    real = np.array([w.targets for w in group] + [0] * (rows - len(group)), np.int64)
    return element, real


def _patches_per_row(lengths: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Patches that start at a real input position (position < real targets of the row)."""
    starts = np.cumsum(lengths, axis=1) - lengths
    return np.sum((lengths > 0) & (starts < real[:, None]), axis=1)


# --- configuration ---------------------------------------------------------------------------------


def _eval_config(config: ml_collections.ConfigDict, patching_overrides: Mapping[str, Any] | None):
    """A copy of the saved config with the patching overrides applied and validated."""
    config = ml_collections.ConfigDict(config.to_dict())
    overrides = dict(patching_overrides or {})
    if not overrides:
        return config
    if config.model_type != "blt":
        raise ConfigError(f"config.patching: a {config.model_type} model has no patching; got overrides {overrides}")
    unknown = sorted(set(overrides) - set(PATCHING_KEYS))
    if unknown:
        raise ConfigError(f"config.patching.{unknown[0]}: unknown key; expected one of {list(PATCHING_KEYS)}")
    if overrides.get("mode", "entropy") != "entropy":  # thresholds belong to entropy patching only
        overrides.setdefault("threshold", None)
        overrides.setdefault("threshold_add", None)
        overrides.setdefault("entropy_reset_on_newline", False)
    for key, value in overrides.items():
        config.patching[key] = value
    check = ml_collections.ConfigDict(config.to_dict())
    check.data.max_patches = int(config.data.seq_len) + 1  # columns are sized from the data (module docstring)
    validate(check, for_training=False)  # a model to evaluate: the optimizer schedule is not used
    return config


def _batch_rows(batch_size: int, mesh: jax.sharding.Mesh) -> int:
    """`batch_size` rounded up to a multiple of the batch shards and of the process count."""
    multiple = math.lcm(sharding.batch_shards(mesh), jax.process_count())
    return -(-batch_size // multiple) * multiple


def _patch_columns(builder: pipeline.BatchBuilder, shards: Sequence[pipeline.Shard], rows: int) -> int:
    """Patch columns that hold every window of the split (module docstring: no byte dropped)."""
    needed = 2
    for group in _batches(shards, builder.seq_len, rows):
        element, _ = _stack(group, len(group))
        tokens = element["window"][:, :-1]
        lengths = builder.lengths(tokens, element.get("starts"))
        needed = max(needed, int(np.count_nonzero(lengths, axis=1).max()))
    if needed <= builder.max_patches:
        return builder.max_patches
    return min(-(-needed // PATCH_COLUMN_MULTIPLE) * PATCH_COLUMN_MULTIPLE, builder.seq_len + 1)


# --- evaluation ------------------------------------------------------------------------------------


def evaluate(
    inference_model: InferenceModel,
    data_dir: str | os.PathLike,
    *,
    split: str = "validation",
    batch_size: int | None = None,
    patching_overrides: Mapping[str, Any] | None = None,
    sidecar_tag: str | None = None,
    verify: str = "eager",
    progress: bool = True,
) -> EvalResult:
    """Bits-per-byte over every target of `split` (see the module docstring for the conventions).

    ``progress``: a line on stderr (process 0 only) with the targets done, their rate and an ETA.

    Raises ConfigError for bad patching overrides and pipeline.DataError for a missing or
    inconsistent data folder, split or sidecar, each naming the field or file.
    """
    start_time = time.time()
    config = _eval_config(inference_model.config, patching_overrides)
    data_dir = paths.resolve(data_dir)
    if not data_dir.is_dir():
        raise pipeline.DataError(f"{data_dir}: no such data folder (expected one written by python -m bltjax.prepare)")
    if verify not in pipeline.VERIFY_MODES:
        raise EvalError(f"verify: expected one of {pipeline.VERIFY_MODES}, got {verify!r}")
    seq_len = int(config.data.seq_len)
    token_lm = config.model_type == "token_lm"  # token shards of python -m bltjax.bpe (data/token_pipeline.py)
    shards = (token_pipeline.read_split if token_lm else pipeline.read_split)(data_dir, split)
    if token_lm:
        token_pipeline.check_vocabulary(config, token_pipeline.load_manifest(data_dir))
    patching = {key: config.patching.get(key) for key in PATCHING_KEYS} if config.model_type == "blt" else None
    mode = None if patching is None else patching["mode"]
    if mode == "entropy":
        shards = pipeline.attach_sidecars(data_dir, shards, patching, tag=sidecar_tag)
    for shard in shards:
        (token_pipeline.check_shard if token_lm else pipeline.check_shard)(shard, contents=verify == "eager")

    mesh = inference_model.mesh
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise EvalError(f"batch_size: expected a positive number of rows, got {batch_size!r}")
    rows = _batch_rows(int(batch_size or config.data.batch_size), mesh)
    builder = pipeline.BatchBuilder(
        seq_len=seq_len,
        max_patches=None if mode is None else int(config.data.max_patches),
        rule=None if patching is None else PatchingRule.from_config(patching),
        overflow="error",  # cannot happen: the columns are sized for the whole split
    )
    if mode is not None:
        builder = dataclasses.replace(builder, max_patches=_patch_columns(builder, shards, rows))
    if token_lm:  # adds each target's covered bytes, bpb's denominator (training/token_metrics.py)
        builder = token_pipeline.builder_of(config, data_dir)

    fields = batch_fields(config.model_type)
    batch_sharding = sharding.batch_sharding(mesh)
    param_shardings = jax.tree.map(lambda x: x.sharding, inference_model.params)
    step_fn = jit_eval_step(
        make_eval_step(inference_model.model, model_type=config.model_type), param_shardings, batch_sharding
    )
    local_rows = rows // jax.process_count()
    first_row = jax.process_index() * local_rows

    totals = {"nats_sum": 0.0, "n_targets": 0, "nats_bytes_sum": 0.0, "n_bytes": 0}
    if token_lm:
        totals["n_target_bytes"] = 0
    n_patches, n_windows, steps = 0, 0, 0
    pending: list[dict[str, jax.Array]] = []

    def consume(stats: dict[str, jax.Array]) -> None:
        for key, value in jax.device_get(stats).items():
            totals[key] += float(value) if key.startswith("nats") else int(value)

    total_targets = sum(max(shard.n_tokens - 1, 0) for shard in shards)  # every token but a shard's first
    bar = progress_bar(f"eval {split}", total=total_targets, unit=" targets", enabled=progress)
    for group in _batches(shards, seq_len, rows):
        element, real = _stack(group, rows)
        bar.update(int(real.sum()))
        batch = builder(element)
        batch["loss_mask"] &= (real > 0)[:, None]  # filler rows count nothing
        if mode is not None:
            n_patches += int(_patches_per_row(batch["patch_lengths"], real).sum())
        n_windows += len(group)
        local = {name: batch[name][first_row : first_row + local_rows] for name in fields}
        global_batch = pipeline.global_batch(local, batch_sharding)
        if steps == 0:  # several processes: all compiled before the first collective
            distributed.compile_then_meet("eval step", step_fn, inference_model.params, global_batch)
        pending.append(step_fn(inference_model.params, global_batch))
        steps += 1
        if len(pending) > 1:  # fetch one batch late: the host builds the next while this one runs
            consume(pending.pop(0))
    for stats in pending:
        consume(stats)
    bar.close()
    if n_windows == 0:
        raise pipeline.DataError(f"{data_dir}: split {split!r} holds no token to predict")

    n_targets, n_bytes = totals["n_targets"], totals["n_bytes"]
    return EvalResult(
        source=inference_model.source,
        step=inference_model.step,
        data_dir=str(data_dir),
        split=split,
        model_type=config.model_type,
        patching=patching,
        bpb=bits_per_byte(totals["nats_sum"], bpb_denominator(totals)),
        bpb_bytes=bits_per_byte(totals["nats_bytes_sum"], n_bytes),
        loss=totals["nats_sum"] / max(n_targets, 1),
        nats=totals["nats_sum"],
        nats_bytes=totals["nats_bytes_sum"],
        n_targets=n_targets,
        n_bytes=n_bytes,
        n_patches=n_patches if mode is not None else None,
        mean_patch_size=(n_targets / n_patches if n_patches else math.nan) if mode is not None else None,
        n_windows=n_windows,
        n_shards=len(shards),
        steps=steps,
        batch_size=rows,
        seq_len=seq_len,
        max_patches=None if token_lm else builder.max_patches,
        devices=int(mesh.devices.size),
        seconds=time.time() - start_time,
    )


# --- reporting -------------------------------------------------------------------------------------


def format_table(result: EvalResult) -> str:
    """A markdown table of the result (what the CLI prints)."""
    na = "n/a"
    where = result.source if result.step is None else f"{result.source} (step {result.step})"
    patching = na
    if result.patching is not None:
        patching = ", ".join(f"{k}={v}" for k, v in result.patching.items() if v is not None)
    rows = [
        ("model", where),
        ("data", f"{result.data_dir} split {result.split!r} ({result.n_shards} shards, {result.n_windows} windows)"),
        ("patching", patching),
        ("bits per byte (all targets, BOS/EOS incl.)", f"{result.bpb:.4f}"),
        ("bits per byte (byte targets only)", f"{result.bpb_bytes:.4f}"),
        ("loss (nats per target)", f"{result.loss:.4f}"),
        ("total nats", f"{result.nats:.1f}"),
        ("targets / bytes", f"{result.n_targets} / {result.n_bytes}"),
        ("patches", na if result.n_patches is None else str(result.n_patches)),
        ("mean patch size", na if result.mean_patch_size is None else f"{result.mean_patch_size:.3f}"),
        ("batches x rows", f"{result.steps} x {result.batch_size} on {result.devices} devices"),
        ("seconds", f"{result.seconds:.1f}"),
    ]
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def _format_value(value: Any) -> str:
    return str(value).replace("/", "_").replace(" ", "")


def default_output_path(
    inference_model: InferenceModel, split: str, patching_overrides: Mapping[str, Any] | None = None
) -> epath.Path:
    """``WORKDIR/eval/<split>-step<N>[-<key><value>...].json``, or ``MODEL_DIR/eval/<split>...json``.

    A model read from the Hugging Face Hub cache gets ``./eval/models--owner--name/<split>...json``
    in the current folder instead: the cache is huggingface_hub's, not a place for results.
    """
    from bltjax.convert.hub import cached_repo_folder_name  # as in restore.py: convert's exporter imports inference

    source = paths.resolve(inference_model.source)
    name = split
    cached_repo = cached_repo_folder_name(source)
    if inference_model.step is not None:
        root = source.parent.parent  # WORKDIR/checkpoints/<step>
        name += f"-step{inference_model.step}"
    elif cached_repo is not None:
        return paths.resolve(".") / EVAL_DIR / cached_repo / f"{name}{split_label('', patching_overrides)}.json"
    else:
        root = source
    name += split_label("", patching_overrides)
    return root / EVAL_DIR / f"{name}.json"


def write_result(result: EvalResult, path: str | os.PathLike) -> epath.Path:
    """Writes the result as JSON, atomically (process 0 only); returns the path."""
    path = paths.resolve(path)
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, (json.dumps(result.to_json(), indent=2, allow_nan=True) + "\n").encode())
    return path


def evaluate_and_write(
    *,
    workdir: str | os.PathLike | None,
    model_dir: str | os.PathLike | None,
    data_dir: str | os.PathLike,
    step: int | None = None,
    split: str = "validation",
    batch_size: int | None = None,
    patching_overrides: Mapping[str, Any] | None = None,
    sidecar_tag: str | None = None,
    out: str | os.PathLike | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> tuple[EvalResult, epath.Path]:
    """Loads a training run (``workdir``) or a model folder, evaluates it, writes the JSON.

    Bad input fails before the model is loaded: both or neither source (EvalError), a missing
    data folder or split (pipeline.DataError).
    """
    if (workdir is None) == (model_dir is None):
        raise EvalError("pass exactly one of --workdir (a training run) and --model (a save_model folder)")
    if model_dir is not None and step is not None:
        raise EvalError("--step applies to --workdir only (a model folder holds one model)")
    source = workdir if workdir is not None else model_dir
    data = paths.resolve(data_dir)
    if not data.is_dir():
        raise pipeline.DataError(f"{data}: no such data folder (expected one written by python -m "
                                 "bltjax.prepare)")  # fmt: skip
    (token_pipeline.read_split if bpe.is_token_folder(data) else pipeline.read_split)(data, split)
    inference_model = load_for_inference(source, step=step, devices=devices)
    result = evaluate(
        inference_model,
        data,
        split=split,
        batch_size=batch_size,
        patching_overrides=patching_overrides,
        sidecar_tag=sidecar_tag,
    )
    path = write_result(result, out or default_output_path(inference_model, split, patching_overrides))
    if inference_model.step is not None:  # a training run's checkpoint: its workdir has writers
        run_root = paths.resolve(inference_model.source).parent.parent  # WORKDIR/checkpoints/<step>
        write_to_run(result, run_root, inference_model.config, patching_overrides)
    return result, path


RUN_METRICS = ("bpb", "bpb_bytes", "loss", "n_targets", "n_bytes", "mean_patch_size", "seconds")


def write_to_run(
    result: EvalResult,
    workdir: str | os.PathLike,
    config: ml_collections.ConfigDict,
    patching_overrides: Mapping[str, Any] | None = None,
) -> None:
    """The numbers into the training run's own writers (``config.metrics.backends``), at the checkpoint's step.

    Split ``eval/<split>[-<override>...]``: a JSONL line, TensorBoard scalars under
    ``tensorboard/eval/<split>/`` (tag ``bpb`` etc., next to the training curves), and with wandb
    an eval run in the training run's group (keys ``eval/<split>/bpb``).
    """
    label = split_label(result.split, patching_overrides)
    values = {key: getattr(result, key) for key in RUN_METRICS if getattr(result, key) is not None}
    suffix = f"eval-{label}-step{result.step}"
    with MetricsWriter.from_config(
        config, workdir, process_index=jax.process_index(), console=None, job_type="eval", run_suffix=suffix
    ) as writer:
        writer.write(int(result.step), values, split=f"{EVAL_DIR}/{label}")


def split_label(split: str, patching_overrides: Mapping[str, Any] | None = None) -> str:
    """``validation``, or ``validation-threshold1.3`` with patching overrides (as in the JSON file's name)."""
    return split + "".join(f"-{key}{_format_value(value)}" for key, value in sorted((patching_overrides or {}).items()))
