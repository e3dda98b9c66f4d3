"""The sweep definition: what to compare, at which budgets, on which data.

A sweep file is an experiment file (`experiments/patch_sweep.py`) with a ``get_sweep(arg)``
function returning a ConfigDict whose keys are those of `default_sweep()`; command-line flags of
``python -m bltjax.sweep plan`` override single fields. Keeping it an ml_collections file, like
every experiment, means one place documents the command, the configs and the sweep together.

Configs are referenced as ``path.py[:variant]``. A relative path is looked up in the current
folder; in a sweep file, then also in the sweep file's own folder (so a sweep file can name its
siblings). ``experiments/...`` paths therefore work from the repository root.
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

from bltjax.config import ConfigError, load_config
from bltjax.runtime import paths

# entropy: the global threshold rule; monotonic: the approximate-monotonic rule (docs/architecture.md §3.5);
# megabyte: the MegaByte model (docs/architecture.md §19).
SWEEP_MODES = ("entropy", "monotonic", "space", "static", "megabyte")
ENTROPY_MODES = ("entropy", "monotonic")  # modes whose thresholds the shared entropy stage calibrates
ROW_KINDS = ("windows", "packed")  # config.data.rows (bltjax/data/packing.py)
# English prose and Python code of the bundled corpus (bltjax/data/corpus): the default data.
DEFAULT_CORPUS = ("en_jargon_file_excerpt.jsonl", "en_fortunes.jsonl", "code_python_stdlib.jsonl")


def default_sweep() -> ml_collections.ConfigDict:
    """Every key a sweep file may set, with its default."""
    sweep = ml_collections.ConfigDict()
    sweep.base = ""  # BLT experiment (path.py[:variant]) whose latent model is scaled to the budget
    sweep.baseline = ""  # byte-LM experiment scaled to the same budget; "" = no byte baseline
    # Token-LM experiment (experiments/token_lm.py) scaled to the same budget over a byte-level BPE of
    # bpe_vocab_size ids learned on the sweep's train split; "" = no token baseline.
    sweep.token_baseline = ""
    sweep.bpe_vocab_size = 4096
    sweep.modes = ["static"]  # patching modes compared: entropy, monotonic, space, static (BLTs), megabyte (MegaByte)
    # Training seeds (config.seed: initialisation and data order): every job runs once per seed, named
    # ...-s{seed}-{hash}; None = once, with the base's own seed (and no seed in the name).
    sweep.seeds = None
    sweep.patch_sizes = [4.0, 6.0, 8.0]  # target mean patch sizes (space: ignored, the data decides)
    # Per mode, other sizes than patch_sizes (None = patch_sizes): e.g. entropy at 4, 6, 8, the rest at 6.
    sweep.mode_patch_sizes = ml_collections.ConfigDict({mode: None for mode in SWEEP_MODES if mode != "space"})
    # Forward FLOPs per byte every run spends at inference (docs/architecture.md §14); None = what the base
    # config spends at its own config.patching.patch_size.
    sweep.budget_flops_per_byte = None
    # Training FLOPs of each run (steps x batch x seq_len x 3 x forward); None = the base's steps.
    sweep.budget_train_flops = None
    sweep.min_steps = 10  # fewer steps than this shrink the batch instead (scaling.training_schedule)
    sweep.batch_multiple = 1  # the global batch stays a multiple of this (the data-parallel devices)
    sweep.evals = 4  # validation points per run (the curves of the report)
    sweep.tolerance = 0.05  # accepted |realised / budget - 1| of the latent fit
    sweep.max_layers = 64
    sweep.max_width_multiple = 64  # widths searched: head_dim x 1 .. head_dim x this
    sweep.max_patches_factor = 2.0  # entropy / space: max_patches = factor x seq_len / patch size (+2)
    # How BLT rows are built (config.data.rows): "windows" of seq_len bytes padded to max_patches, or
    # "packed": max_patches = 1 + ceil(seq_len / expected patch size) patches under a seq_len byte cap.
    sweep.rows = "windows"
    sweep.space_patch_size = None  # expected mean of space patching; None = measured on the data
    sweep.data = ml_collections.ConfigDict(
        dict(
            corpus=list(DEFAULT_CORPUS),  # files or folders for `bltjax.prepare` (names in bltjax/data/corpus allowed)
            path="",  # or an already prepared folder (takes precedence over corpus)
            val_fraction=0.05,
            shard_bytes=1 << 20,
        )
    )
    sweep.entropy = ml_collections.ConfigDict(
        dict(
            config="experiments/entropy_model.py:tiny",  # entropy-model experiment trained by the shared stage
            model="",  # or an exported entropy model folder (takes precedence: no training)
            context=2048,  # rows of the entropy pass (bltjax.entropy --context)
            unit="tokens",  # what the calibrated patch size counts (bltjax.calibrate)
        )
    )
    return sweep


def resolve_path(path: str) -> pathlib.Path:
    """A file path as given: absolute, or relative to the current folder (never to the package)."""
    return pathlib.Path(path).absolute()


def load_experiment(spec: str, field: str) -> ml_collections.ConfigDict:
    """``path.py[:variant]`` -> its validated-later ConfigDict; errors name the sweep field."""
    paths.require_local(spec, f"sweep.{field} (an experiment file, imported as Python)")
    path, sep, arg = spec.partition(":")
    file = resolve_path(path)
    if not file.is_file():
        raise ConfigError(
            f"sweep.{field}: expected an experiment file path.py[:variant], got {spec!r} (no {file}; relative "
            "paths are read from the current folder, or a sweep file's own folder)"
        )
    return load_config(f"{file}{sep}{arg}")


# Sweep fields that name experiment files; a sweep file's relative paths may be relative to it.
EXPERIMENT_FIELDS = (("base",), ("baseline",), ("token_baseline",), ("entropy", "config"))


def _resolve_beside(sweep: ml_collections.ConfigDict, folder: pathlib.Path) -> None:
    """Makes the sweep file's experiment paths absolute when they are found only next to it."""
    for keys in EXPERIMENT_FIELDS:
        section = sweep
        for key in keys[:-1]:
            section = section[key]
        spec = section[keys[-1]]
        if not spec:
            continue
        path, sep, arg = spec.partition(":")
        beside = folder / path
        if not pathlib.Path(path).exists() and beside.is_file():
            section[keys[-1]] = f"{beside.absolute()}{sep}{arg}"


