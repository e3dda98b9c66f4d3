"""Runs a sweep's jobs one after another on this machine, or prints their launch commands.

Each job is ``python -m bltjax.train --config bltjax/sweep/job_config.py:SWEEP/jobs/NAME.json
--workdir SWEEP/runs/NAME`` in a subprocess, exactly what a cluster launcher would run, so a
local sweep and a cluster sweep produce the same folders. Resuming is the trainer's: a workdir
continues from its latest complete checkpoint. On top of it the runner keeps, per run:

    runs/NAME/train.log        everything the job printed, over all launches
    runs/NAME/launches.jsonl   {"event": "start"/"end", "time", "pid", "rc"} per launch (the report's wall time)
    runs/NAME/done.json        written when the job exits 0: later launches skip the job

The sweep folder may be a bucket (gs://...): the jobs still run here, and the two logs, which an
object store cannot append to, are rewritten whole (`AppendedText`), at most every few seconds.

A job that fails stops the sweep (``--keep-going`` goes on with the next), naming its log; a
SIGTERM to the runner is passed to the running job, which saves a checkpoint and exits 143, and
the runner then exits 143 too, so relaunching the same command continues where it stopped.
"""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from etils import epath

from bltjax.runtime import paths
from bltjax.runtime.atomic import write_atomic
from bltjax.sweep import job_config, launchers, spec, stages
from bltjax.sweep.plan import PlanError, job_file, load_plan
from bltjax.training.metrics import METRICS_FILE, read_jsonl

JOB_CONFIG = pathlib.Path(__file__).resolve().with_name("job_config.py")
RUNS_DIR = "runs"
LOG_FILE = "train.log"
LAUNCHES_FILE = "launches.jsonl"
DONE_FILE = "done.json"
PREEMPTED = 143
OVERFLOW_WARNING = 0.01  # fraction of rows the pipeline truncates before the runner warns


def run_dir(sweep_dir: paths.PathLike, name: str) -> epath.Path:
    return paths.resolve(sweep_dir) / RUNS_DIR / name


def select_jobs(plan: Mapping[str, Any], only: Sequence[str] | None) -> list[dict[str, Any]]:
    """The plan's jobs, or those named by ``--only`` (in plan order)."""
    jobs = list(plan["jobs"])
    if not only:
        return jobs
    names = [job["name"] for job in jobs]
    unknown = [name for name in only if name not in names]
    if unknown:
        raise PlanError(f"--only: no job named {unknown[0]!r} in the plan; jobs: {', '.join(names)}")
    return [job for job in jobs if job["name"] in only]


def train_command(
    sweep_dir: paths.PathLike, name: str, *, python: str = "python", job_config: str | None = None
) -> list[str]:
    """argv of one job's training (``python -m bltjax.train ...``)."""
    sweep = str(sweep_dir)
    config = job_config or str(JOB_CONFIG)
    return [
        python,
        "-m",
        "bltjax.train",
        "--config",
        f"{config}:{sweep}/jobs/{name}.json",
        "--workdir",
        f"{sweep}/{RUNS_DIR}/{name}",
    ]


def read_done(sweep_dir: paths.PathLike, job: Mapping[str, Any]) -> dict[str, Any] | None:
    """The job's done.json if it belongs to this job (same config hash), else None."""
    path = run_dir(sweep_dir, job["name"]) / DONE_FILE
    try:
        done = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return done if isinstance(done, dict) and done.get("hash") == job["hash"] else None


