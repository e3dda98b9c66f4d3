"""Command line of `bltjax.sweep`: plan, run, report (see the package docstring).

    python -m bltjax.sweep plan --out SWEEP [--sweep FILE.py[:variant]] [--modes entropy space] [--patch-sizes 4 6 8]
    python -m bltjax.sweep run SWEEP [--only NAME ...] [--stages-only] [--keep-going]
    python -m bltjax.sweep run SWEEP --print-commands [--launcher xpk] [-- LAUNCHER FLAGS]
    python -m bltjax.sweep report SWEEP

One absl program whose first positional argument is the sub-command (the flags of every
sub-command are defined, and a flag given to a sub-command it does not belong to is refused);
flag spellings as everywhere (`bltjax.runtime.cli`). Exit status 1 for a plan, stage or launcher
error, 2 for a bad command line.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags

from bltjax.config import ConfigError
from bltjax.data.bpe import BPEError
from bltjax.runtime import cli
from bltjax.runtime.paths import resolve
from bltjax.sweep.launchers import LauncherError
from bltjax.sweep.plan import PlanError
from bltjax.sweep.stages import StageError

# Which flags each sub-command reads: the others are refused for it.
COMMAND_FLAGS = {
    "plan": ("out", "sweep", "base", "baseline", "modes", "patch_sizes", "budget_flops_per_byte",
             "budget_train_flops", "rows", "force", "token_baseline", "bpe_vocab_size", "seeds"),
    "run": ("only", "stages_only", "keep_going", "print_commands", "launcher"),
    "report": (),
}  # fmt: skip
USAGE = "expected a sub-command: plan --out SWEEP ..., run SWEEP ... or report SWEEP"


def define_flags(values: flags.FlagValues) -> None:
    """The flags of every sub-command (see `COMMAND_FLAGS`)."""
    string, multi = flags.DEFINE_string, flags.DEFINE_multi_string
    string("out", None, "plan: the sweep folder (plan.json, plan.md, jobs/, later runs/).", flag_values=values)
    string("sweep", None, "plan: sweep file path.py[:variant] with get_sweep() (default: the built-in sweep).",
           flag_values=values)  # fmt: skip
    string("base", None, "plan: BLT experiment path.py[:variant] whose latent model is scaled.", flag_values=values)
    string("baseline", None, "plan: byte-LM experiment for the byte baseline; 'none' for none.", flag_values=values)
    multi("modes", None, "plan: patching modes (entropy monotonic space static megabyte); several may follow "
          "one --modes.", flag_values=values)  # fmt: skip
    flags.DEFINE_multi_float("patch_sizes", None, "plan: target mean patch sizes; several may follow one flag.",
                             flag_values=values)  # fmt: skip
    flags.DEFINE_float("budget_flops_per_byte", None, "plan: inference budget, forward FLOPs/byte.", flag_values=values)
    flags.DEFINE_float("budget_train_flops", None, "plan: training FLOPs of each run.", flag_values=values)
    flags.DEFINE_bool("force", False, "plan: replace a different plan in --out.", flag_values=values)
    string("rows", None, "plan: how BLT rows are built, windows or packed (config.data.rows).", flag_values=values)
    string("token_baseline", None, "plan: token-LM experiment (experiments/token_lm.py) for the BPE token baseline; "
           "'none' for none.", flag_values=values)  # fmt: skip
    flags.DEFINE_integer("bpe_vocab_size", None, "plan: the token baseline's BPE vocabulary (python -m bltjax.bpe).",
                         flag_values=values)  # fmt: skip
    flags.DEFINE_multi_integer("seeds", None, "plan: training seeds, one run of every job per seed; several may "
                               "follow one --seeds.", flag_values=values)  # fmt: skip
    multi("only", None, "run: job names to run (default: all); several may follow one --only.", flag_values=values)
    flags.DEFINE_bool("stages_only", False, "run: only the shared stages (data, entropy model).", flag_values=values)
    flags.DEFINE_bool("keep_going", False, "run: go on with the next job when one fails.", flag_values=values)
    flags.DEFINE_bool("print_commands", False, "run: print launch commands instead of running.", flag_values=values)
    string("launcher", "local", "run: local, tpu_vm, xpk or slurm (with --print-commands).", flag_values=values)


def _plan(values: flags.FlagValues) -> int:
    from bltjax.sweep import plan as planning
    from bltjax.sweep import spec

    cli.require(values, "out")
    sweep = spec.load_sweep(values.sweep)
    overrides = {
        "base": values.base,
        "baseline": "" if values.baseline == "none" else values.baseline,
        "modes": values.modes,
        "patch_sizes": values.patch_sizes,
        "budget_flops_per_byte": values.budget_flops_per_byte,
        "budget_train_flops": values.budget_train_flops,
        "rows": values.rows,
        "token_baseline": "" if values.token_baseline == "none" else values.token_baseline,
        "bpe_vocab_size": values.bpe_vocab_size,
        "seeds": values.seeds,
    }
    with sweep.ignore_type():
        for key, value in overrides.items():
            if value is not None:
                sweep[key] = value
    out = resolve(values.out)
    plan = planning.make_plan(sweep, out)
    path = planning.write_plan(plan, out, force=values.force)
    print(planning.format_plan(plan))
    print(
        f"\nwrote {path}, {out / planning.PLAN_TABLE} and {len(plan['jobs'])} job file(s) in {out / planning.JOBS_DIR}"
    )
    print(f"next: python -m bltjax.sweep run {out}")
    return 0


def _run(values: flags.FlagValues, sweep_dir: str, launcher_args: Sequence[str]) -> int:
    from bltjax.sweep import runner

    if values.print_commands:
        only, launcher = values.only, values.launcher
        lines = runner.launch_commands(sweep_dir, only=only, launcher=launcher, launcher_args=launcher_args)
        print("\n".join(lines))
        return 0
    if launcher_args or values.launcher != "local":
        raise ConfigError("--launcher and arguments after -- only apply with --print-commands")
    return runner.run_sweep(sweep_dir, only=values.only, stages_only=values.stages_only, keep_going=values.keep_going)


def _report(sweep_dir: str) -> int:
    from bltjax.sweep import report

    files = report.write_report(sweep_dir)
    print(files["table"].read_text(), end="")
    print("\nwrote " + ", ".join(str(path) for path in files.values()))
    return 0


def _main(command_line: cli.CommandLine) -> int:
    values, args = command_line.flags, command_line.args
    if not args or args[0] not in COMMAND_FLAGS:
        raise cli.CommandLineError(f"{USAGE}; got {args[0]!r}" if args else USAGE)
    command, operands = args[0], args[1:]
    for name in (n for names in COMMAND_FLAGS.values() for n in names):
        if values[name].present and name not in COMMAND_FLAGS[command]:
            owner = next(c for c, names in COMMAND_FLAGS.items() if name in names)
            raise cli.CommandLineError(f"--{name} is a flag of 'sweep {owner}', not of 'sweep {command}'")
    if command_line.after_dashes and command != "run":
        raise cli.CommandLineError(f"'sweep {command}' takes no arguments after --")
    if command == "plan":
        if operands:
            raise cli.CommandLineError(f"'sweep plan' takes flags only (the folder is --out), got {operands[0]!r}")
        return _plan(values)
    if len(operands) != 1:
        raise cli.CommandLineError(f"'sweep {command}' takes one sweep folder, got {len(operands)}: {operands}")
    sweep_dir = resolve(operands[0])
    if command == "run":
        return _run(values, sweep_dir, command_line.after_dashes)
    return _report(sweep_dir)


PROGRAM = cli.Program(
    "python -m bltjax.sweep",
    define_flags,
    _main,
    doc=__doc__,
    errors=(ConfigError, PlanError, StageError, LauncherError, FileNotFoundError, BPEError),
    multi_word=("modes", "patch_sizes", "only", "seeds"),
    positional=True,
    passthrough=True,
)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bltjax.sweep``; ``argv`` without the program name (default: the command line)."""
    return PROGRAM.run(argv)


if __name__ == "__main__":
    sys.exit(main())
