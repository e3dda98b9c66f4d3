"""Launch commands for a sweep's jobs on the launchers of `launch/` (their agreed interface).

    local   bash launch/local.sh --processes N --devices-per-process M -- CMD
    tpu_vm  bash launch/tpu_vm.sh --name VM --zone ZONE --accelerator v5p-128 [--dry-run] -- CMD
    xpk     bash launch/xpk.sh --cluster C --workload NAME --tpu-type v5p-128 [--dry-run] -- CMD
    slurm   sbatch [SBATCH OPTIONS] launch/slurm.sbatch CMD...

The launcher's own arguments are passed through as given. What differs per job is filled in
unless given: the xpk workload and the SLURM job name come from the job name (lower case,
``[a-z0-9-]``, at most 40 characters, as Kubernetes names require); ``local`` defaults to one
process with one device. A TPU VM's ``--name`` is the machine, shared by the jobs, so it must be
passed. Commands are printed, never run: a cluster is the user's to drive.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

LAUNCHERS = ("local", "tpu_vm", "xpk", "slurm")


class LauncherError(ValueError):
    """Launcher arguments that cannot make a command; the message names the flag."""


def kubernetes_name(name: str, limit: int = 40) -> str:
    """``entropy-ps4.5-1a2b3c4d`` -> ``entropy-ps4-5-1a2b3c4d``: lower case, [a-z0-9-], bounded length."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if len(cleaned) > limit:  # keep the hash at the end: it is what makes the name unique
        cleaned = cleaned[: limit - 9].rstrip("-") + "-" + cleaned[-8:]
    return cleaned


def _has(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def wrap(launcher: str, job_name: str, command: Sequence[str], launcher_args: Sequence[str] = ()) -> list[str]:
    """``command`` (argv of the training job) inside ``launcher``'s command line."""
    args = list(launcher_args)
    command = list(command)
    if launcher == "local":
        if not _has(args, "--processes"):
            args += ["--processes", "1"]
        if not _has(args, "--devices-per-process"):
            args += ["--devices-per-process", "1"]
        return ["bash", "launch/local.sh", *args, "--", *command]
    if launcher == "tpu_vm":
        if not _has(args, "--name"):
            raise LauncherError("--launcher tpu_vm: pass the VM's --name (and --zone, --accelerator) after --")
        return ["bash", "launch/tpu_vm.sh", *args, "--", *command]
    if launcher == "xpk":
        if not _has(args, "--cluster"):
            raise LauncherError("--launcher xpk: pass --cluster (and --tpu-type) after --")
        if not _has(args, "--workload"):
            args += ["--workload", kubernetes_name(job_name)]
        return ["bash", "launch/xpk.sh", *args, "--", *command]
    if launcher == "slurm":
        if not _has(args, "--job-name"):
            args = [f"--job-name={kubernetes_name(job_name)}", *args]
        return ["sbatch", *args, "launch/slurm.sbatch", *command]
    raise LauncherError(f"--launcher: expected one of {LAUNCHERS}, got {launcher!r}")


def shell_line(argv: Sequence[str]) -> str:
    """One copy-pasteable shell line."""
    return " ".join(shlex.quote(a) for a in argv)