class AppendedText:
    """A text file that grows by appends: a local file in append mode, or an object rewritten whole.

    An object store has no append, so a remote file keeps its text here and re-uploads it at
    most every ``every`` seconds and on `close`; a crash loses at most those seconds of log.
    """

    def __init__(self, path: epath.Path, every: float = 10.0) -> None:
        self.path, self.every = path, every
        self.remote = paths.is_uri(path)
        self._text = (path.read_text(encoding="utf-8") if path.exists() else "") if self.remote else None
        self._file = None if self.remote else open(path, "a", encoding="utf-8")
        self._uploaded = time.monotonic()

    def write(self, text: str) -> None:
        if not self.remote:
            self._file.write(text)
            self._file.flush()
            return
        self._text += text
        if time.monotonic() - self._uploaded >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.remote:
            write_atomic(self.path, self._text.encode("utf-8"))
            self._uploaded = time.monotonic()

    def close(self) -> None:
        if self.remote:
            self.flush()
        else:
            self._file.close()

    def __enter__(self) -> AppendedText:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _append(path: epath.Path, record: Mapping[str, Any]) -> None:
    with AppendedText(path) as file:
        file.write(json.dumps(record) + "\n")


def final_validation(workdir: epath.Path, steps: int) -> float | None:
    """Validation bpb recorded at the final step, if any."""
    path = workdir / METRICS_FILE
    if not path.is_file():
        return None
    values = [r["bpb"] for r in read_jsonl(path) if r.get("split") == "validation" and r.get("step") == steps]
    return float(values[-1]) if values else None


class _Forward:
    """While a job runs, SIGTERM to the runner goes to the job (which checkpoints and exits 143)."""

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.requested = False

    def __enter__(self) -> _Forward:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)


def run_job(sweep_dir: epath.Path, job: Mapping[str, Any], log: TextIO, forward: _Forward) -> int:
    """Runs (or resumes) one job to its end; returns the training command's exit status."""
    name = job["name"]
    workdir = run_dir(sweep_dir, name)
    workdir.mkdir(parents=True, exist_ok=True)
    command = train_command(sweep_dir, name, python=sys.executable)
    print(f"sweep: {name}: {launchers.shell_line(command)}", file=log, flush=True)
    start = time.time()
    with AppendedText(workdir / LOG_FILE) as out:
        out.write(f"\n=== launch at {time.strftime('%Y-%m-%d %H:%M:%S')}: {launchers.shell_line(command)}\n")
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        forward.child = child
        _append(workdir / LAUNCHES_FILE, {"event": "start", "time": start, "pid": child.pid})
        try:
            for line in child.stdout:
                out.write(line)
                print(f"[{name}] {line}", end="", file=log, flush=True)
            rc = child.wait()
        finally:
            forward.child = None
    _append(workdir / LAUNCHES_FILE, {"event": "end", "time": time.time(), "rc": rc})
    if rc == 0:
        steps = int(job["schedule"]["steps"])
        done = {
            "name": name,
            "hash": job["hash"],
            "steps": steps,
            "validation_bpb": final_validation(workdir, steps),
            "time": time.time(),
        }
        write_atomic(workdir / DONE_FILE, (json.dumps(done, indent=1) + "\n").encode())
    return rc


def run_stages(sweep_dir: epath.Path, plan: Mapping[str, Any], jobs: Sequence[Mapping[str, Any]], log: TextIO) -> None:
    """The shared stages the selected jobs need: data always, the entropy stage for entropy jobs."""
    data = stages.ensure_data(sweep_dir, plan["stages"]["data"], log)
    for vocab in sorted({int(job["tokens"]["vocab_size"]) for job in jobs if job.get("tokens")}):
        stages.ensure_tokens(data, vocab, log)  # the token baseline's tokenizer and shards
    entropy_jobs = [job for job in jobs if job["mode"] in spec.ENTROPY_MODES]
    if not entropy_jobs:
        return
    targets = sorted({("monotonic" if j["mode"] == "monotonic" else "global", j["patch_size"]) for j in entropy_jobs})
    stages.ensure_entropy(sweep_dir, plan["stages"]["entropy"], data, targets, log)
    for job in entropy_jobs:  # the calibrated patching against the planned patch columns
        config = job_config.get_config(str(job_file(sweep_dir, job["name"])))
        if config.data.get("rows", "windows") == "packed":  # packed rows take whole patches: nothing truncates
            continue
        seen = stages.measure_patch_size(config, data)
        if seen["overflow"] > OVERFLOW_WARNING:
            print(
                f"sweep: warning: {job['name']}: {100 * seen['overflow']:.1f}% of rows have more than "
                f"data.max_patches={config.data.max_patches} patches (up to {seen['max_patches_seen']}); the pipeline "
                "truncates them (their tail leaves the loss) and the realised mean patch size grows. Raise "
                "sweep.max_patches_factor and plan again to avoid it.",
                file=log,
                flush=True,
            )


