"""Command line of `bltjax.sweep`: plan, run, report (see the package docstring)."""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

from bltjax.config import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bltjax.sweep", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    plan = commands.add_parser("plan", help="derive one config per patching mode and patch size at a fixed budget")
    plan.add_argument("--out", required=True, help="the sweep folder (plan.json, plan.md, jobs/, later runs/)")
    plan.add_argument("--sweep", default=None, help="sweep file path.py[:variant] with get_sweep() (defaults below)")
    plan.add_argument("--base", default=None, help="BLT experiment path.py[:variant] whose latent model is scaled")
    plan.add_argument("--baseline", default=None, help="byte-LM experiment for the byte baseline; 'none' for none")
    plan.add_argument("--modes", nargs="+", default=None, help="patching modes: entropy space static")
    plan.add_argument("--patch-sizes", nargs="+", type=float, default=None, help="target mean patch sizes")
    plan.add_argument("--budget-flops-per-byte", type=float, default=None, help="inference budget, forward FLOPs/byte")
    plan.add_argument("--budget-train-flops", type=float, default=None, help="training FLOPs of each run")
    plan.add_argument("--force", action="store_true", help="replace a different plan in --out")

    run = commands.add_parser("run", help="run the plan's jobs here one after another (resumable), or print commands")
    run.add_argument("sweep_dir")
    run.add_argument("--only", nargs="+", default=None, help="job names to run (default: all)")
    run.add_argument("--stages-only", action="store_true", help="only the shared stages (data, entropy model)")
    run.add_argument("--keep-going", action="store_true", help="go on with the next job when one fails")
    run.add_argument("--print-commands", action="store_true", help="print launch commands instead of running")
    run.add_argument("--launcher", default="local", help="local, tpu_vm, xpk or slurm (with --print-commands)")

    report = commands.add_parser("report", help="gather results into report.md / .csv / .json and two PNG plots")
    report.add_argument("sweep_dir")
    return parser


def _plan(args: argparse.Namespace) -> int:
    from bltjax.sweep import plan as planning
    from bltjax.sweep import spec

    sweep = spec.load_sweep(args.sweep)
    overrides = {
        "base": args.base,
        "baseline": "" if args.baseline == "none" else args.baseline,
        "modes": args.modes,
        "patch_sizes": args.patch_sizes,
        "budget_flops_per_byte": args.budget_flops_per_byte,
        "budget_train_flops": args.budget_train_flops,
    }
    with sweep.ignore_type():
        for key, value in overrides.items():
            if value is not None:
                sweep[key] = value
    out = pathlib.Path(args.out)
    plan = planning.make_plan(sweep, out.absolute())
    path = planning.write_plan(plan, out, force=args.force)
    print(planning.format_plan(plan))
    print(
        f"\nwrote {path}, {out / planning.PLAN_TABLE} and {len(plan['jobs'])} job file(s) in {out / planning.JOBS_DIR}"
    )
    print(f"next: python -m bltjax.sweep run {out}")
    return 0


def _run(args: argparse.Namespace, launcher_args: Sequence[str]) -> int:
    from bltjax.sweep import runner

    if args.print_commands:
        lines = runner.launch_commands(
            args.sweep_dir, only=args.only, launcher=args.launcher, launcher_args=launcher_args
        )
        print("\n".join(lines))
        return 0
    if launcher_args or args.launcher != "local":
        raise ConfigError("--launcher and arguments after -- only apply with --print-commands")
    return runner.run_sweep(args.sweep_dir, only=args.only, stages_only=args.stages_only, keep_going=args.keep_going)


def _report(args: argparse.Namespace) -> int:
    from bltjax.sweep import report

    files = report.write_report(args.sweep_dir)
    print(files["table"].read_text(), end="")
    print("\nwrote " + ", ".join(str(path) for path in files.values()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    launcher_args: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, launcher_args = argv[:split], argv[split + 1 :]
    args = _parser().parse_args(argv)
    from bltjax.sweep.launchers import LauncherError
    from bltjax.sweep.plan import PlanError
    from bltjax.sweep.stages import StageError

    try:
        if args.command == "plan":
            return _plan(args)
        if args.command == "run":
            return _run(args, launcher_args)
        return _report(args)
    except (ConfigError, PlanError, StageError, LauncherError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
