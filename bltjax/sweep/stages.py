"""The sweep's shared stages: prepared data, then (for entropy runs) an entropy model and its sidecars.

These are the quickstart's stages (`bltjax/quickstart.py`, steps 1-4), called through the same
library functions: `bltjax.data.prepare.prepare`, `bltjax.training.trainer.train`,
`bltjax.checkpoints.save_model` and `bltjax.data.entropy.run`. Each stage is done once per
sweep folder and leaves a record under ``stages/``; a relaunch skips what is recorded:

    SWEEP/data/                       byte shards (+ entropy sidecars, one start-bit file per threshold)
    SWEEP/stages/data.json            what was prepared from which inputs
    SWEEP/stages/entropy_model/       the entropy model's training workdir, export/ inside
    SWEEP/stages/entropy.json         one calibrated threshold per target patch size
    SWEEP/data/bpe-<V>/               the token baseline's tokenizer and token shards (python -m bltjax.bpe)

Static and space patching need no stage but the data. Entropy targets are calibrated on the
train split's entropies (`bltjax.calibrate`): the threshold whose mean patch (in
``entropy.unit``, tokens by default, as the training metrics count) hits the target.
"""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import ml_collections
import numpy as np
from etils import epath

from bltjax.config import ConfigError
from bltjax.runtime import paths
from bltjax.runtime.atomic import write_atomic

CORPUS_DIR = pathlib.Path(__file__).resolve().parents[1] / "data" / "corpus"
DATA_DIR = "data"
STAGES_DIR = "stages"
ENTROPY_RECORD = "entropy.json"
DATA_RECORD = "data.json"


class StageError(RuntimeError):
    """A shared stage cannot run or its record disagrees with the plan; the message names the file."""


def _write_json(path: epath.Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode())


