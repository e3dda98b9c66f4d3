"""Data pipeline throughput against what a training step consumes: `python benchmarks/data.py`.

Prepares a corpus of Python standard-library sources (one document per file) with
`bltjax.data.prepare`, writes entropy sidecars from synthetic entropies (no entropy model is
needed to measure reading: only the density of patch starts matters, set here to the released
threshold's ~4.5-byte mean patch), and times `make_dataset` + `make_iterator` (num_threads=0)
in static, space and entropy modes: bytes/s = target tokens delivered per second.

The consumption side is a jitted forward + backward (masked cross-entropy, gradients of all
parameters, no optimizer) of the experiment's BLT on one batch of its own shape. The target is
pipeline >= 20 x consumption. experiments/blt_debug.py (N = 12288) does not fit on this CPU
machine: the model builds [B, T, T] local attention masks and [B, H, T, T] float32 logits, 9 GiB
per local layer at T = 12288, with 16 local layers; the script estimates that and skips it. It
then measures blt_debug's architecture at a shorter row (an upper bound on its bytes/s, since
attention cost per byte grows with T) and blt_tiny as is. Prints a markdown table and writes
benchmarks/data.json. Never run by the unit tests.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import pathlib
import platform
import sysconfig
import tempfile
import time

import numpy as np

from bltjax.config import load_config
from bltjax.data import prepare
from bltjax.data import shards as shard_format
from bltjax.data.pipeline import make_dataset, make_iterator
from bltjax.data.sidecars import start_mask, threshold_tag
from bltjax.runtime.atomic import write_atomic

REPO = pathlib.Path(__file__).resolve().parents[1]
THETA = 1.335442066192627
TARGET_RATIO = 20.0


def write_corpus(folder: pathlib.Path, megabytes: float) -> pathlib.Path:
    """JSON lines of stdlib `.py` files (sorted, so the corpus is the same on every run)."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    out = folder / "stdlib.jsonl"
    budget = int(megabytes * 2**20)
    with open(out, "w", encoding="utf-8") as file:
        for path in sorted(stdlib.rglob("*.py")):
            if "site-packages" in path.parts or budget <= 0:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            if not text.strip():
                continue  # empty __init__.py files: prepare skips empty documents anyway
            file.write(json.dumps({"text": text}) + "\n")
            budget -= len(text)
    return out


def write_sidecars(data_dir: pathlib.Path) -> None:
    """Start bits from gamma-distributed entropies, in the layout bltjax.data.entropy writes."""
    rng = np.random.default_rng(0)
    manifest = shard_format.load_manifest(data_dir)
    tag = threshold_tag(THETA)
    shards = {}
    for split, infos in manifest.splits.items():
        for info in infos:
            tokens, offsets = shard_format.read_shard(data_dir, split, info.index)
            entropies = rng.gamma(0.6, 1.4, size=tokens.size).astype(np.float16)
            bits = data_dir / f"{info.name}.starts.{tag}.bits"
            bits.write_bytes(np.packbits(start_mask(np.asarray(tokens), offsets, entropies, THETA)).tobytes())
            shards[info.name] = {
                "split": split,
                "tokens": info.tokens,
                "tokens_sha256": info.tokens_sha256,
                "entropy_sha256": None,
                "starts_sha256": {tag: hashlib.sha256(bits.read_bytes()).hexdigest()},
            }
    sidecars = {
        "format": "bltjax.entropy-sidecars",
        "version": 1,
        "entropy_model": {"fingerprint": "synthetic gamma(0.6, 1.4) entropies (benchmark)"},
        "threshold": THETA,
        "tag": tag,
        "thresholds": {tag: {"threshold": THETA, "calibration": None}},
        "shards": shards,
    }
    (data_dir / "sidecars.json").write_text(json.dumps(sidecars, indent=1))


def with_mode(config, mode: str):
    config = config.copy_and_resolve_references()
    config.patching.mode = mode
    config.patching.threshold = THETA if mode == "entropy" else None
    if mode == "static":
        config.patching.patch_size = 4
    return config