def _merge(target: ml_collections.ConfigDict, values: ml_collections.ConfigDict, where: str) -> None:
    for key, value in values.items():
        if key not in target:
            raise ConfigError(f"{where}.{key}: unknown sweep key; expected one of {sorted(target.keys())}")
        if isinstance(target[key], ml_collections.ConfigDict):
            if not isinstance(value, (ml_collections.ConfigDict, dict)):
                raise ConfigError(f"{where}.{key}: expected a section, got {value!r}")
            _merge(target[key], ml_collections.ConfigDict(value), f"{where}.{key}")
        else:
            with target.ignore_type():
                target[key] = value


def load_sweep(spec: str | None) -> ml_collections.ConfigDict:
    """The sweep of ``path.py[:variant]`` (its ``get_sweep(arg)``) over the defaults; None: the defaults."""
    sweep = default_sweep()
    if not spec:
        return sweep
    paths.require_local(spec, "--sweep (a sweep file, imported as Python)")
    path, _, arg = spec.partition(":")
    file = resolve_path(path)
    if not file.is_file():
        raise ConfigError(
            f"--sweep: expected a sweep file path.py[:variant], got {spec!r} (no {file} from {pathlib.Path.cwd()})"
        )
    module_spec = importlib.util.spec_from_file_location(f"bltjax_sweep_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise ConfigError(f"{file}: defines no get_sweep(arg) function")
    _merge(sweep, module.get_sweep(arg or None), "sweep")
    _resolve_beside(sweep, file.parent)
    return sweep


def mode_sizes(sweep: ml_collections.ConfigDict, mode: str) -> list[float]:
    """The target patch sizes of one mode: its own list in mode_patch_sizes, else patch_sizes."""
    own = sweep.mode_patch_sizes.get(mode)
    return [float(s) for s in (sweep.patch_sizes if own is None else own)]


def _require(ok: bool, field: str, expected: str, got: object) -> None:
    if not ok:
        raise ConfigError(f"sweep.{field}: expected {expected}, got {got!r}")


def validate_sweep(sweep: ml_collections.ConfigDict) -> None:
    """Rejects a sweep that cannot be planned, naming the field."""
    _require(bool(sweep.base), "base", "a BLT experiment path.py[:variant] (--base or --sweep)", sweep.base)
    modes = list(sweep.modes)
    _require(
        bool(modes) and all(m in SWEEP_MODES for m in modes) and len(set(modes)) == len(modes),
        "modes",
        f"distinct modes out of {SWEEP_MODES}",
        modes,
    )
    for mode in modes:
        if mode == "space":
            continue
        field = "patch_sizes" if sweep.mode_patch_sizes.get(mode) is None else f"mode_patch_sizes.{mode}"
        sizes = [float(s) for s in mode_sizes(sweep, mode)]
        _require(
            bool(sizes) and all(s > 1 for s in sizes) and len(set(sizes)) == len(sizes),
            field,
            "distinct mean patch sizes > 1",
            sizes,
        )
        if mode in ("static", "megabyte"):
            _require(
                all(s.is_integer() for s in sizes),
                field,
                "whole numbers of bytes with fixed (static, megabyte) patches",
                sizes,
            )
    for name in ("budget_flops_per_byte", "budget_train_flops", "space_patch_size"):
        value = sweep[name]
        _require(value is None or float(value) > 0, name, "None or a positive number", value)
    for name in ("min_steps", "batch_multiple", "evals", "max_layers", "max_width_multiple"):
        value = sweep[name]
        _require(isinstance(value, int) and value > 0, name, "a positive integer", value)
    _require(0 < sweep.tolerance < 1, "tolerance", "a fraction in (0, 1)", sweep.tolerance)
    vocab = sweep.get("bpe_vocab_size", 4096)
    _require(isinstance(vocab, int) and 256 <= vocab <= 65532, "bpe_vocab_size", "an integer in [256, 65532]", vocab)
    _require(sweep.max_patches_factor >= 1, "max_patches_factor", "a number >= 1", sweep.max_patches_factor)
    _require(sweep.rows in ROW_KINDS, "rows", f"one of {ROW_KINDS}", sweep.rows)
    data = sweep.data
    _require(
        bool(data.path) or bool(list(data.corpus)),
        "data",
        "data.corpus (files to prepare) or data.path (a prepared folder)",
        {"corpus": list(data.corpus), "path": data.path},
    )
    seeds = sweep.get("seeds")
    if seeds is not None:
        seeds = list(seeds)
        _require(
            bool(seeds) and all(isinstance(x, int) and x >= 0 for x in seeds) and len(set(seeds)) == len(seeds),
            "seeds",
            "None or distinct integers >= 0",
            seeds,
        )
    if any(m in ENTROPY_MODES for m in modes):
        _require(
            bool(sweep.entropy.config) or bool(sweep.entropy.model),
            "entropy",
            "entropy.config (an entropy-model experiment to train) or entropy.model (an exported folder)",
            {"config": sweep.entropy.config, "model": sweep.entropy.model},
        )
