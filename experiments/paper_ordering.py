r"""The paper's orderings, reproduced at matched FLOPs on the bundled corpus, with seeds: one command.

  python experiments/paper_ordering.py                      # 2 CPU cores -> docs/results.md + docs/results/*.png
  python experiments/paper_ordering.py --variant smoke --out /tmp/po --results /tmp/po/results.md   # minutes
  python experiments/paper_ordering.py --variant gpu --data gs://bucket/prepared --out gs://bucket/po --parallel 1
  python -m bltjax.flops --config experiments/paper_ordering.py:blt --patch-size 4     # the base at the budget

Every model spends the same forward FLOPs per byte (BUDGET, the inference budget) and the same
training FLOPs (steps x batch x bytes x 3 x forward): the byte LM, the BPE token LM, MegaByte,
and BLTs with static, space and entropy patches (the global and the approximate-monotonic
rule), and for entropy patching the fixed-inference-budget curve over patch sizes 4, 6 and 8
(larger patches leave FLOPs for a larger latent model). Each runs with three seeds (initialisation
and data order); the score is bits per byte over the whole validation split. The claims below
are judged against the seed noise (bltjax/sweep/study.py) and the page is written from the
numbers, whichever way they go.

It is also a sweep file: `python -m bltjax.sweep plan --sweep experiments/paper_ordering.py --out D`
plans the same runs, and `bltjax.sweep run` / `report` work on the folder as on any sweep.

Variants: ``default`` (the 2-core study), ``smoke`` (a few steps, two seeds: the pipeline end to
end in minutes, for tests), ``gpu`` (the same study at 100M+ latent parameters on a GPU or TPU,
on a prepared folder given with --data).
"""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import subprocess
import sys
from collections.abc import Sequence

from ml_collections import ConfigDict

from bltjax.config import base_blt_config, base_byte_lm_config, base_token_lm_config, stack_config

SEQ_LEN = 256
BATCH = 8
# Training steps of the base at the budget; every run spends the same training FLOPs. At 400 steps
# (17 min on 2 cores) the seed spreads were already below most gaps; 1600 steps (about 1.25 passes
# over the training split) trains the models four times longer within the 2-hour bound.
STEPS = 1600
# Forward FLOPs per byte of every model: the base BLT below at a mean patch of 4 bytes
# (python -m bltjax.flops --config experiments/paper_ordering.py:blt --patch-size 4).
BUDGET = 1.0e6
SEEDS = [0, 1, 2]
# English prose and Python code of the bundled corpus, 2.8 MB (the Chinese poems would need 3-4x the
# patch columns with a tiny entropy model; docs/sweeps.md).
CORPUS = ["en_jargon_file_excerpt.jsonl", "en_fortunes.jsonl", "en_kjv_excerpt.jsonl", "code_python_stdlib.jsonl"]
HERE = "experiments/paper_ordering.py"
# Sweep fields name this file by its bare name, which the sweep resolves beside the sweep file from any folder.
NAME = "paper_ordering.py"