def pipeline_rate(config, data_dir: pathlib.Path, min_bytes: float, repeats: int) -> dict:
    """Best-of-`repeats` bytes/s of iterating the pipeline (after a few warm-up steps)."""
    ds = make_dataset(config, data_dir, "train", seed=0, process_index=0, process_count=1)
    per_step = config.data.batch_size * config.data.seq_len
    steps = max(20, int(min_bytes // per_step))
    best = float("inf")
    patches = []
    for repeat in range(repeats):
        iterator = make_iterator(ds, start_step=repeat * (steps + 5))
        for _ in range(5):
            next(iterator)
        start = time.perf_counter()
        for _ in range(steps):
            batch = next(iterator)
        best = min(best, time.perf_counter() - start)
        patches.append(np.count_nonzero(batch["patch_lengths"], axis=1).mean())
    return {
        "bytes_per_s": steps * per_step / best,
        "steps": steps,
        "ms_per_step": 1e3 * best / steps,
        "mean_patches_per_row": float(np.mean(patches)),
    }


def attention_gib(config) -> float:
    """Local-attention logits of one layer, float32: the [B, H, T, T] tensor the model builds."""
    enc = config.model.encoder
    return config.data.batch_size * enc.n_heads * config.data.seq_len**2 * 4 / 2**30


def train_step_rate(config, data_dir: pathlib.Path, steps: int) -> dict:
    """bytes/s of a jitted forward + backward of the experiment's model on one pipeline batch."""
    import jax
    import jax.numpy as jnp

    from bltjax.models.factory import build_model

    model = build_model(config)
    batch = make_dataset(config, data_dir, "train", seed=0, process_index=0, process_count=1)[0]
    inputs = {k: jnp.asarray(v) for k, v in batch.items()}
    params = jax.jit(model.init)(jax.random.key(0), inputs["tokens"], inputs["patch_lengths"])["params"]

    def loss_fn(params, batch):
        logits = model.apply({"params": params}, batch["tokens"], batch["patch_lengths"])
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], axis=-1)[..., 0]
        mask = batch["loss_mask"].astype(jnp.float32)
        return jnp.sum(nll * mask) / (jnp.sum(mask) + 1e-6)

    step = jax.jit(jax.value_and_grad(loss_fn))
    start = time.perf_counter()
    jax.block_until_ready(step(params, inputs))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps if compile_s < 30 else 1):  # a slow model is timed once: its rate is what matters
        start = time.perf_counter()
        jax.block_until_ready(step(params, inputs))
        times.append(time.perf_counter() - start)
    seconds = min(times)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    return {
        "bytes_per_s": config.data.batch_size * config.data.seq_len / seconds,
        "s_per_step": seconds,
        "compile_and_first_step_s": compile_s,
        "params": int(n_params),
    }


