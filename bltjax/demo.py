"""The README's main job.

  python -m bltjax.demo --config experiments/blt_tiny.py

Until the trainer lands this runs a forward pass of a freshly initialised model over the
bundled real corpus and reports bits-per-byte (about 8 for random weights: log2 of 260 ids,
spread by the random logits), with the number of bytes, patches and the mean patch size. The
command stays the same when it grows into prepare -> train -> evaluate.
"""

from __future__ import annotations

import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from bltjax import patching, tokenizer
from bltjax.model_factory import build_model

CORPUS_DIR = pathlib.Path(__file__).resolve().parent / "data" / "corpus"

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path.py[:variant]).")
_TEXT = flags.DEFINE_string("text", None, "UTF-8 text file to score (default: the bundled corpus).")
_MAX_ROWS = flags.DEFINE_integer("max_rows", 16, "Rows of seq_len bytes to score.")


def text_rows(path: pathlib.Path, seq_len: int, max_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Cuts BOS + text + EOS into rows of seq_len inputs and their next-byte targets."""
    ids = tokenizer.encode(path.read_bytes())
    n_rows = min(max_rows, (ids.size - 1) // seq_len)
    if n_rows < 1:
        raise ValueError(f"{path}: needs at least {seq_len + 1} bytes for one row, has {ids.size}")
    windows = np.stack([ids[i * seq_len : (i + 1) * seq_len + 1] for i in range(n_rows)])
    return windows[:, :-1], windows[:, 1:]


def bits_per_byte(logits: jax.Array, targets: jax.Array) -> float:
    """Sum of next-byte negative log-likelihoods over every target, in bits, per byte (spec §11)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)
    return float(nll.sum() / (math.log(2) * targets.size))


def patch_rows(config, tokens: np.ndarray) -> np.ndarray:
    """Patch lengths in the training convention (N + 1), padded to config.data.max_patches."""
    p = config.patching
    mode = "space" if p.mode == "entropy" else p.mode  # entropy needs a trained entropy model
    lengths = patching.patch_lengths(
        tokens,
        mode=mode,
        patch_size=p.patch_size if mode == "static" else None,
        max_patch_length=p.max_patch_length,
        include_next_token=True,
    )
    max_patches = config.data.max_patches
    if lengths.shape[1] > max_patches:
        raise ValueError(f"config.data.max_patches: {lengths.shape[1]} patches needed for one row, got {max_patches}")
    return np.pad(lengths, ((0, 0), (0, max_patches - lengths.shape[1])))


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # keep jax's backend probing out of the report
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config experiments/blt_tiny.py")
    path = pathlib.Path(_TEXT.value) if _TEXT.value else sorted(CORPUS_DIR.glob("*.txt"))[0]
    model = build_model(config)
    inputs, targets = text_rows(path, config.data.seq_len, _MAX_ROWS.value)
    args = (inputs,)
    if config.model_type == "blt":
        args += (patch_rows(config, inputs),)
    start = time.perf_counter()
    params = jax.jit(model.init)(jax.random.key(config.seed), *args)["params"]
    logits = jax.jit(lambda p, *a: model.apply({"params": p}, *a))(params, *args)
    bpb = bits_per_byte(logits, jnp.asarray(targets))
    seconds = time.perf_counter() - start
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"text: {path} ({inputs.size} bytes scored in {inputs.shape[0]} rows of {inputs.shape[1]})")
    print(f"model: {config.model_type}, {n_params:,} parameters, random init (seed {config.seed})")
    if config.model_type == "blt":
        n_patches = int((args[1] > 0).sum())
        print(f"patches: {n_patches} ({config.patching.mode} rule), mean {inputs.size / n_patches:.2f} bytes/patch")
    print(f"bits-per-byte: {bpb:.4f}   ({seconds:.1f} s incl. compilation)")


if __name__ == "__main__":
    app.run(main)
