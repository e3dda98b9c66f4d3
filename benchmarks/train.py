"""Training-step throughput of bltjax's BLT: `python benchmarks/train.py`.

One run prints a table (bytes/s, seconds per step, compile seconds, FLOPs per byte, achieved
GFLOP/s, MFU, peak memory) for three rows, then the ratios and PASS / FAIL against the targets,
then the share of the BLT step spent in the local encoder, the latent transformer and the local
decoder, and writes the same numbers to benchmarks/train.json.

Rows
----
* **bltjax BLT**: the reference shape (batch 4 x 4096 bytes; local width 256, 4 heads, SwiGLU 768,
  1 encoder and 4 decoder layers, window 512; global 512 x 4 layers, 8 heads, SwiGLU 1536;
  k = 2; hash n-grams 3..8 with 30000 rows each; float32; AdamW; `model.remat` from ``--remat``,
  default "block": each block and cross-attention is recomputed in the backward pass, which is
  the setting for the memory target) trained with the project's own step: `make_train_step` +
  `jit_train_step` on a one-device mesh (so with the CPU compiler options of
  `bltjax.runtime.xla_options`, as in training), state from `create_train_state`. Patches are fixed
  with a mean of 4.5 bytes: lengths 1, 4, 5, 4, 5, ...
  (training convention, row sum N + 1; the config says static patching with size 5 only so that
  it validates, the batch carries the lengths). Tokens are real text (the KJV excerpt of
  bltjax/data/corpus, BOS/EOS per document, rows cut from the concatenated stream).
* **HF torch BLT** (only with the `hf` extra): `transformers`' BltForCausalLM built from
  `bltjax.convert.hf.blt_config_to_hf` of the same record, float32, torch CPU with
  `torch.set_num_threads(2)`, the library's default attention implementation, the same batch
  (patch lengths in its convention: row sum N), cross-entropy on the same targets, backward,
  global-norm clipping at 1.0 and torch.optim.AdamW with the same hyper-parameters.
* **bltjax byte LM**: the `byte_lm` baseline of (nearly) equal matmul FLOPs per byte: a windowed
  (512) byte transformer with head_dim 64 and SwiGLU 3 x dim, whose dim x layers is the closest
  to the BLT in a small grid (both counts are printed), same rows, same bltjax step.

Measurements
------------
* Step time: the median of ``--steps`` timed steps after compilation (bltjax: the first call
  compiles, it is reported as "compile s" and includes that first step; torch: ``--hf-warmup``
  untimed steps, "compile s" is then the first warm-up step). bytes/s = B x N / step time.
* FLOPs per byte: `bltjax.models.flops.matmul_flops_per_byte(config, mean_patch_size=4.5).train`
  (3 x forward; what bltjax multiplies, attention over the causal window only). The HF row
  uses the same count (the same model's useful FLOPs; its dense masked attention executes more,
  which is its inefficiency, not extra useful work). The docs/architecture.md §14 analytic count is in the JSON.
  Achieved FLOP/s = FLOPs/byte x bytes/s; MFU = achieved / `measured_matmul_peak("float32")`.
* Memory: each row runs in its own child process (`--child blt|hf|baseline`), so peaks never
  mix. "peak RSS" is the child's ru_maxrss at the end of its timed steps (before the component
  timing); "base RSS" is ru_maxrss right after the child's imports (interpreter + jax or torch).
  The memory ratio compares **peak RSS minus base RSS** (the model, optimizer, activations and,
  for bltjax, XLA's compilation), so that the ~0.3-0.5 GiB of imported libraries does not count.
* Component shares: the full model runs once eagerly with `flax.linen.intercept_methods`
  capturing the arguments of its `local_encoder`, `latent` and `local_decoder` calls; each
  submodule then gets its own jitted value_and_grad (params sub-tree, plus its float inputs;
  the decoder with the real next-byte loss, the others with a fixed random cotangent) and is
  timed like the step (median). Shares are each part's time over the full step time; "other"
  (hash / patch ids, optimizer update, loss glue) is the rest.

Targets (from the issue): bltjax >= 2x the reference's bytes/s and <= 0.5x its memory; BLT >= 80%
of the byte LM baseline's achieved FLOP/s. Never run by the unit tests at full shape
(tests/test_benchmark_train.py runs a tiny shape of the bltjax row only).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/train.py` puts benchmarks/ first, not the repo
    sys.path.insert(0, str(REPO))

CORPUS = REPO / "bltjax" / "data" / "corpus" / "en_kjv_excerpt.jsonl"
MEAN_PATCH = 4.5
TARGET_SPEEDUP = 2.0
TARGET_MEMORY = 0.5
TARGET_FLOPS_RATIO = 0.8
COMPONENTS = ("local_encoder", "latent", "local_decoder")


def log(message: str) -> None:
    """Child progress on stderr (the parent passes it through): phases of a long run are visible."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def max_rss_mib() -> float:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark (VmHWM), so that a later reading leaves out compilation.

    XLA's compiler (LLVM) can briefly use gigabytes while it builds a program; torch compiles
    nothing. Comparing peaks over the timed steps only compares what training itself holds.
    """
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def steps_peak_rss_mib() -> float | None:
    """VmHWM since the last `reset_peak_rss` (None where /proc is not available)."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# --- shapes and data (numpy only, shared by every child) ------------------------------------


