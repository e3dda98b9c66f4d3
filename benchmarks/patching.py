"""Patching throughput on one CPU core: `python benchmarks/patching.py`.

Patches 64 MiB of float32 entropies (16 Mi positions, as a [1024, 16384] batch of rows) in every
mode and prints a markdown table of bytes of text patched per second (one position = one byte);
the target for the entropy modes is 200 MB/s (a compare, a nonzero and a diff: memory speed).
The float16 row patches the same positions from float16 entropies, the sidecar format. Results
are also written to benchmarks/patching.json. Never run by the unit tests.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import pathlib
import platform
import time

import numpy as np

from bltjax.patching import PatchingRule, patch_lengths
from bltjax.runtime.atomic import write_atomic

THETA = 1.335442066192627
TARGET_MB_PER_S = 200.0


def synthetic_batch(rows: int, cols: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Word-like ids (letters, a space every ~5 bytes) and entropies whose mean patch is ~4.5."""
    rng = np.random.default_rng(seed)
    letters = rng.integers(ord("a"), ord("z") + 1, size=(rows, cols), dtype=np.int32)
    ids = np.where(rng.random((rows, cols)) < 0.18, ord(" "), letters) + 4
    ids[:, 0] = 1  # BOS
    entropies = rng.gamma(0.6, 1.4, size=(rows, cols)).astype(np.float32)
    return ids.astype(np.int32), entropies


def cases(entropies: np.ndarray) -> list[tuple[str, PatchingRule, np.ndarray | None, bool]]:
    """(configuration, rule, entropies, has a target)."""
    half = entropies.astype(np.float16)
    entropy = functools.partial(PatchingRule, mode="entropy")
    return [
        (f"global θ={THETA:.4f}", entropy(threshold=THETA), entropies, True),
        ("global, float16 input", entropy(threshold=THETA), half, True),
        ("global, max_patch_length=8", entropy(threshold=THETA, max_patch_length=8), entropies, True),
        ("monotonic θ_r=1.0", entropy(threshold=1.0, monotonicity=True), entropies, True),
        ("combined θ, θ_add=0.5", entropy(threshold=THETA, threshold_add=0.5), entropies, True),
        ("top-k s=4.5", entropy(patch_size=4.5), entropies, True),
        ("SpaceByte rule", PatchingRule(mode="space"), None, False),
        ("s=4", PatchingRule(mode="static", patch_size=4), None, False),
        ("one byte per patch", PatchingRule(mode="byte"), None, False),
    ]


def best_time(function, repeats: int) -> float:
    function()  # warm-up: page faults, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def pin_to_one_core() -> None:
    """numpy's element-wise kernels are single-threaded already; pinning makes sure of it."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def main() -> None:
    pin_to_one_core()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ids, entropies = synthetic_batch(args.rows, args.cols)
    positions = ids.size
    results = []
    for config, rule, values, has_target in cases(entropies):
        run = functools.partial(patch_lengths, ids, rule, entropies=values)
        lengths = run()
        seconds = best_time(run, args.repeats)
        rate = positions / seconds / 1e6
        results.append(
            {
                "mode": rule.mode,
                "config": config,
                "seconds": seconds,
                "mb_per_s": rate,
                "target_mb_per_s": TARGET_MB_PER_S if has_target else None,
                "ok": (rate >= TARGET_MB_PER_S) if has_target else None,
                "mean_patch": float(positions / np.count_nonzero(lengths)),
            }
        )

    print(
        f"patching {entropies.nbytes / 2**20:.0f} MiB of float32 entropies = {positions:,} bytes "
        f"of text as [{args.rows}, {args.cols}], one core, best of {args.repeats}\n"
    )
    print("| mode | config | ms | measured MB/s | target MB/s | ratio | ok | mean patch |")
    print("|---|---|---:|---:|---:|---:|---|---:|")
    for r in results:
        target = r["target_mb_per_s"]
        ratio = f"{r['mb_per_s'] / target:.2f}" if target else "—"
        ok = {True: "yes", False: "NO", None: "—"}[r["ok"]]
        print(
            f"| {r['mode']} | {r['config']} | {r['seconds'] * 1e3:.1f} | {r['mb_per_s']:.0f} | "
            f"{target or '—'} | {ratio} | {ok} | {r['mean_patch']:.2f} |"
        )

    out = pathlib.Path(__file__).with_suffix(".json")
    write_atomic(
        out,
        json.dumps(
            {
                "shape": [args.rows, args.cols],
                "unit": "MB/s = 1e6 bytes of text (positions) patched per second",
                "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                "numpy": np.__version__,
                "results": results,
            },
            indent=2,
        ).encode()
        + b"\n",
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
