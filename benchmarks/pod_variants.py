"""Every paper config's pod variant, compiled for its TPU slice: `python benchmarks/pod_variants.py`.

For each entry of `bltjax.config.POD_VARIANTS` it runs

  python -m bltjax.compile --config experiments/blt_<size>.py:<slice> --out <report>.json

(the TPU compiler of the `libtpu` package, `pip install -e ".[aot]"`; no TPU needed), then prints
one row per variant and writes them, with the date, the machine and the versions, to
benchmarks/pod_variants.json. `--reports DIR` builds the table from reports already written
there (DIR/<size>.json) instead of compiling. docs/launching.md's pod table is `markdown_table`
of that JSON (tests/test_pod_variants.py checks they agree).

Columns: per-chip peak memory and its share of the 85.5 GiB limit (95 GiB HBM x 0.9); the
compile seconds the report measured; the roofline of `bltjax.runtime.roofline` (step time
>= max(compute, memory) per chip, with loop trips counted in the optimized HLO) and the MFU it
implies for the model FLOPs of `bltjax.flops`. Attention inside Pallas kernels is in neither
XLA count, so the compute term is low and the MFU an upper bound; the targets of issue #18:
blt_1b on v5p-128 at most 40 GiB per chip, at most 5 minutes to compile on 2 cores, MFU >= 45 %.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
GIB = 1 << 30


def variants() -> list[tuple[str, str]]:
    sys.path.insert(0, str(REPO))
    from bltjax.config import POD_VARIANTS

    return [(size, slice_) for size, slices in POD_VARIANTS.items() for slice_ in slices]


def compile_variant(size: str, slice_: str, out: pathlib.Path) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    config = f"experiments/blt_{size}.py:{slice_}"
    command = [sys.executable, "-m", "bltjax.compile", "--config", config, "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if not out.exists():
        raise SystemExit(f"blt_{size}:{slice_}: bltjax.compile wrote no report (status {result.returncode}):\n"
                         f"{result.stderr[-3000:]}")  # fmt: skip
    return json.loads(out.read_text())


def row(size: str, slice_: str, report: dict) -> dict:
    roof = report["roofline"]
    return {
        "config": f"experiments/blt_{size}.py:{slice_}",
        "slice": slice_,
        "devices": report["devices"],
        "batch": report["batch_shape"],
        "peak_gib": report["peak_bytes"] / GIB,
        "limit_gib": report["limit_bytes"] / GIB,
        "fits": report["fits"],
        "compile_s": report["compile_seconds"],
        "loop_factor": roof["loop_factor"],
        "step_s": roof["step_seconds"],
        "bound": roof["bound"],
        "mfu": roof["mfu"],
        "compiler_step_s": roof.get("compiler_seconds"),
    }


def markdown_table(data: dict) -> str:
    """The docs/launching.md table of a benchmarks/pod_variants.json."""
    lines = [
        "| variant | chips | peak per chip | of the limit | compile (2 cores) | step time >= | bound | est. MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| `{r['config'].removeprefix('experiments/')}` | {r['devices']} | {r['peak_gib']:.2f} GiB "
            f"| {100 * r['peak_gib'] / r['limit_gib']:.0f} % | {r['compile_s']:.0f} s | {r['step_s']:.2f} s "
            f"| {r['bound']} | {100 * r['mfu']:.0f} % |"
        )
    note = f" {data['note']}" if data.get("note") else ""
    lines.append(f"\nMeasured {data['date']} on {data['machine']}, libtpu {data['libtpu']}, jax {data['jax']}.{note}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=pathlib.Path, help="build from DIR/<size>.json instead of compiling")
    parser.add_argument("--note", default="", help="a sentence about the run (e.g. what else loaded the machine)")
    parser.add_argument("--out", type=pathlib.Path, default=REPO / "benchmarks" / "pod_variants.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for size, slice_ in variants():
            path = args.reports / f"{size}.json" if args.reports else pathlib.Path(scratch) / f"{size}.json"
            report = json.loads(path.read_text()) if args.reports else compile_variant(size, slice_, path)
            rows.append(row(size, slice_, report))
            print(f"blt_{size}:{slice_}: {rows[-1]['peak_gib']:.2f} GiB, {rows[-1]['compile_s']:.0f} s", flush=True)
    data = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()}-core CPU, no TPU (TPU compiler only)",
        "libtpu": importlib.metadata.version("libtpu"),
        "jax": importlib.metadata.version("jax"),
        "rows": rows,
        "note": args.note,
    }
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(args.out)  # atomic: a half-written table never replaces the last one
    print(markdown_table(data))


if __name__ == "__main__":
    main()
