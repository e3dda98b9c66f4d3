r"""The README's main job, end to end on the bundled corpus (about 10 minutes on 2 CPU cores).

  python -m bltjax.quickstart --workdir runs/quickstart

    1. prepare   bundled corpus           -> WORKDIR/data            (byte shards, spec §10)
    2. train     entropy model            -> WORKDIR/entropy_model   (experiments/quickstart.py:entropy)
    3. export    its final parameters     -> WORKDIR/entropy_model/export
    4. entropy   sidecars next to shards  -> WORKDIR/data/*.entropy.f16, *.starts.*.bits
                 (threshold calibrated to a mean patch of --patch_size bytes)
    5. train     entropy-patched BLT      -> WORKDIR/blt             (experiments/quickstart.py:blt)
    6. report    validation bits-per-byte, checkpoints and TensorBoard folders, and a greedy
                 sample from the BLT (cached generation with incremental entropy patching)

Every stage is resumable: rerunning the command skips what is complete and continues a
training stage from its latest checkpoint. The same stages are separate commands
(`bltjax.prepare`, `bltjax.train`, `bltjax.entropy`) for real corpora.
"""

from __future__ import annotations

import pathlib
import sys
import time

import jax
from absl import app, flags, logging

from bltjax import generate as generate_cli
from bltjax.config import load_config
from bltjax.data import entropy, prepare
from bltjax.runtime import compile_cache
from bltjax.train import train
from bltjax.training.checkpoint_io import save_model

REPO_EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"
CORPUS_DIR = pathlib.Path(__file__).resolve().parent / "data" / "corpus"
# English prose, code and two other scripts: enough variety for entropy patching to matter.
DEFAULT_CORPUS = (
    "en_jargon_file_excerpt.jsonl",
    "en_fortunes.jsonl",
    "code_python_stdlib.jsonl",
    "zh_tang_song_poems.jsonl",
)

_WORKDIR = flags.DEFINE_string("workdir", "runs/quickstart", "Where data, models and logs go.")
_ENTROPY_STEPS = flags.DEFINE_integer("entropy_steps", None, "Override the entropy model's training steps.")
_BLT_STEPS = flags.DEFINE_integer("blt_steps", None, "Override the BLT's training steps.")
_PATCH_SIZE = flags.DEFINE_float("patch_size", 4.5, "Mean patch size the entropy threshold is calibrated to.")
_SAMPLE_BYTES = flags.DEFINE_integer("sample_bytes", 96, "Bytes generated per sample prompt at the end; 0 = none.")
SAMPLE_PROMPTS = ("A hacker is ", "def main(")
_CORPUS = flags.DEFINE_list("corpus", list(DEFAULT_CORPUS), "Files of bltjax/data/corpus to train on.")


def _stage(number: int, text: str) -> float:
    print(f"\n== {number}/6 {text}", flush=True)
    return time.time()


def _done(start: float) -> None:
    print(f"   ({time.time() - start:.0f} s)", flush=True)


def _experiment(variant: str, data: pathlib.Path, steps: int | None):
    config = load_config(f"{REPO_EXPERIMENTS / 'quickstart.py'}:{variant}")
    config.data.path = str(data)
    if steps is not None:
        config.train.steps = steps
        config.train.eval_every = max(steps // 2, 1)
        config.train.log_every = max(min(config.train.log_every, steps // 4), 1)
        config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, max(steps // 10, 1))
    return config


def run(workdir: pathlib.Path) -> dict[str, float]:
    """Runs (or completes) every stage; returns the validation bits-per-byte of both models."""
    began = time.time()
    data = workdir / "data"
    started = _stage(1, f"prepare the bundled corpus -> {data}")
    files = [CORPUS_DIR / name for name in _CORPUS.value]
    prepare.prepare(files, data, shard_bytes=1 << 20, val_fraction=0.05, progress=False)
    manifest = prepare.load_manifest(data)
    print(f"   {manifest.total('train', 'bytes'):,} train bytes, {manifest.total('validation', 'bytes'):,} validation")
    _done(started)

    started = _stage(2, "train the entropy model (a small byte LM)")
    entropy_config = _experiment("entropy", data, _ENTROPY_STEPS.value)
    entropy_run = train(entropy_config, workdir / "entropy_model")
    _done(started)

    export = workdir / "entropy_model" / "export"
    started = _stage(3, f"export its parameters -> {export}")
    if not (export / "config.json").is_file():
        params = jax.device_get(entropy_run.state.params)
        save_model(export, entropy_config, params)
    _done(started)

    started = _stage(4, f"entropy sidecars, threshold for a mean patch of {_PATCH_SIZE.value} bytes")
    # Rows of 2048 bytes: the exact-chunking overlap (layers x (window - 1) = 254) then costs ~14%.
    summary = entropy.run(data, export, target_patch_size=_PATCH_SIZE.value, context=2048, log=sys.stdout)
    print(f"   threshold {summary.threshold:.4f} (tag {summary.tag}), {len(summary.computed)} shards computed")
    _done(started)

    started = _stage(5, "train the BLT on entropy patches")
    blt_config = _experiment("blt", data, _BLT_STEPS.value)
    blt_config.patching.threshold = float(summary.threshold)
    blt_run = train(blt_config, workdir / "blt")
    _done(started)

    _stage(6, "report")
    print(f"   entropy model validation bpb: {entropy_run.validation_bpb:.4f}")
    print(f"   BLT validation bpb:           {blt_run.validation_bpb:.4f}")
    print(f"   checkpoints: {workdir / 'blt' / 'checkpoints'}  (entropy model: {workdir / 'entropy_model'})")
    print(f"   tensorboard --logdir {workdir}")
    if _SAMPLE_BYTES.value > 0:
        # The same path as `python -m bltjax.generate --workdir WORKDIR/blt`: the entropy model is
        # found next to the run and accepted because the sidecars name its fingerprint.
        print(f"   greedy samples ({_SAMPLE_BYTES.value} bytes each):")
        generate_cli.run(workdir=workdir / "blt", prompts=list(SAMPLE_PROMPTS), max_bytes=_SAMPLE_BYTES.value)
    print(f"   total {time.time() - began:.0f} s")
    return {"entropy_model_bpb": entropy_run.validation_bpb, "blt_bpb": blt_run.validation_bpb}


def main(argv: list[str]) -> None:
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    compile_cache.enable()
    run(pathlib.Path(_WORKDIR.value).absolute())


if __name__ == "__main__":
    app.run(main)
