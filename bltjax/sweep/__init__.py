r"""Patch-size / FLOP sweeps: plan, run, resume, report (the paper's fixed-inference study).

    python -m bltjax.sweep plan --sweep experiments/patch_sweep.py --out runs/sweep \
        [--budget-flops-per-byte F] [--patch-sizes 4 6 8] [--modes entropy static] [--base FILE.py[:v]]
    python -m bltjax.sweep run runs/sweep [--only NAME] [--print-commands --launcher xpk -- ARGS...]
    python -m bltjax.sweep report runs/sweep

The question a sweep answers: at a fixed inference budget (forward FLOPs per byte, docs/architecture.md §14),
does a larger patch, which frees FLOPs for a larger latent model, buy better bits-per-byte?

Modules, in the order the data flows:

    spec.py        the sweep definition (an experiments/ file's get_sweep()) and its checks
    scaling.py     the rules: latent width/depth for an inference budget, steps/batch for a training budget
    plan.py        one training config per (mode, patch size) + the byte baseline; names from config hashes
    stages.py      the shared stages: prepared data, entropy model, entropy sidecars + thresholds
    job_config.py  the experiment file `python -m bltjax.train --config` reads for a planned job
    launchers.py   launch commands for launch/local.sh, tpu_vm.sh, xpk.sh, slurm.sbatch
    runner.py      runs the jobs one after another, resumably
    report.py      gathers every run's results into a table, a CSV and two plots

The sweep folder is the sweep, as a workdir is a run: `plan.json` (and `plan.md`), `jobs/NAME.json`,
`data/`, `stages/`, and `runs/NAME/` (a `bltjax.train` workdir plus `train.log` and
`launches.jsonl`). Relaunching `run` continues every unfinished run from its checkpoint.
"""