def run_sweep(
    sweep_dir: paths.PathLike,
    *,
    only: Sequence[str] | None = None,
    stages_only: bool = False,
    keep_going: bool = False,
    log: TextIO = sys.stdout,
) -> int:
    """Runs the shared stages, then every selected unfinished job in plan order; returns an exit status."""
    sweep_dir = paths.resolve(sweep_dir)
    plan = load_plan(sweep_dir)
    jobs = select_jobs(plan, only)
    run_stages(sweep_dir, plan, jobs, log)
    if stages_only:
        print(f"sweep: shared stages complete in {sweep_dir}", file=log, flush=True)
        return 0
    failed = []
    with _Forward() as forward:
        for index, job in enumerate(jobs, 1):
            if forward.requested:  # SIGTERM between two jobs: start nothing new
                return PREEMPTED
            done = read_done(sweep_dir, job)
            if done is not None:
                print(
                    f"sweep: [{index}/{len(jobs)}] {job['name']}: done (validation bpb {done['validation_bpb']})",
                    file=log,
                    flush=True,
                )
                continue
            if not job_file(sweep_dir, job["name"]).is_file():
                raise PlanError(
                    f"{job_file(sweep_dir, job['name'])}: missing; rewrite the plan (python -m bltjax.sweep plan)"
                )
            print(f"sweep: [{index}/{len(jobs)}] {job['name']}", file=log, flush=True)
            rc = run_job(sweep_dir, job, log, forward)
            if forward.requested or rc == PREEMPTED:
                print(
                    f"sweep: pre-empted during {job['name']}; relaunch the same command to continue",
                    file=log,
                    flush=True,
                )
                return PREEMPTED
            if rc != 0:
                logfile = run_dir(sweep_dir, job["name"]) / LOG_FILE
                how = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
                print(
                    f"sweep: {job['name']} failed ({how}); its output is in {logfile}. Relaunch the same command "
                    "to resume it from its last checkpoint.",
                    file=log,
                    flush=True,
                )
                failed.append(job["name"])
                if not keep_going:
                    return 1
    if failed:
        print(f"sweep: {len(failed)} job(s) failed: {', '.join(failed)}", file=log, flush=True)
        return 1
    print(f"sweep: all {len(jobs)} job(s) done; python -m bltjax.sweep report {sweep_dir}", file=log, flush=True)
    return 0


def launch_commands(
    sweep_dir: str,
    *,
    only: Sequence[str] | None = None,
    launcher: str = "local",
    launcher_args: Sequence[str] = (),
) -> list[str]:
    """Shell lines: the shared stages, then one launch command per selected job (paths as given)."""
    plan = load_plan(sweep_dir)
    jobs = select_jobs(plan, only)
    try:
        job_config = str(JOB_CONFIG.relative_to(pathlib.Path.cwd().resolve()))
    except ValueError:
        job_config = str(JOB_CONFIG)
    stage = ["python", "-m", "bltjax.sweep", "run", str(sweep_dir), "--stages-only"]
    lines = [
        "# shared stages (prepared data; entropy model and sidecars for entropy runs): once, before the jobs",
        launchers.shell_line(stage),
        f"# {len(jobs)} job(s), {launcher}",
    ]
    for job in jobs:
        command = train_command(sweep_dir, job["name"], job_config=job_config)
        lines.append(launchers.shell_line(launchers.wrap(launcher, job["name"], command, launcher_args)))
    return lines