def fixed_patch_lengths(n: int) -> list[int]:
    """Training-convention lengths of one row: 1, then 4, 5, 4, 5, ... adding up to N + 1."""
    lengths, left, i = [1], n, 0
    while left > 0:
        step = min(left, 4 if i % 2 == 0 else 5)
        lengths.append(step)
        left -= step
        i += 1
    return lengths


def make_batch(batch: int, seq_len: int):
    """tokens / targets / loss_mask / patch_lengths (training convention) of real text bytes."""
    import numpy as np

    from bltjax.tokenizer import encode

    need = batch * (seq_len + 1)
    stream, size = [], 0
    with open(CORPUS, encoding="utf-8") as file:
        for line in file:
            ids = encode(json.loads(line)["text"])  # BOS ... EOS
            stream.append(ids)
            size += ids.size
            if size >= need:
                break
    flat = np.concatenate(stream)
    while flat.size < need:  # a tiny corpus (never here): wrap around
        flat = np.concatenate([flat, flat])
    rows = flat[:need].reshape(batch, seq_len + 1).astype(np.int32)
    lengths = np.asarray(fixed_patch_lengths(seq_len), np.int32)
    return {
        "tokens": rows[:, :-1].copy(),
        "targets": rows[:, 1:].copy(),
        "loss_mask": np.ones((batch, seq_len), bool),
        "patch_lengths": np.tile(lengths, (batch, 1)),
    }


MODELS = {
    # encoder, latent, decoder stacks as (dim, layers, heads, window, SwiGLU width); hash rows
    "reference": ((256, 1, 4, 512, 768), (512, 4, 8, None, 1536), (256, 4, 4, 512, 768), 30000),
    # a few-second compile for the smoke test (tests/test_benchmark_train.py): not a benchmark
    "tiny": ((32, 1, 2, 64, 96), (64, 1, 2, None, 192), (32, 1, 2, 64, 96), 257),
}


def blt_config(batch: int, seq_len: int, size: str = "reference"):
    from bltjax.config import base_blt_config, stack_config

    (enc, lat, dec, hash_rows) = MODELS[size]
    config = base_blt_config()
    config.model.encoder = stack_config(*enc[:3], window=enc[3], ffn_hidden=enc[4])
    config.model.latent = stack_config(*lat[:3], window=lat[3], ffn_hidden=lat[4])
    config.model.decoder = stack_config(*dec[:3], window=dec[3], ffn_hidden=dec[4])
    config.model.cross_attn_k = 2
    config.model.hash_sizes = [3, 4, 5, 6, 7, 8]
    config.model.hash_vocab = hash_rows
    config.model.dtype = "float32"
    config.model.param_dtype = "float32"
    config.patching.mode = "static"
    config.patching.threshold = None
    config.patching.patch_size = 5  # validation only: the batch carries 4/5 alternating lengths
    config.data.seq_len = seq_len
    config.data.batch_size = batch
    config.data.max_patches = len(fixed_patch_lengths(seq_len))
    config.mesh.data = -1
    config.train.grad_accum = 1
    return config


