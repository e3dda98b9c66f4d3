"""Generation from a folder on disk: a training run, a `save_model` folder or a Hugging Face BLT.

    from bltjax.inference.generation.folders import generate_from_folder
    results = generate_from_folder(workdir="runs/quickstart/blt", prompts=["The Jargon File"])

Loads the model with `bltjax.inference.restore.load_for_inference` onto one device, finds the
entropy model of an entropy-patched BLT (``entropy_model``, or the one that provably goes with
the run: `default_entropy_model`), generates with `bltjax.inference.generation.generate` and
prints each continuation with its patching. `python -m bltjax.generate` is the command line of
this module; the quickstart calls it for its samples. Argument errors are `GenerateError`s
that name the command-line flag, so the program can print them as they are.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import jax
from etils import epath

from bltjax.inference.generation.decode import GenerationResult, generate
from bltjax.inference.restore import is_hf_dir, load_for_inference
from bltjax.patching.incremental import IncrementalRule
from bltjax.runtime import paths


class GenerateError(ValueError):
    """A command line that cannot run; the message names the flag or file and what is expected."""


def default_entropy_model(workdir: str | os.PathLike, config: Any) -> epath.Path | None:
    """The entropy model that goes with ``workdir`` when it can be proven, else None.

    A Hugging Face BLT folder (or Hub id) carries its own patcher. For a training run, the
    quickstart's entropy model next to ``workdir`` (its export, else its training workdir) is
    accepted only when its fingerprint equals the one in ``config.data.path``/sidecars.json,
    the model whose entropies placed the training patches.
    """
    from bltjax.convert.hub import ModelSourceError, resolve_model_source
    from bltjax.data.entropy import load_entropy_model
    from bltjax.data.sidecars import SIDECARS_FILE

    try:
        folder = resolve_model_source(workdir)
    except ModelSourceError:
        return None
    if is_hf_dir(folder):
        return folder

    data_path = config.get("data", {}).get("path") if hasattr(config, "get") else None
    sidecars = paths.resolve(data_path or ".") / SIDECARS_FILE
    if not data_path or not sidecars.is_file():
        return None
    try:
        recorded = (json.loads(sidecars.read_text()).get("entropy_model") or {}).get("fingerprint")
    except (OSError, ValueError):  # unreadable sidecars: no default
        return None
    for candidate in (folder.parent / "entropy_model" / "export", folder.parent / "entropy_model"):
        if not recorded or not candidate.is_dir():
            continue
        try:
            if load_entropy_model(candidate).fingerprint == recorded:
                return candidate
        except (OSError, ValueError):  # an unreadable model folder or run is no default
            continue
    return None


def check_arguments(prompts: Sequence[str], max_bytes: int, temperature: float, top_p: float) -> None:
    if not prompts:
        raise GenerateError("--prompt: give at least one prompt")
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise GenerateError(f"--prompt: prompt {i + 1} is empty; give some text to continue")
    if max_bytes is None or max_bytes < 1:
        raise GenerateError(f"--max-bytes: expected a positive number of bytes, got {max_bytes}")
    if temperature < 0:
        raise GenerateError(f"--temperature: expected >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise GenerateError(f"--top-p: expected a number in (0, 1], got {top_p}")


def generate_from_folder(
    *,
    workdir: str | os.PathLike,
    prompts: Sequence[str],
    max_bytes: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    step: int | None = None,
    entropy_model: str | os.PathLike | None = None,
    out: TextIO = sys.stdout,
) -> list[GenerationResult]:
    """Loads the model and generates; prints every continuation and its patching to ``out``.

    Raises GenerateError for bad arguments or a missing entropy model, RestoreError (from
    `load_for_inference`) for a folder without a usable checkpoint.
    """
    check_arguments(prompts, max_bytes, temperature, top_p)
    loaded = load_for_inference(workdir, step=step, devices=jax.local_devices()[:1])
    config = loaded.config
    if config.model_type == "megabyte":
        raise GenerateError(
            f"--model: {loaded.source} is a MegaByte baseline (model_type 'megabyte'), which bltjax.generate does not "
            "decode (BLTs and byte LMs only); score it with python -m bltjax.eval"
        )
    if config.model_type == "token_lm":  # its ids are BPE tokens, not the bytes the decoders emit
        raise GenerateError(
            f"--model: {loaded.source} is a BPE token LM (model_type 'token_lm'), which bltjax.generate does not "
            "decode (BLTs and byte LMs only); score it with python -m bltjax.eval on its token folder"
        )
    entropy = None
    if config.model_type == "blt":
        rule = IncrementalRule.from_config(config)
        if rule.needs_entropy:
            source = entropy_model or default_entropy_model(workdir, config)
            if source is None:
                raise GenerateError(
                    f"--entropy-model: {loaded.source} is an entropy-patched BLT (config.patching.mode='entropy'); "
                    "give the folder of its entropy model (e.g. runs/quickstart/entropy_model/export)"
                )
            from bltjax.data.entropy import load_entropy_model

            try:
                entropy = load_entropy_model(source)
            except (FileNotFoundError, ValueError) as err:  # SidecarError, CheckpointError name the file
                raise GenerateError(f"--entropy-model: {err}") from err
            if entropy_model is None:
                print(f"entropy model: {source} (the one that goes with {loaded.source})", file=out)
    started = time.perf_counter()
    results = generate(
        loaded.model,
        loaded.params,
        config,
        list(prompts),
        entropy_model=entropy,
        max_bytes=max_bytes,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )
    seconds = time.perf_counter() - started
    for i, result in enumerate(results):
        print(f"=== prompt {i + 1} ===", file=out)
        print(result.prompt.decode("utf-8", errors="replace") + result.text, file=out)
        stop = "EOS" if result.stop_reason == "eos" else f"max {max_bytes} bytes"
        summary = f"--- {len(result.data)} bytes, stopped at {stop}"
        if result.patch_lengths is not None:
            mean = sum(result.patch_lengths) / len(result.patch_lengths)
            summary += (
                f"; {len(result.patch_lengths)} patches over prompt + output "
                f"(mean {mean:.2f} ids/patch), {result.global_steps} global steps"
            )
        print(summary, file=out)
    total = sum(len(r.token_ids) for r in results)
    print(f"{total} ids in {seconds:.2f} s ({total / seconds:.1f} bytes/s, compilation included)", file=out)
    return results