def _read_json(path: epath.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise StageError(f"{path}: unreadable ({err}); delete it to redo the stage") from err


def corpus_inputs(corpus: Sequence[str]) -> list[epath.Path]:
    """Corpus entries as paths: as given (local or a URI), or a file of the bundled corpus (bltjax/data/corpus)."""
    found = []
    for entry in corpus:
        path = paths.resolve(entry)
        if not paths.is_uri(entry) and not path.exists() and (CORPUS_DIR / entry).exists():
            path = paths.resolve(CORPUS_DIR / entry)
        if not path.exists():
            raise ConfigError(f"sweep.data.corpus: {entry!r} is neither a path nor a file of {CORPUS_DIR}")
        found.append(path)
    return found


def data_dir(sweep_dir: paths.PathLike, data: Mapping[str, Any]) -> epath.Path:
    """Where the sweep's prepared data lives: ``data.path`` if given, else SWEEP/data."""
    return paths.resolve(data["path"]) if data.get("path") else paths.resolve(sweep_dir) / DATA_DIR


def ensure_data(sweep_dir: epath.Path, data: Mapping[str, Any], log: TextIO = sys.stdout) -> epath.Path:
    """Prepares ``data.corpus`` into SWEEP/data once (recorded in stages/data.json); returns the folder."""
    from bltjax.data import prepare
    from bltjax.data import shards as shard_format

    out = data_dir(sweep_dir, data)
    if data.get("path"):
        shard_format.load_manifest(out)  # a prepared folder given by the sweep: check it, write nothing
        return out
    inputs = [str(p) for p in corpus_inputs(data["corpus"])]
    settings = {"inputs": inputs, "val_fraction": data["val_fraction"], "shard_bytes": data["shard_bytes"]}
    record = sweep_dir / STAGES_DIR / DATA_RECORD
    if record.is_file() and _read_json(record) == settings and (out / shard_format.MANIFEST_NAME).is_file():
        return out
    print(f"sweep: prepare {len(inputs)} input(s) -> {out}", file=log, flush=True)
    result = prepare.prepare(
        inputs, out, val_fraction=float(data["val_fraction"]), shard_bytes=int(data["shard_bytes"]), progress=False
    )
    manifest = result.manifest
    print(
        f"   {manifest.total('train', 'bytes'):,} train bytes, {manifest.total('validation', 'bytes'):,} validation",
        file=log,
        flush=True,
    )
    _write_json(record, settings)
    return out


def ensure_tokens(data: epath.Path, vocab_size: int, log: TextIO = sys.stdout) -> dict[str, Any]:
    """The token baseline's stage: a byte-level BPE of ``vocab_size`` ids on the train split and token
    shards in DATA/bpe-<V> (`bltjax.data.bpe`, resumable: a finished folder is only checked); returns
    what a plan needs of it."""
    from bltjax.data import bpe

    folder = bpe.default_folder(data, vocab_size)
    if not bpe.is_token_folder(folder):
        print(f"sweep: byte-level BPE of {vocab_size} ids and token shards -> {folder}", file=log, flush=True)
    manifest = bpe.tokenize_data(data, vocab_size, progress=False).manifest
    return {
        "vocab_size": manifest.vocab_size,
        "model_vocab_size": manifest.model_vocab_size,
        "bytes_per_token": manifest.bytes_per_token,
        "folder": folder.name,
    }


def measure_patch_size(config: ml_collections.ConfigDict, data: paths.PathLike, batches: int = 32) -> dict[str, float]:
    """Mean patch size (tokens per patch, training convention) and patches per row, on the train split.

    Rows are patched exactly as training patches them (`bltjax.data.pipeline`), with room for
    every patch, over the first ``batches`` batches of the run's seed: what the run will see.
    ``overflow`` is the fraction of rows with more patches than the config's ``max_patches``
    (the pipeline truncates those: their tail leaves the loss and the mean patch grows).
    """
    from bltjax.data import pipeline

    probe = ml_collections.ConfigDict(config.to_dict())
    probe.data.max_patches = probe.data.seq_len + 1
    probe.data.rows = "windows"  # whole seq_len-byte windows: the mean patch the data gives, whatever the rows
    dataset = pipeline.make_dataset(
        probe, data, "train", seed=probe.seed, process_index=0, process_count=1, verify="size"
    )  # content hashes are the trainer's to check
    tokens = 0
    counts = []
    for step in range(batches):
        lengths = pipeline.batch_at_step(dataset, step)["patch_lengths"]
        tokens += int(lengths.sum())
        counts.append(np.count_nonzero(lengths, axis=1))
    per_row = np.concatenate(counts)
    return {
        "mean_patch_size": tokens / int(per_row.sum()),
        "max_patches_seen": int(per_row.max()),
        "overflow": float(np.mean(per_row > int(config.data.max_patches))),
        "rows": int(per_row.size),
    }


def entropy_model_dir(sweep_dir: epath.Path) -> epath.Path:
    return sweep_dir / STAGES_DIR / "entropy_model"


def read_thresholds(sweep_dir: paths.PathLike) -> dict[str, dict[str, Any]]:
    """{target patch size as written by `target_key`: {"threshold": t, ...}} of stages/entropy.json."""
    path = paths.resolve(sweep_dir) / STAGES_DIR / ENTROPY_RECORD
    if not path.is_file():
        return {}
    return _read_json(path).get("targets", {})


def target_key(patch_size: float, rule: str = "global") -> str:
    """The key of a target patch size in stages/entropy.json: '4', '4.5' (global rule), 'monotonic:4'."""
    size = f"{float(patch_size):g}"
    return size if rule == "global" else f"{rule}:{size}"


def ensure_entropy(
    sweep_dir: epath.Path,
    entropy: Mapping[str, Any],
    data: epath.Path,
    targets: Sequence[float | tuple[str, float]],
    log: TextIO = sys.stdout,
) -> dict[str, float]:
    """Trains and exports the entropy model (unless ``entropy.model`` names one), writes the
    sidecars and calibrates one threshold per target (a patch size for the global rule, or
    (rule, size) with rule 'global' or 'monotonic'); returns {target_key: threshold}."""
    from bltjax.data import entropy as sidecars

    record_path = sweep_dir / STAGES_DIR / ENTROPY_RECORD
    identity = {"entropy": {k: v for k, v in entropy.items() if k != "targets"}, "data": str(data)}
    if record_path.is_file() and _read_json(record_path).get("identity") != identity:
        raise StageError(
            f"{record_path}: made with another entropy model, calibration or data folder than this plan's; "
            f"use a new sweep folder, or delete {record_path.parent} to redo the shared stages"
        )
    done = read_thresholds(sweep_dir)
    targets = [t if isinstance(t, tuple) else ("global", t) for t in targets]
    missing = [(rule, size) for rule, size in targets if target_key(size, rule) not in done]
    if not missing:
        return {key: float(value["threshold"]) for key, value in done.items()}
    if entropy.get("model"):
        from bltjax.convert.hub import resolve_model_source

        export = resolve_model_source(entropy["model"])  # a folder, a training workdir or a Hub id
    else:
        export = _train_entropy_model(sweep_dir, entropy, data, log)
    for rule, target in missing:
        print(
            f"sweep: entropy sidecars, {rule} threshold for a mean patch of {target:g} {entropy['unit']}",
            file=log,
            flush=True,
        )
        summary = sidecars.run(
            data,
            export,
            target_patch_size=float(target),
            target_kind=rule,
            unit=str(entropy["unit"]),
            context=int(entropy["context"]),
            log=log,
        )
        done[target_key(target, rule)] = {
            "threshold": float(summary.threshold),
            "tag": summary.tag,
            "calibration": summary.calibration,
        }
        print(f"   threshold {summary.threshold:.4f} (tag {summary.tag})", file=log, flush=True)
        _write_json(record_path, {"identity": identity, "entropy_model": str(export), "targets": done})
    return {key: float(value["threshold"]) for key, value in done.items()}


def _train_entropy_model(
    sweep_dir: epath.Path, entropy: Mapping[str, Any], data: epath.Path, log: TextIO
) -> epath.Path:
    """The quickstart's steps 2-3: train the entropy model, export its final parameters."""
    import jax

    from bltjax.checkpoints import save_model
    from bltjax.training.trainer import train

    workdir = entropy_model_dir(sweep_dir)
    export = workdir / "export"
    if (export / "config.json").is_file():
        return export
    config = ml_collections.ConfigDict(entropy["experiment"])
    config.data.path = str(data)
    print(f"sweep: train the entropy model -> {workdir}", file=log, flush=True)
    result = train(config, workdir, console=log)
    if result.preempted:
        raise StageError(f"{workdir}: the entropy model's training was pre-empted; relaunch to continue")
    save_model(export, config, jax.device_get(result.state.params))
    return export
