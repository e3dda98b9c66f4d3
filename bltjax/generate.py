r"""Generate text from a trained BLT (or byte-level LM) with KV caches and incremental patching.

  python -m bltjax.generate --workdir runs/quickstart/blt --prompt "The Jargon File" [--prompt ...] \
      [--max-bytes 256] [--temperature 0] [--top-p 1] [--seed 0] [--step N] \
      [--entropy-model runs/quickstart/entropy_model/export]

``--workdir`` is a training run (its newest complete checkpoint, or ``--step``), a folder
written by `bltjax.checkpoints.save_model` or a Hugging Face BLT folder, loaded with
`bltjax.inference.restore.load_for_inference` onto one device. The patching rule is the one saved with
the checkpoint (``config.patching``). An entropy-patched BLT needs its entropy model
(``--entropy-model``, a `save_model` folder or a Hugging Face BLT folder); without the flag, a
Hugging Face folder uses its own patcher, and for a training run the quickstart's layout is
tried: the folder ``WORKDIR/../entropy_model/export`` is used when its fingerprint is the one recorded in the
entropy sidecars of the run's data (``config.data.path``/sidecars.json), i.e. when it is
provably the model the BLT was trained with.

Prompts of different lengths are generated together in one batch (`bltjax.inference.generation`):
greedy at temperature 0, otherwise sampling with nucleus ``--top-p`` from ``--seed``. Each
result is printed with its patches (count, mean size) and global-model steps.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import jax

from bltjax.config import ConfigError
from bltjax.inference.generation import GenerationResult, PatchRule, generate
from bltjax.inference.restore import RestoreError, load_for_inference


class GenerateError(ValueError):
    """A command line that cannot run; the message names the flag or file and what is expected."""


def default_entropy_model(workdir: str | os.PathLike, config: Any) -> pathlib.Path | None:
    """The entropy model that goes with ``workdir`` when it can be proven, else None.

    A Hugging Face BLT folder carries its own patcher. For a training run, the quickstart's
    exported entropy model next to ``workdir`` is accepted only when its fingerprint equals the
    one in ``config.data.path``/sidecars.json, the model whose entropies placed the training
    patches.
    """
    from bltjax.data.entropy import load_entropy_model
    from bltjax.data.sidecars import SIDECARS_FILE
    from bltjax.inference.restore import is_hf_dir

    if is_hf_dir(workdir):
        return pathlib.Path(workdir).absolute()

    candidate = pathlib.Path(workdir).absolute().parent / "entropy_model" / "export"
    data_path = config.get("data", {}).get("path") if hasattr(config, "get") else None
    sidecars = pathlib.Path(data_path or "") / SIDECARS_FILE
    if not data_path or not candidate.is_dir() or not sidecars.is_file():
        return None
    try:
        recorded = (json.loads(sidecars.read_text()).get("entropy_model") or {}).get("fingerprint")
        found = load_entropy_model(candidate).fingerprint
    except (OSError, ValueError):  # unreadable sidecars or model folder: no default
        return None
    return candidate if recorded and recorded == found else None


def _check(prompts: Sequence[str], max_bytes: int, temperature: float, top_p: float) -> None:
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


def run(
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
    _check(prompts, max_bytes, temperature, top_p)
    loaded = load_for_inference(workdir, step=step, devices=jax.local_devices()[:1])
    config = loaded.config
    entropy = None
    if config.model_type == "blt":
        rule = PatchRule.from_config(config)
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


# --- command line ----------------------------------------------------------------------------------


def define_flags() -> None:
    """Command-line flags, defined only when this module is the program."""
    from absl import flags

    flags.DEFINE_string("workdir", None, "Training run directory, or a folder written by save_model.")
    flags.DEFINE_multi_string("prompt", [], "Text to continue; repeat the flag for several prompts (one batch).")
    flags.DEFINE_integer("max_bytes", 256, "Bytes to generate per prompt at most (stops earlier at EOS).")
    flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: keep the most likely bytes up to this probability mass.")
    flags.DEFINE_integer("seed", 0, "Seed of the sampling key (generation is deterministic given it).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest complete one).")
    flags.DEFINE_string("entropy_model", None, "Entropy model folder (entropy-patched BLTs).")


def main(argv: list[str]) -> None:
    from absl import app, flags, logging

    del argv
    FLAGS = flags.FLAGS
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
    from bltjax.runtime import compile_cache

    compile_cache.enable()
    try:
        run(
            workdir=FLAGS.workdir,
            prompts=FLAGS.prompt,
            max_bytes=FLAGS.max_bytes,
            temperature=FLAGS.temperature,
            top_p=FLAGS.top_p,
            seed=FLAGS.seed,
            step=FLAGS.step,
            entropy_model=FLAGS.entropy_model,
        )
    except (GenerateError, RestoreError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    from absl import app

    define_flags()
    from bltjax.runtime.cli import normalise_argv

    app.run(main, argv=normalise_argv(sys.argv))