def baseline_config(batch: int, seq_len: int, target_flops: float, window: int = 512, min_dim: int = 256):
    """The windowed byte LM whose matmul training FLOPs/byte are closest to ``target_flops``.

    Widths start at ``min_dim`` (the BLT's local width): a deep, narrow baseline would run small,
    inefficient matmuls and flatter the BLT's FLOP/s ratio.
    """
    from bltjax.config import base_byte_lm_config, stack_config
    from bltjax.models import flops

    best = None
    for dim in [d for d in (64, 128, 192, 256, 320, 384, 448, 512, 576, 640) if d >= min_dim]:
        for layers in range(1, 25):
            config = base_byte_lm_config()
            config.model.stack = stack_config(dim, layers, dim // 64, window=window, ffn_hidden=3 * dim)
            config.data.seq_len = seq_len
            config.data.batch_size = batch
            config.mesh.data = -1
            value = flops.matmul_flops_per_byte(config).train
            gap = abs(value / target_flops - 1)
            if best is None or gap < best[0]:
                best = (gap, config)
    return best[1]


def flop_counts(config) -> dict:
    from bltjax.models import flops

    n_p = MEAN_PATCH if config.model_type == "blt" else None
    matmul = flops.matmul_flops_per_byte(config, mean_patch_size=n_p)
    analytic = flops.analytic_flops_per_byte(config, mean_patch_size=n_p)
    return {"matmul": matmul.as_dict(), "analytic": analytic.as_dict()}


# --- children -------------------------------------------------------------------------------


def child_bltjax(args, which: str) -> dict:
    import jax
    import jax.numpy as jnp

    from bltjax.models import flops
    from bltjax.models.factory import build_model
    from bltjax.runtime import peaks
    from bltjax.training.optimizer import learning_rate_schedule, make_optimizer
    from bltjax.training.sharding import batch_sharding, make_mesh
    from bltjax.training.state import create_train_state, parameter_count
    from bltjax.training.step import jit_train_step, make_train_step

    base_rss = max_rss_mib()
    config = blt_config(args.batch, args.seq_len, args.model)
    config.model.remat = args.remat
    if which == "baseline":
        target = flops.matmul_flops_per_byte(config, mean_patch_size=MEAN_PATCH).train
        encoder = config.model.encoder
        config = baseline_config(args.batch, args.seq_len, target, encoder.window, encoder.dim)
        config.model.remat = args.remat  # the same trade as the BLT row: FLOP/s compare like with like
    model_type = config.model_type
    peak = peaks.measured_matmul_peak("float32")

    devices = jax.devices()[:1]
    mesh = make_mesh(config, devices)
    model = build_model(config)
    optimizer = make_optimizer(config)
    schedule = learning_rate_schedule(config)
    state, shardings = create_train_state(model, optimizer, config, mesh, jax.random.key(0))
    n_params = parameter_count(state.params)
    data_sharding = batch_sharding(mesh)
    step = jit_train_step(
        make_train_step(model, optimizer, schedule, model_type=model_type, grad_accum=1, batch_sharding=data_sharding),
        shardings,
        data_sharding,
    )
    host = make_batch(args.batch, args.seq_len)
    if model_type != "blt":
        host.pop("patch_lengths")
    batch = {k: jax.device_put(jnp.asarray(v), data_sharding) for k, v in host.items()}

    log(f"{which}: state created ({n_params / 1e6:.1f}M params), compiling the train step")
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    compile_s = time.perf_counter() - start
    log(f"{which}: compile + first step {compile_s:.1f} s, timing {args.steps} steps")
    can_reset = reset_peak_rss()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    peak_rss = max_rss_mib()
    steps_rss = steps_peak_rss_mib() if can_reset else None
    seconds = statistics.median(times)
    log(f"{which}: median step {seconds:.3f} s, peak RSS {peak_rss:,.0f} MiB, over the timed steps {steps_rss} MiB")
    counts = flop_counts(config)
    result = {
        "name": "bltjax BLT" if which == "blt" else "bltjax byte LM",
        "model_type": model_type,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "params": n_params,
        "step_times_s": times,
        "step_s": seconds,
        "compile_s": compile_s,
        "bytes_per_s": args.batch * args.seq_len / seconds,
        "loss": float(metrics["loss"]),
        "flops_per_byte": counts,
        "matmul_peak_flops": peak,
        "base_rss_mib": base_rss,
        "peak_rss_mib": peak_rss,
        "steps_peak_rss_mib": steps_rss,
        "devices": f"{len(devices)} x {devices[0].device_kind}",
    }
    if which == "baseline":
        stack = config.model.stack
        result["shape"] = (
            f"byte LM dim {stack.dim} x {stack.n_layers} layers, {stack.n_heads} heads, "
            f"SwiGLU {stack.ffn_hidden}, window {stack.window}"
        )
    else:
        enc, lat, dec = (config.model[name] for name in ("encoder", "latent", "decoder"))
        result["shape"] = (
            f"BLT ({args.model}) local {enc.dim} ({enc.n_layers} enc + {dec.n_layers} dec layers, window "
            f"{enc.window}), global {lat.dim} x {lat.n_layers}, k={config.model.cross_attn_k}, "
            f"hash 3..8 x {config.model.hash_vocab}"
        )
        result["mean_patch_size"] = float(args.seq_len + 1) / host["patch_lengths"].shape[1]
        if not args.skip_components:
            try:
                result["components"] = component_times(model, state.params, host, args.steps, seconds)
            except Exception as error:  # the shares are a diagnostic: never lose the main numbers
                result["components"] = {"error": f"{type(error).__name__}: {error}"}
    return result


def component_times(model, params, host: dict, steps: int, step_s: float) -> dict:
    """Median fwd+bwd seconds of each BLT submodule on the arguments it receives in the model."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from bltjax.runtime import xla_options
    from bltjax.training.metrics import token_nll

    captured = {}

    def capture(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and module.name in COMPONENTS and module.name not in captured:
            captured[module.name] = (module.clone(parent=None), args, kwargs)
        return next_fun(*args, **kwargs)

    log("blt: component shares: one eager forward to capture the submodules' inputs")
    with nn.intercept_methods(capture):
        model.apply({"params": params}, jnp.asarray(host["tokens"]), jnp.asarray(host["patch_lengths"]))
    targets = jnp.asarray(host["targets"])
    key = jax.random.key(1)

    def is_float(x) -> bool:
        return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating)

    result = {}
    for name in COMPONENTS:
        module, args, kwargs = captured[name]
        flat, tree = jax.tree.flatten((args, kwargs))
        float_at = [i for i, x in enumerate(flat) if is_float(x)]
        array_at = [i for i, x in enumerate(flat) if isinstance(x, jax.Array) and i not in float_at]
        static = {i: x for i, x in enumerate(flat) if i not in float_at and i not in array_at}
        out_shapes = jax.eval_shape(
            lambda p, m=module, a=args, kw=kwargs: m.apply({"params": p}, *a, **kw), params[name]
        )
        cotangents = jax.tree.map(lambda s: jax.random.normal(key, s.shape, s.dtype), out_shapes)

        def loss_fn(p, floats, arrays, module=module, name=name, float_at=float_at, array_at=array_at,
                    static=static, cotangents=cotangents, tree=tree):  # fmt: skip
            leaves = dict(static)
            leaves.update(zip(float_at, floats, strict=True))
            leaves.update(zip(array_at, arrays, strict=True))
            a, kw = jax.tree.unflatten(tree, [leaves[i] for i in range(len(leaves))])
            out = module.apply({"params": p}, *a, **kw)
            if name == "local_decoder":
                return jnp.mean(token_nll(out, targets))
            return sum(jnp.vdot(o, c) for o, c in zip(jax.tree.leaves(out), jax.tree.leaves(cotangents), strict=True))

        # the train step's compiler options (`jit_train_step`), so that parts and whole compare
        grad = xla_options.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)), jax.devices()[:1])
        floats = [flat[i] for i in float_at]
        arrays = [flat[i] for i in array_at]
        jax.block_until_ready(grad(params[name], floats, arrays))
        times = []
        for _ in range(max(steps, 1)):
            start = time.perf_counter()
            jax.block_until_ready(grad(params[name], floats, arrays))
            times.append(time.perf_counter() - start)
        result[name] = {"s": statistics.median(times), "share": statistics.median(times) / step_s}
        log(f"blt: {name} fwd+bwd {result[name]['s']:.3f} s")
    other = step_s - sum(r["s"] for r in result.values())
    result["other"] = {"s": other, "share": other / step_s}
    result["method"] = (
        "jit(value_and_grad) of each submodule on its captured inputs (params + float inputs), "
        "median; share = part / full train step; other = the rest (ids, optimizer, glue)"
    )
    return result


def child_hf(args) -> dict:
    import warnings

    import numpy as np
    import torch
    import transformers
    from transformers import BltConfig, BltForCausalLM

    from bltjax.config import model_config
    from bltjax.convert.hf import blt_config_to_hf
    from bltjax.models import flops

    base_rss = max_rss_mib()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = blt_config(args.batch, args.seq_len, args.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # document_mask: HF has none (and rows here hold whole documents anyway)
        hf_dict = blt_config_to_hf(model_config(config))
    hf_config = BltConfig(**hf_dict)
    model = BltForCausalLM(hf_config).to(torch.float32)
    model.train()
    opt = config.optimizer
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=float(opt.learning_rate), betas=(float(opt.b1), float(opt.b2)), eps=float(opt.eps),
        weight_decay=float(opt.weight_decay),
    )  # fmt: skip
    host = make_batch(args.batch, args.seq_len)
    lengths = host["patch_lengths"].copy()
    last = (lengths > 0).sum(axis=1) - 1
    lengths[np.arange(len(lengths)), last] -= 1  # HF convention: the row adds up to N
    lengths = lengths[:, : int((lengths > 0).sum(axis=1).max())]
    tokens = torch.as_tensor(host["tokens"].astype(np.int64))
    targets = torch.as_tensor(host["targets"].astype(np.int64))
    patch_lengths = torch.as_tensor(lengths.astype(np.int64))

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=tokens, patch_lengths=patch_lengths, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(opt.clip_norm))
        optimizer.step()
        return float(loss.detach())

    log(f"hf: model built ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), warm-up")
    start = time.perf_counter()
    for _ in range(max(args.hf_warmup, 1)):
        loss = step()
        if _ == 0:
            first = time.perf_counter() - start
    can_reset = reset_peak_rss()
    times = []
    for _ in range(args.hf_steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    peak_rss = max_rss_mib()
    steps_rss = steps_peak_rss_mib() if can_reset else None
    seconds = statistics.median(times)
    log(f"hf: median step {seconds:.3f} s, peak RSS {peak_rss:,.0f} MiB, over the timed steps {steps_rss} MiB")
    return {
        "name": "HF torch BLT",
        "batch": args.batch,
        "seq_len": args.seq_len,
        "params": sum(p.numel() for p in model.parameters()),
        "step_times_s": times,
        "step_s": seconds,
        "compile_s": first,
        "compile_note": "first (warm-up) step, torch has no compilation",
        "bytes_per_s": args.batch * args.seq_len / seconds,
        "loss": loss,
        "flops_per_byte": flop_counts(config),
        "flops_per_byte_dense": flops.matmul_flops_per_byte(
            config, mean_patch_size=MEAN_PATCH, dense_attention=True
        ).as_dict(),
        "base_rss_mib": base_rss,
        "peak_rss_mib": peak_rss,
        "steps_peak_rss_mib": steps_rss,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "patches": int(lengths.shape[1]),
    }


# --- parent ---------------------------------------------------------------------------------


def run_child(which: str, args, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "result.json"
        command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", which, "--child-out", str(out),
                   "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
                   "--hf-steps", str(args.hf_steps), "--hf-warmup", str(args.hf_warmup),
                   "--threads", str(args.threads), "--model", args.model, "--remat", args.remat]  # fmt: skip
        if args.skip_components:
            command.append("--skip-components")
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        try:
            proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=timeout, env=env, cwd=REPO)
        except subprocess.TimeoutExpired:
            return {"skipped": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not out.exists():
            tail = proc.stdout.strip().splitlines()[-3:]
            return {"skipped": f"child failed (rc {proc.returncode}; its stderr is above) " + " | ".join(tail)}
        return json.loads(out.read_text())


def hf_available() -> str | None:
    """None when torch and transformers (with BLT) import, else why not."""
    probe = "import torch, transformers; from transformers import BltConfig, BltForCausalLM"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if proc.returncode:
        return "the hf extra is not installed: " + (proc.stderr.strip().splitlines() or ["import failed"])[-1]
    return None


def finish_row(row: dict, peak: float | None) -> dict:
    if "skipped" in row:
        return row
    per_byte = row["flops_per_byte"]["matmul"]["train"]
    row["achieved_flops"] = per_byte * row["bytes_per_s"]
    if peak:
        row["mfu"] = row["achieved_flops"] / peak
    row["rss_over_base_mib"] = row["peak_rss_mib"] - row["base_rss_mib"]
    if row.get("steps_peak_rss_mib") is not None:
        row["steps_rss_over_base_mib"] = row["steps_peak_rss_mib"] - row["base_rss_mib"]
    return row


def verdict(ok: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[ok]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5, help="timed bltjax steps (median)")
    parser.add_argument("--hf-steps", type=int, default=2, help="timed transformers steps (median)")
    parser.add_argument("--hf-warmup", type=int, default=1, help="untimed transformers steps")
    parser.add_argument("--hf-timeout", type=float, default=1200.0, help="seconds before the HF child is given up")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for the HF child")
    parser.add_argument("--model", choices=sorted(MODELS), default="reference",
                        help="reference: the issue's shape; tiny: a smoke test of the script only")  # fmt: skip
    parser.add_argument(
        "--remat",
        choices=("none", "block"),
        default="block",
        help="model.remat of the bltjax rows: 'block' recomputes each block in the backward pass (memory target)",
    )
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--skip-components", action="store_true")
    parser.add_argument(
        "--out", default=str(pathlib.Path(__file__).with_suffix(".json")), help="JSON report ('' = none)"
    )
    parser.add_argument("--child", choices=("blt", "hf", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = child_hf(args) if args.child == "hf" else child_bltjax(args, args.child)
        pathlib.Path(args.child_out).write_text(json.dumps(result))
        return

    print(f"model {args.model}: batch {args.batch} x {args.seq_len} bytes, float32, AdamW, bltjax remat "
          f"{args.remat}; one CPU device ({os.cpu_count()} cores)")  # fmt: skip
    blt = run_child("blt", args, timeout=3600)
    if "skipped" in blt:
        raise SystemExit(f"bltjax BLT failed: {blt['skipped']}")
    peak = blt["matmul_peak_flops"]
    blt = finish_row(blt, peak)
    if args.skip_hf:
        hf = {"skipped": "--skip-hf"}
    else:
        why = hf_available()
        hf = {"skipped": why} if why else finish_row(run_child("hf", args, timeout=args.hf_timeout), peak)
    baseline = (
        {"skipped": "--skip-baseline"} if args.skip_baseline else finish_row(run_child("baseline", args, 3600), peak)
    )

    rows = [("bltjax BLT", blt), ("HF torch BLT", hf), ("bltjax byte LM", baseline)]
    header = ("| row | bytes/s | step s | compile s | FLOPs/byte | achieved GFLOP/s | MFU | peak RSS MiB "
              "| RSS - base MiB | steps-only RSS - base MiB |")  # fmt: skip
    print(f"\nmatmul peak (measured, float32): {peak / 1e9:.0f} GFLOP/s; FLOPs/byte = train matmul count "
          f"(3 x forward, bltjax.models.flops.matmul_flops_per_byte, mean patch {MEAN_PATCH})\n")  # fmt: skip
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows:
        if "skipped" in r:
            print(f"| {name} | skipped: {r['skipped']} | | | | | | | | |")
            continue
        print(
            f"| {name} | {r['bytes_per_s']:,.0f} | {r['step_s']:.3f} | {r['compile_s']:.1f} "
            f"| {r['flops_per_byte']['matmul']['train'] / 1e6:.1f}M | {r['achieved_flops'] / 1e9:.1f} "
            f"| {r['mfu']:.1%} | {r['peak_rss_mib']:,.0f} | {r['rss_over_base_mib']:,.0f} "
            f"| {r.get('steps_rss_over_base_mib', float('nan')):,.0f} |"
        )
    print()
    for name, r in rows:
        if "skipped" not in r:
            analytic = r["flops_per_byte"]["analytic"]["train"]
            print(f"{name}: {r['shape'] if 'shape' in r else r.get('attn_implementation')}; "
                  f"{r['params'] / 1e6:.1f}M params; "
                  f"analytic (docs/architecture.md §14) {analytic / 1e6:.1f}M FLOPs/byte; "
                  f"base RSS {r['base_rss_mib']:,.0f} MiB")  # fmt: skip

    ratios = {}
    if "skipped" not in hf:
        speed = blt["bytes_per_s"] / hf["bytes_per_s"]
        memory = blt["rss_over_base_mib"] / hf["rss_over_base_mib"]
        ratios["speedup_vs_hf"] = {"value": speed, "target": f">= {TARGET_SPEEDUP}", "ok": speed >= TARGET_SPEEDUP}
        ratios["memory_vs_hf"] = {"value": memory, "target": f"<= {TARGET_MEMORY}", "ok": memory <= TARGET_MEMORY,
                                  "peak_rss_ratio": blt["peak_rss_mib"] / hf["peak_rss_mib"]}  # fmt: skip
        if "steps_rss_over_base_mib" in blt and "steps_rss_over_base_mib" in hf:
            steady = blt["steps_rss_over_base_mib"] / hf["steps_rss_over_base_mib"]
            ratios["steady_memory_vs_hf"] = {"value": steady, "target": f"<= {TARGET_MEMORY}",
                                             "ok": steady <= TARGET_MEMORY}  # fmt: skip
    if "skipped" not in baseline:
        ratio = blt["achieved_flops"] / baseline["achieved_flops"]
        ratios["flops_vs_byte_lm"] = {"value": ratio, "target": f">= {TARGET_FLOPS_RATIO}",
                                      "ok": ratio >= TARGET_FLOPS_RATIO,
                                      "flops_per_byte_ratio": baseline["flops_per_byte"]["matmul"]["train"]
                                      / blt["flops_per_byte"]["matmul"]["train"]}  # fmt: skip
    print()
    labels = {
        "speedup_vs_hf": "bytes/s, bltjax / HF",
        "memory_vs_hf": "memory (peak RSS - base, incl. compilation), bltjax / HF",
        "steady_memory_vs_hf": "memory over the timed steps only (VmHWM - base), bltjax / HF",
        "flops_vs_byte_lm": "achieved FLOP/s, BLT / byte LM",
    }
    for key, label in labels.items():
        if key in ratios:
            r = ratios[key]
            extra = ""
            if key == "memory_vs_hf":
                extra = f" (absolute peak RSS ratio {r['peak_rss_ratio']:.2f})"
            if key == "flops_vs_byte_lm":
                extra = f" (baseline / BLT FLOPs per byte {r['flops_per_byte_ratio']:.2f})"
            print(f"{label}: {r['value']:.2f} (target {r['target']}) {verdict(r['ok'])}{extra}")
        else:
            print(f"{label}: n/a (skipped)")

    components = blt.get("components")
    if components and "error" not in components:
        parts = ", ".join(f"{name} {components[name]['share']:.0%} ({components[name]['s']:.3f} s)"
                          for name in (*COMPONENTS, "other"))  # fmt: skip
        print(f"\nBLT step time shares: {parts}\n  ({components['method']})")
    elif components:
        print(f"\nBLT step time shares: failed: {components['error']}")

    if args.out:
        from bltjax.runtime.atomic import write_atomic

        out = pathlib.Path(args.out)
        write_atomic(
            out,
            json.dumps(
                {
                    "unit": "bytes/s = B x N target bytes per second of a full training step (fwd + bwd + AdamW)",
                    "flops": "matmul count, train = 3 x forward (bltjax.models.flops.matmul_flops_per_byte); "
                    "MFU against the measured float32 matmul peak",
                    "memory": "ru_maxrss of each row's own child process; ratio on peak RSS minus the RSS after "
                    "imports",
                    "targets": {
                        "speedup_vs_hf": TARGET_SPEEDUP,
                        "memory_vs_hf": TARGET_MEMORY,
                        "flops_vs_byte_lm": TARGET_FLOPS_RATIO,
                    },  # fmt: skip
                    "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                    "model": args.model,
                    "remat": args.remat,
                    "batch": args.batch,
                    "seq_len": args.seq_len,
                    "matmul_peak_flops": peak,
                    "results": {"bltjax_blt": blt, "hf_torch_blt": hf, "bltjax_byte_lm": baseline},
                    "ratios": ratios,
                },
                indent=2,
            ).encode()
            + b"\n",
        )
        print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
