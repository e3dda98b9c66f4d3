"""Padding of fixed windows against packed rows on the sweep's corpus: `python benchmarks/padding.py`.

Prepares the sweep's default corpus (bltjax/sweep/spec.py DEFAULT_CORPUS: English prose and
Python code) and builds the rows the patch sweep would train on (experiments/patch_sweep.py:blt,
seq_len 256) in space and static patching, once as fixed windows (max_patches as the sweep plans
them: static 1 + ceil(N / s); space max_patches_factor x N / mean + 2, the factor of
experiments/patch_sweep.py) and once packed (1 + ceil(N / mean) patches under the N-byte cap).
For the first BATCHES batches of seed 0 it reports the fraction of empty patch columns, the
fraction of padded byte positions, the mean real bytes and patches per row, and the training
FLOPs of the padded shapes (bltjax.training.padding, the base model's latent) per real byte.
Seconds on 2 cores; never run by the unit tests.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import tempfile

import numpy as np

from bltjax.config import load_config
from bltjax.data import prepare
from bltjax.data.pipeline import batch_at_step, make_dataset
from bltjax.runtime.atomic import write_atomic
from bltjax.sweep import spec, stages
from bltjax.training import padding

CORPUS_DIR = pathlib.Path(__file__).resolve().parents[1] / "bltjax" / "data" / "corpus"


def measure(config, data: pathlib.Path, batches: int) -> dict[str, float]:
    dataset = make_dataset(config, data, "train", seed=0, process_index=0, process_count=1, verify="size")
    meter = padding.PaddingMeter(config)
    patches = []
    for step in range(batches):
        batch = batch_at_step(dataset, step)
        meter.add(padding.batch_padding(batch))
        patches.append(np.count_nonzero(batch["patch_lengths"], axis=1))
    totals = meter.totals
    real_bytes = totals["all_positions"] - totals["pad_positions"]
    return {
        "rows": config.data.get("rows"),
        "max_patches": int(config.data.max_patches),
        "padded_patch_fraction": totals["pad_columns"] / totals["all_columns"],
        "padded_byte_fraction": totals["pad_positions"] / totals["all_positions"],
        "real_bytes_per_row": real_bytes / (batches * int(config.data.batch_size)),
        "patches_per_row": float(np.concatenate(patches).mean()),
        # Padded bytes still cost their FLOPs; empty columns cost the latent's share. Real-byte share:
        "flops_spent_per_real_byte": meter.flops_per_step * batches / real_bytes,
    }


def markdown_table(data: dict) -> str:
    """The table of a benchmarks/padding.json (printed here and rendered into docs/design.md by tables.py)."""
    lines = [
        "| mode | rows | max_patches | padded columns | padded bytes | real bytes/row | patches/row "
        "| train FLOPs/real byte |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["results"]:
        mode = r["mode"] if r["patch_size"] is None else f"{r['mode']} {r['patch_size']}"
        if r["patch_size"] is None and "expected_patch_size" in r:
            mode += f" (mean {r['expected_patch_size']:.2f})"
        lines.append(
            f"| {mode} | {r['rows']} | {r['max_patches']} | {100 * r['padded_patch_fraction']:.1f}% | "
            f"{100 * r['padded_byte_fraction']:.1f}% | {r['real_bytes_per_row']:.1f} | {r['patches_per_row']:.1f} | "
            f"{r['flops_spent_per_real_byte']:.4g} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=64)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    base = load_config("experiments/patch_sweep.py:blt")
    seq_len = int(base.data.seq_len)
    factor = float(spec.load_sweep("experiments/patch_sweep.py").max_patches_factor)
    with tempfile.TemporaryDirectory() as tmp:
        data = pathlib.Path(tmp) / "data"
        prepare.prepare([CORPUS_DIR / name for name in spec.DEFAULT_CORPUS], data, progress=False)
        probe = load_config("experiments/patch_sweep.py:blt")
        probe.patching.mode, probe.patching.threshold, probe.patching.patch_size = "space", None, None
        space_mean = stages.measure_patch_size(probe, data)["mean_patch_size"]
        results = []
        for mode, size in (("space", None), ("static", 4), ("static", 8)):
            expected = space_mean if size is None else float(size)
            for rows in ("windows", "packed"):
                config = load_config("experiments/patch_sweep.py:blt")
                config.patching.mode, config.patching.threshold = mode, None
                config.patching.patch_size = float(size) if size else round(space_mean, 3)
                config.data.rows = rows
                if mode == "static":
                    config.data.max_patches = 1 + math.ceil(seq_len / size)
                elif rows == "windows":  # the sweep's rule with its factor (bltjax/sweep/plan.py)
                    config.data.max_patches = min(seq_len + 1, math.ceil(factor * seq_len / expected) + 2)
                else:
                    config.data.max_patches = min(seq_len + 1, 1 + math.ceil(seq_len / expected))
                result = {"mode": mode, "patch_size": size, "expected_patch_size": expected}
                result.update(measure(config, data, args.batches))
                results.append(result)
    print(
        f"seq_len {seq_len}, {args.batches} batches of {base.data.batch_size} rows, seed 0; space mean {space_mean:.3f}"
    )
    print(markdown_table({"results": results}))
    if args.out:
        record = {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "command": f"python benchmarks/padding.py --batches {args.batches} --out {args.out}",
            "seq_len": seq_len,
            "max_patches_factor": factor,
            "space_mean_patch_size": space_mean,
            "results": results,
        }
        write_atomic(args.out, (json.dumps(record, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