def matmul_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """Measured float32 matmul FLOP/s of this machine (best of `repeats`): the MFU denominator."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def entropy_forward_flops_per_token(config, context: int) -> dict[str, float]:
    """Forward FLOPs per token of a byte LM (docs/architecture.md §14.1 primitives, real FFN width).

    `useful` counts attention over the sliding window only; `executed` counts what the current
    dense masked attention computes (every key of the chunk), the honest denominator today.
    """
    stack = config.model.stack
    d, layers = stack.dim, stack.n_layers
    hidden = stack.ffn_hidden or 256 * -(-int(2 * 4 * d / 3) // 256)
    dense = layers * (2 * 4 * d * d + 2 * 3 * d * hidden) + 2 * d * 260
    window = min(stack.window or context, context)
    return {
        "useful": dense + layers * 4 * d * (window + 1) / 2,
        "executed": dense + layers * 4 * d * context,
    }


def entropy_rate(variant: str, data_dir: pathlib.Path, folder: pathlib.Path, peak: float) -> dict:
    """Times `python -m bltjax.entropy`'s `run` with a random model of the experiment's shape."""
    import jax

    from bltjax.checkpoints import save_model
    from bltjax.data import entropy
    from bltjax.models.factory import build_model, example_inputs

    config = load_config(str(REPO / "experiments" / f"entropy_model.py:{variant}"))
    model = build_model(config)
    params = jax.jit(model.init)(jax.random.key(0), *example_inputs(config))["params"]
    checkpoint = save_model(folder / f"entropy_{variant}", config, params)
    sink = open(os.devnull, "w")  # noqa: SIM115 - the progress line is noise here
    try:
        start = time.perf_counter()
        summary = entropy.run(data_dir, checkpoint, threshold=THETA, log=sink)
        seconds = time.perf_counter() - start
    finally:
        sink.close()
    tokens = shard_format.load_manifest(data_dir).total("train", "tokens")
    context = entropy.default_context(model.config, config.data.seq_len)
    flops = entropy_forward_flops_per_token(config, context)
    return {
        "variant": variant,
        "tokens": tokens,
        "seconds_incl_compile": seconds,
        "bytes_per_s_incl_compile": tokens / seconds,
        "bytes_per_s_steady": summary.bytes_per_second,
        "context": context,
        "flops_per_token_useful": flops["useful"],
        "flops_per_token_executed": flops["executed"],
        "useful_flops_per_s": flops["useful"] * summary.bytes_per_second,
        "executed_flops_per_s": flops["executed"] * summary.bytes_per_second,
        "matmul_peak_flops": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus-mb", type=float, default=24.0)
    parser.add_argument("--min-bytes", type=float, default=4e6, help="bytes delivered per timed pipeline run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--debug-seq-len", type=int, default=1024, help="shorter row for blt_debug's consumption")
    parser.add_argument("--memory-gib", type=float, default=20.0, help="skip a model whose attention needs more")
    parser.add_argument("--entropy-mb", type=float, default=0.5, help="corpus size for the entropy precompute")
    parser.add_argument("--entropy-variants", default="tiny", help="entropy_model.py variants to time, comma separated")
    args = parser.parse_args()

    debug = load_config(str(REPO / "experiments" / "blt_debug.py"))
    tiny = load_config(str(REPO / "experiments" / "blt_tiny.py"))
    short = debug.copy_and_resolve_references()
    short.data.seq_len = args.debug_seq_len
    short.data.max_patches = args.debug_seq_len // 2
    experiments = [("blt_debug", debug), (f"blt_debug @ N={args.debug_seq_len}", short), ("blt_tiny", tiny)]

    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        start = time.perf_counter()
        corpus = write_corpus(folder, args.corpus_mb)
        data_dir = folder / "data"
        prepare.prepare([corpus], data_dir, shard_bytes=4 * 2**20, val_fraction=0.0, progress=False)
        write_sidecars(data_dir)
        prepared = shard_format.load_manifest(data_dir)
        print(
            f"corpus: {prepared.total('train', 'bytes') / 2**20:.1f} MiB of stdlib Python in "
            f"{len(prepared.shards('train'))} shards, prepared + sidecars in {time.perf_counter() - start:.1f} s\n"
        )

        rows = []
        for name, config in experiments:
            memory = attention_gib(config)
            if memory * 2 * (config.model.encoder.n_layers + config.model.decoder.n_layers) > args.memory_gib:
                consume = {"skipped": f"local attention logits {memory:.1f} GiB per layer: does not fit"}
            else:
                consume = train_step_rate(with_mode(config, config.patching.mode), data_dir, args.train_steps)
            for mode in ("static", "space", "entropy"):
                produce = pipeline_rate(with_mode(config, mode), data_dir, args.min_bytes, args.repeats)
                ratio = produce["bytes_per_s"] / consume["bytes_per_s"] if "bytes_per_s" in consume else None
                rows.append({"experiment": name, "mode": mode, "seq_len": config.data.seq_len,
                             "batch_size": config.data.batch_size, "max_patches": config.data.max_patches,
                             "pipeline": produce, "train_step": consume, "ratio": ratio,
                             "ok": None if ratio is None else ratio >= TARGET_RATIO})  # fmt: skip

        entropy_rows = []
        peak = matmul_peak_flops()
        small_dir = folder / "entropy_data"
        (folder / "small").mkdir()
        prepare.prepare([write_corpus(folder / "small", args.entropy_mb)], small_dir, val_fraction=0.0, progress=False)
        for variant in [v for v in args.entropy_variants.split(",") if v]:
            entropy_rows.append(entropy_rate(variant, small_dir, folder, peak))

    print(
        "| experiment | B x N | mode | pipeline bytes/s | ms/batch | patches/row | fwd+bwd bytes/s | ratio | target "
        "| ok |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        consume = r["train_step"]
        measured = f"{consume['bytes_per_s']:,.0f}" if "bytes_per_s" in consume else consume["skipped"]
        ratio = f"{r['ratio']:,.0f}x" if r["ratio"] is not None else "—"
        ok = {True: "yes", False: "NO", None: "—"}[r["ok"]]
        print(
            f"| {r['experiment']} | {r['batch_size']} x {r['seq_len']} | {r['mode']} | "
            f"{r['pipeline']['bytes_per_s']:,.0f} | {r['pipeline']['ms_per_step']:.2f} | "
            f"{r['pipeline']['mean_patches_per_row']:.0f} | {measured} | {ratio} | >= {TARGET_RATIO:.0f}x | {ok} |"
        )
    for name, config in experiments:
        consume = next(r["train_step"] for r in rows if r["experiment"] == name)
        if "s_per_step" in consume:
            print(
                f"\n{name}: {consume['params'] / 1e6:.1f}M parameters, fwd+bwd {consume['s_per_step']:.2f} s/step "
                f"(compile + first step {consume['compile_and_first_step_s']:.1f} s), mode {config.patching.mode}"
            )
    print("\nEntropy precompute (python -m bltjax.entropy, random weights, 1 CPU device):\n")
    print("| entropy model | tokens | bytes/s (steady) | bytes/s (incl. compile) | useful FLOP/s | executed FLOP/s "
          "| matmul peak FLOP/s | executed / peak |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in entropy_rows:
        print(
            f"| {r['variant']} | {r['tokens']:,} | {r['bytes_per_s_steady']:,.0f} "
            f"| {r['bytes_per_s_incl_compile']:,.0f} "
            f"| {r['useful_flops_per_s']:.3g} | {r['executed_flops_per_s']:.3g} | {r['matmul_peak_flops']:.3g} "
            f"| {r['executed_flops_per_s'] / r['matmul_peak_flops']:.1%} |"
        )
    out = pathlib.Path(__file__).with_suffix(".json")
    write_atomic(
        out,
        json.dumps(
            {
                "unit": "bytes/s = target tokens (bytes incl. BOS/EOS) per second",
                "target": f"pipeline >= {TARGET_RATIO:.0f}x the forward+backward consumption of the same batch shape",
                "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "reader": "make_iterator(num_threads=0), one process",
                "results": rows,
                "entropy_precompute": entropy_rows,
            },
            indent=2,
        ).encode()
        + b"\n",
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