def _schedule(config, steps: int, lr: float, warmup: int):
    config.train.steps = steps
    config.train.log_every = 10
    config.train.eval_every = max(1, steps // 4)
    config.train.eval_batches = 8
    config.train.checkpoint_every = max(1, steps // 4)
    config.optimizer.learning_rate = lr
    config.optimizer.warmup_steps = warmup
    config.optimizer.final_lr_ratio = 0.1
    return config


def blt_config(gpu: bool = False):
    """The base BLT whose latent model every BLT run resizes to the budget."""
    config = base_blt_config()
    local, window, latent = (512, 512, (1024, 12, 16)) if gpu else (64, 64, (192, 3, 6))
    config.model.encoder = stack_config(local, 1, max(4, local // 64), window=window)
    config.model.latent = stack_config(*latent)
    config.model.decoder = stack_config(local, 2 if gpu else 1, max(4, local // 64), window=window)
    config.model.cross_attn_k = 2
    config.model.hash_sizes = [3, 4, 5, 6, 7, 8] if gpu else [3, 4, 5]
    config.model.hash_vocab = 100_000 if gpu else 4096
    config.patching.mode = "static"
    config.patching.threshold = None
    config.patching.patch_size = 6.0 if gpu else 4.0
    config.data.seq_len = 4096 if gpu else SEQ_LEN
    config.data.batch_size = 64 if gpu else BATCH
    config.data.max_patches = config.data.seq_len // 4 + 1
    if gpu:
        config.model.dtype = "bfloat16"
        return _schedule(config, steps=20_000, lr=4e-4, warmup=2000)
    return _schedule(config, steps=STEPS, lr=2e-3, warmup=20)


def byte_config(gpu: bool = False):
    config = base_byte_lm_config()
    config.model.stack = stack_config(1024, 8, 16) if gpu else stack_config(128, 2, 4)
    config.data.seq_len = 4096 if gpu else SEQ_LEN
    config.data.batch_size = 64 if gpu else BATCH
    if gpu:
        config.model.dtype = "bfloat16"
        return _schedule(config, steps=20_000, lr=4e-4, warmup=2000)
    return _schedule(config, steps=STEPS, lr=2e-3, warmup=20)


def token_config(gpu: bool = False):
    """The BPE baseline's starting shape; the sweep refits its stack and sets its rows in tokens."""
    config = base_token_lm_config()
    config.model.stack = stack_config(1024, 12, 16, rope_theta=500000.0) if gpu else stack_config(128, 2, 4)
    config.data.seq_len = 1024 if gpu else 64
    config.data.batch_size = 64 if gpu else BATCH
    if gpu:
        config.model.dtype = "bfloat16"
        return _schedule(config, steps=20_000, lr=4e-4, warmup=2000)
    return _schedule(config, steps=STEPS, lr=2e-3, warmup=20)


def entropy_config(gpu: bool = False):
    """The patcher: a small byte LM (the paper's is 100M parameters with a 512-byte window)."""
    config = base_byte_lm_config()
    config.model.stack = (
        stack_config(512, 14, 8, window=512, rope_theta=10000.0)
        if gpu
        else stack_config(64, 2, 4, window=64, rope_theta=10000.0)
    )
    config.data.seq_len = 4096 if gpu else 256
    config.data.batch_size = 64 if gpu else 16
    if gpu:
        return _schedule(config, steps=10_000, lr=1e-3, warmup=1000)
    return _schedule(config, steps=150, lr=3e-3, warmup=15)


VARIANTS = {
    "blt": blt_config,
    "byte": byte_config,
    "token": token_config,
    "entropy": entropy_config,
    "blt_gpu": lambda: blt_config(gpu=True),
    "byte_gpu": lambda: byte_config(gpu=True),
    "token_gpu": lambda: token_config(gpu=True),
    "entropy_gpu": lambda: entropy_config(gpu=True),
}
STUDIES = ("default", "smoke", "gpu")
STUDY_STEPS = {"default": STEPS, "smoke": 6, "gpu": 20_000}  # training steps of each study's base


def get_config(arg: str | None = None):
    variant = arg or "blt"
    if variant not in VARIANTS:
        raise ValueError(f"{HERE}: unknown config variant {variant!r}; expected one of {sorted(VARIANTS)}")
    return VARIANTS[variant]()


def get_sweep(arg: str | None = None) -> ConfigDict:
    """The study's sweep (keys: bltjax/sweep/spec.py); ``arg`` is one of STUDIES."""
    study = arg or "default"
    if study not in STUDIES:
        raise ValueError(f"{HERE}: unknown study {study!r}; expected one of {list(STUDIES)}")
    suffix = "_gpu" if study == "gpu" else ""
    steps = STUDY_STEPS[study]
    base = blt_config(gpu=study == "gpu")
    sweep = ConfigDict(
        dict(
            base=f"{NAME}:blt{suffix}",
            baseline=f"{NAME}:byte{suffix}",
            token_baseline=f"{NAME}:token{suffix}",
            bpe_vocab_size=32_000 if study == "gpu" else 4096,
            modes=["entropy", "monotonic", "space", "static", "megabyte"],
            patch_sizes=[6.0],
            mode_patch_sizes=dict(entropy=[4.0, 6.0, 8.0]),
            seeds=SEEDS if study != "smoke" else [0, 1],
            rows="packed",
            # gpu: the base at its own patch size (6) sets the budget
            budget_flops_per_byte=None if study == "gpu" else BUDGET,
            budget_train_flops=float(steps * base.data.batch_size * base.data.seq_len * 3 * BUDGET),  # gpu: below
            min_steps=4 if study == "smoke" else 10,
            evals=2 if study == "smoke" else 4,
            data=dict(corpus=CORPUS, val_fraction=0.05),
            entropy=dict(config=f"{NAME}:entropy{suffix}", context=8192 if study == "gpu" else 2048),
        )
    )
    if study == "gpu":  # the training budget from the base's own FLOPs at patch size 6
        from bltjax.models import flops

        sweep.budget_train_flops = (
            steps * base.data.batch_size * base.data.seq_len * flops.analytic_flops_per_byte(base).train
        )
    if study == "smoke":
        sweep.entropy.context = 512
    return sweep


# --- the claims and the page -----------------------------------------------------------------------


def claims():
    from bltjax.sweep.study import Claim

    paper = "arXiv 2412.09871"
    scaling = f"{paper}, compute-optimal scaling study (BLT-Entropy, BLT-Space, MegaByte, Llama 2 / 3)"
    return [
        Claim("entropy_vs_static", "Entropy patches beat fixed-size (strided) patches of the same mean size",
              f"{paper}, §2 (patching schemes)", "entropy-ps6", "static-ps6"),
        Claim("entropy_vs_megabyte", "A BLT beats the MegaByte baseline at equal FLOPs", scaling,
              "entropy-ps6", "megabyte-ps6"),
        Claim("entropy_vs_space", "Entropy patching beats space patching", scaling, "entropy-ps6", "space"),
        Claim("blt_vs_bpe", "A BLT matches or beats a BPE token model at equal training FLOPs (tested here as "
              "'beats')", f"{paper}, abstract and Figure 1", "entropy-ps6", "bpe"),
        Claim("blt_vs_byte", "Patching beats a byte-level model at equal inference FLOPs (a byte model pays its "
              "large model on every byte)", f"{paper}, §1", "entropy-ps6", "byte"),
        Claim("bigger_patches", "At a fixed inference budget, larger patches with a larger latent model reach a "
              "lower bpb (at large enough training budgets)", f"{paper}, Figure 1 and Table 2 (fixed-inference models)",
              "entropy-ps8", "entropy-ps4"),
    ]  # fmt: skip


SETUP = """\
All models are trained at one inference budget ({budget}) and one training budget
({train} FLOPs per run, steps x batch x bytes x 3 x forward) on the English prose and Python
code of the bundled corpus (`bltjax/data/corpus`, {val} held out for validation), with the seeds
{seeds} (initialisation and data order). The plan, every config and the fitted shapes are in the
sweep folder (`plan.md`); `docs/sweeps.md` explains how each latent model is fitted to the budget.

* byte LM: a transformer over bytes (its stack fitted to the budget); BPE token LM: the same stack
  over byte-level BPE ids ({vocab} ids learned on the training split; bits per byte over the bytes
  its tokens cover); MegaByte: fixed patches, an s-1 BOE prefix, concatenation pooling
  (docs/architecture.md §19); BLTs: static, space and entropy patching, entropy with the global
  and the approximate-monotonic rule (thresholds calibrated on the training split to the target
  mean patch size).
* BLT rows are packed (a fixed number of patches under a byte cap, docs/data.md); the FLOPs
  spent include the padding.
* The score is bits per byte of `python -m bltjax.eval` over the whole validation split (the same
  bytes for every model; the paper's definition, nats over byte targets / ln 2 / bytes).
* Times are wall-clock on the machine named above, {parallel} jobs at a time."""

CAVEATS = """\
These are models of 0.5 to 4 million non-embedding parameters trained for {steps} steps
({epochs:.2g} passes over {train_mb:.1f} MB of training text); the paper's orderings are measured
at 400M to 8B parameters and up to trillions of bytes. Where a result disagrees, it may be the
scale: the paper's own Figure 1 shows larger patches overtaking smaller ones only as training
compute grows, and its entropy model is a 100M-parameter byte LM, not a two-layer one. A tiny
entropy model finds code and prose differently surprising, which moves its patch boundaries away
from where a strong one would put them. Three seeds give a rough noise estimate; a verdict "inside
the seed noise" means this budget cannot separate the two, not that they are equal. The paper's
fixed-inference BLTs (Table 2) pass their BPE counterparts only beyond the compute-optimal
training budget (about 150B bytes against 50B at 3.1e8 FLOPs per byte); a run of a few megabytes
is far before any such crossover."""

SCALE_UP = """\
The `gpu` study runs the same comparison with a 1024-wide, 12-layer latent model (about 150M
parameters) at patch size 6, 4096-byte rows, batch 64, 20k steps and a 100M-parameter-class
entropy model, on a prepared folder (`python -m bltjax.prepare`) of your own:

    python experiments/paper_ordering.py --variant gpu --data gs://bucket/prepared --out gs://bucket/po --parallel 1

It has not been run; its plan is tested (`tests/test_paper_ordering.py::test_the_gpu_study_plans_100m_models`)."""


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=pathlib.Path(__file__).parent).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    from absl import flags

    from bltjax.runtime import cli

    def define(values: flags.FlagValues) -> None:
        flags.DEFINE_enum("variant", "default", list(STUDIES), "Which study (module docstring).", flag_values=values)
        flags.DEFINE_string("out", None, "Sweep folder (default runs/paper_ordering[_VARIANT]).", flag_values=values)
        flags.DEFINE_string("results", None, "Results page (default: docs/results.md for the default study, "
                            "else OUT/results.md); plots go to a folder named after it.",
                            flag_values=values)  # fmt: skip
        flags.DEFINE_string("data", None, "A prepared data folder instead of the bundled corpus (gpu: required).",
                            flag_values=values)  # fmt: skip
        flags.DEFINE_integer("parallel", None, "Jobs at once (default: the CPU cores, at most 2; 1 on a GPU).",
                             flag_values=values)  # fmt: skip
        flags.DEFINE_bool("force", False, "Replace a different plan in --out.", flag_values=values)

    def run(command_line: cli.CommandLine) -> int:
        from bltjax.config import ConfigError
        from bltjax.data import shards
        from bltjax.runtime import paths
        from bltjax.sweep import plan, spec, stages, study, study_report

        values = command_line.flags
        if command_line.args:
            raise cli.CommandLineError(f"takes flags only, got {command_line.args[0]!r}")
        variant = values.variant
        if variant == "gpu" and not values.data:
            raise ConfigError("--data: expected a prepared data folder for the gpu study (the bundled corpus is "
                              "1.3 MB, far too little for 100M-parameter models)")  # fmt: skip
        out = paths.resolve(values.out or f"runs/paper_ordering{'' if variant == 'default' else '_' + variant}")
        results = paths.resolve(values.results or ("docs/results.md" if variant == "default" else out / "results.md"))
        parallel = values.parallel or (1 if variant == "gpu" else min(2, study.cpu_count()))
        sweep = spec.load_sweep(f"{pathlib.Path(__file__).absolute()}:{variant}")
        if values.data:
            sweep.data.path = values.data
        made = plan.make_plan(sweep, out)
        plan.write_plan(made, out, force=values.force)
        print(f"paper_ordering: {len(made['jobs'])} runs planned in {out} ({parallel} at a time)", flush=True)
        train_bytes = shards.load_manifest(stages.data_dir(out, made["stages"]["data"])).total("train", "bytes")
        failed = study.train_all(out, parallel, version=_commit()) + study.evaluate_all(out, parallel)
        groups, verdicts = study.write_study(out, claims())
        plots = study_report.write_plots(groups, results.parent / results.stem)
        page = study_report.Page(
            title="Results: the paper's orderings at matched FLOPs" + ("" if variant == "default" else f" ({variant})"),
            command=f"python {HERE}" + ("" if variant == "default" else f" --variant {variant}"),
            setup=SETUP.format(
                budget=f"{made['budget']['inference_flops_per_byte']:.3g} forward FLOPs per byte",
                train=f"{float(sweep.budget_train_flops):.3g}",
                val=f"{float(sweep.data.val_fraction):.0%}",
                seeds=", ".join(str(s) for s in sweep.seeds),
                vocab=int(sweep.bpe_vocab_size),
                parallel=parallel,
            ),
            caveats=CAVEATS.format(
                steps=STUDY_STEPS[variant],
                epochs=float(sweep.budget_train_flops) / (3 * made["budget"]["inference_flops_per_byte"]) / train_bytes,
                train_mb=train_bytes / 1e6,
            ),
            scale_up=SCALE_UP,
            date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            machine=f"{study.cpu_count()} CPU cores ({platform.machine()}), "
            f"jax backend {os.environ.get('JAX_PLATFORMS') or 'default'}",
            commit=_commit(),
            trained_at=tuple(study.read_training_versions(out)),
        )
        text = study_report.render(page, groups, verdicts, plots, results, study.read_timing(out))
        study_report.write_page(text, results)
        record = study_report.write_record(out, page, results.parent / results.stem)
        print(f"paper_ordering: wrote {results}, {len(plots)} plots and {record.name} in {record.parent}")
        if failed:
            print(f"paper_ordering: {len(failed)} step(s) failed: {', '.join(failed)} (logs in {out}/study/logs)",
                  file=sys.stderr)  # fmt: skip
            return 1
        return 0

    from bltjax.config import ConfigError
    from bltjax.sweep.plan import PlanError

    program = cli.Program(f"python {HERE}", define, run, doc=__doc__, errors=(ConfigError, PlanError))
    return program.run(argv)


if __name__ == "__main__":
    sys.exit(main())
