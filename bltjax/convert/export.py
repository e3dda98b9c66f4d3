"""A bltjax BLT as a complete `transformers` folder: what `python -m bltjax.export` writes.

    export_to_hf("runs/quickstart/blt", "exports/blt", dtype="bfloat16")

The source is anything `bltjax.inference.restore.load_for_inference` reads (a training workdir,
its newest step unless ``step``; a `save_model` folder; a Hugging Face folder or Hub id). The
folder holds config.json, the weights (`bltjax.convert.hf_weights`: float32 or bfloat16, sharded
with an index above ``max_shard_bytes``), generation_config.json and the tokenizer files
(`bltjax.convert.hf_tokenizer`), so that `AutoModelForCausalLM.from_pretrained(out)` and
`AutoTokenizer.from_pretrained(out)` load it.

An entropy-patched BLT carries its entropy model as transformers' patcher, with the run's
threshold, so that `BltForCausalLM` patches by itself: the ``entropy_model`` given, else the
one that provably goes with the run (`bltjax.inference.generation.folders.default_entropy_model`).

Atomic: everything is written into a hidden sibling folder that is renamed into place at the
end, so ``out`` is either absent, the previous export, or complete.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import sys
from typing import TextIO

import jax

from bltjax.convert import hf, hf_tokenizer
from bltjax.convert.hf_weights import DEFAULT_SHARD_BYTES, DTYPES
from bltjax.runtime import paths


class ExportError(ValueError):
    """An export that cannot run; the message names the flag or file and what is expected."""


@dataclasses.dataclass(frozen=True)
class ExportResult:
    out: pathlib.Path
    source: str  # the step, model or Hugging Face folder read
    entropy_model: str | None  # the folder of the patcher included, if any
    files: tuple[str, ...]  # file names in ``out``, sorted


def _entropy_model(model_source: paths.PathLike, config, entropy_model: paths.PathLike | None, log: TextIO):
    """The loaded entropy model to include as the patcher, or None for a BLT that does not patch by entropy."""
    from bltjax.data.entropy import load_entropy_model
    from bltjax.inference.generation.folders import default_entropy_model

    entropy_patched = config.patching.mode == "entropy"
    if entropy_model is None and not entropy_patched:
        print(
            f"note: config.patching.mode is {config.patching.mode!r}, which transformers' BLT cannot compute: without "
            "patch_lengths it uses one byte per patch (pass patch_lengths= to the model for the run's patching)",
            file=log,
        )
        return None
    source = entropy_model or default_entropy_model(model_source, config)
    if source is None:
        raise ExportError(
            f"--entropy-model: {model_source} is an entropy-patched BLT (config.patching.mode='entropy'); give its "
            "entropy model (a save_model folder, its training workdir or a Hugging Face folder) so that "
            "transformers can patch"
        )
    try:
        return load_entropy_model(source)
    except (FileNotFoundError, ValueError) as err:
        raise ExportError(f"--entropy-model: {err}") from err


def _threshold(config, entropy, log: TextIO) -> float | None:
    patching = config.patching
    if patching.mode != "entropy":
        return entropy.default_threshold
    for name in ("threshold_add", "monotonicity"):
        if patching.get(name):
            print(
                f"warning: config.patching.{name} is set; transformers' patcher applies the global threshold only",
                file=log,
            )
    if patching.get("entropy_reset_on_newline"):
        print(
            "warning: config.patching.entropy_reset_on_newline is set; transformers' patcher never resets the "
            "entropy context at newlines, so its patches will differ from training's (docs/architecture.md §2.5)",
            file=log,
        )
    return None if patching.threshold is None else float(patching.threshold)


def _move_into_place(staging: pathlib.Path, out: pathlib.Path) -> None:
    old = out.parent / f".{out.name}.replaced"
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    if old.exists():
        shutil.rmtree(old)


def export_to_hf(
    model_source: paths.PathLike,
    out: paths.PathLike,
    *,
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    entropy_model: paths.PathLike | None = None,
    step: int | None = None,
    overwrite: bool = False,
    log: TextIO = sys.stderr,
) -> ExportResult:
    """Writes the `transformers` BLT folder ``out`` for ``model_source``; see the module doc.

    Raises ExportError (bad flags, a model transformers cannot run, a missing entropy model),
    RestoreError (an unreadable source) before anything is written.
    """
    from bltjax.inference.restore import load_for_inference

    if dtype not in DTYPES:
        raise ExportError(f"--dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    out = pathlib.Path(paths.require_local(out, "--out (the export folder is renamed into place)"))
    if out.exists() and not overwrite:
        raise ExportError(f"--out: {out} already exists (pass --overwrite to replace it)")
    loaded = load_for_inference(model_source, step=step, devices=jax.local_devices()[:1])
    if loaded.config.model_type != "blt":
        raise ExportError(
            f"--model: {loaded.source} holds a {loaded.config.model_type!r} model; a transformers BLT folder needs a "
            "'blt' (an entropy model goes inside its BLT: --entropy-model)"
        )
    entropy = _entropy_model(model_source, loaded.config, entropy_model, log)
    patcher = None if entropy is None else (entropy.model, jax.device_get(entropy.params))
    threshold = None if entropy is None else _threshold(loaded.config, entropy, log)
    try:
        hf.blt_config_to_hf(loaded.model.config, None if entropy is None else entropy.record, threshold, dtype)
    except hf.CheckpointError as err:  # refused before anything is written
        raise ExportError(f"--model: {loaded.source}: {err}") from err

    staging = out.parent / f".{out.name}.exporting"
    if staging.exists():  # left by an interrupted export
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        hf.save_hf_blt(
            loaded.model,
            jax.device_get(loaded.params),
            staging,
            entropy_model=patcher,
            threshold=threshold,
            dtype=dtype,
            max_shard_bytes=max_shard_bytes,
        )
        hf_tokenizer.write_generation_config(staging)
        hf_tokenizer.write_tokenizer_files(staging)
        _move_into_place(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return ExportResult(
        out,
        loaded.source,
        None if entropy is None else entropy.path,
        tuple(sorted(p.name for p in out.iterdir())),
    )
