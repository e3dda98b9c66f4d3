"""Joins the processes of a multi-host run, logs the topology, and says which process speaks.

JAX's multi-controller runtime is the distributed engine: every host runs the same program,
`jax.distributed.initialize()` joins them, and the mesh then spans every device of every host.
This module only decides *how* to join, from the command line or the environment, first match
wins:

    1. flags     --coordinator HOST:PORT --num-processes N --process-id I (all three)
    2. env       BLTJAX_COORDINATOR / BLTJAX_NUM_PROCESSES / BLTJAX_PROCESS_ID (all three;
                 launch/local.sh sets them, so any bltjax command joins without flags)
    3. off       BLTJAX_DISTRIBUTED=off: one process, whatever the environment says
    4. cluster   BLTJAX_DISTRIBUTED=auto (launch/tpu_vm.sh, launch/xpk.sh): jax detects the
                 TPU pod (GCE metadata), the GKE job (TPU_WORKER_HOSTNAMES), SLURM or Open MPI
    5. slurm     inside `srun` with more than one task (SLURM_NTASKS > 1, SLURM_PROCID set)
    6. cluster   TPU_WORKER_HOSTNAMES lists several hosts (a multi-host GKE TPU job)
    7. single    nothing to join

Failure behaviour, which the launchers and the tests rely on:

* A process that loses a peer stops instead of hanging: jax's coordination service aborts
  every survivor (status 134, "Terminating process because the JAX distributed service
  detected fatal errors ... another task died") within the heartbeat timeout
  (BLTJAX_HEARTBEAT_TIMEOUT seconds, default 100; the coordinator's death is noticed at once).
* A process that cannot reach the coordinator fails with a `DistributedError` naming the
  address after BLTJAX_INIT_TIMEOUT seconds (default 300), rather than jax's opaque abort.

Process-aware output: only process 0 prints progress and writes logs, metrics, TensorBoard,
`config.json` and evaluation JSON (`is_primary`, `primary_console`); every process writes its
own shards of each checkpoint (orbax) and reads its own rows of each batch (the data pipeline
shards by `jax.process_index()`). The workdir and the data must therefore be on a filesystem
every host sees (NFS / Filestore / Lustre, or a gcsfuse mount).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import itertools
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import jax

ENV_COORDINATOR = "BLTJAX_COORDINATOR"
ENV_NUM_PROCESSES = "BLTJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "BLTJAX_PROCESS_ID"
ENV_MODE = "BLTJAX_DISTRIBUTED"
ENV_HEARTBEAT = "BLTJAX_HEARTBEAT_TIMEOUT"
ENV_INIT_TIMEOUT = "BLTJAX_INIT_TIMEOUT"
MODES = ("", "auto", "off")
DEFAULT_HEARTBEAT_S = 100  # jax's default: a pod step can legitimately stall for a minute
DEFAULT_INIT_TIMEOUT_S = 300  # all hosts of a pod must start within this
FLAG_NAMES = ("coordinator", "num_processes", "process_id")


class DistributedError(RuntimeError):
    """The processes cannot be joined; the message names the flag, variable or address."""


@dataclasses.dataclass(frozen=True)
class JoinPlan:
    """How this process joins the others (see the module docstring for `method`)."""

    method: str  # "single", "flags", "env", "slurm" or "cluster"
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_S
    init_timeout_s: int = DEFAULT_INIT_TIMEOUT_S

    @property
    def joins(self) -> bool:
        return self.method != "single"


@dataclasses.dataclass(frozen=True)
class Topology:
    """What the joined runtime looks like from this process."""

    method: str
    process_index: int
    process_count: int
    local_devices: int
    global_devices: int
    devices_per_process: tuple[int, ...]
    platform: str
    device_kind: str
    coordinator: str | None
    heartbeat_timeout_s: int | None

    def summary(self) -> str:
        """One line for the console, e.g. for 2 processes of 2 CPU devices each."""
        counts = set(self.devices_per_process)
        if len(counts) == 1:
            layout = f"{self.process_count} process{'es' if self.process_count > 1 else ''} x {counts.pop()}"
        else:
            layout = f"{self.process_count} processes with {list(self.devices_per_process)}"
        line = f"topology: {layout} {self.device_kind} devices = {self.global_devices} {self.platform} devices"
        if self.process_count > 1:
            line += f"; joined via {self.method}"
            if self.coordinator:
                line += f" (coordinator {self.coordinator})"
            if self.heartbeat_timeout_s is not None:
                line += f"; a process that loses a peer stops within {self.heartbeat_timeout_s} s"
        return line


# --- deciding how to join -------------------------------------------------------------------


def _positive_int(value: str | int | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise DistributedError(f"{name}: expected a positive integer, got {value!r}") from None
    if number < 1:
        raise DistributedError(f"{name}: expected a positive integer, got {value!r}")
    return number


def _check_triple(coordinator: str | None, num_processes: int | None, process_id: int | None, names: Sequence[str]):
    given = {n: v for n, v in zip(names, (coordinator, num_processes, process_id), strict=True) if v is not None}
    if len(given) != 3:
        missing = [n for n in names if n not in given]
        raise DistributedError(
            f"{', '.join(given)} given without {', '.join(missing)}: a multi-process run needs all of "
            f"{', '.join(names)}"
        )
    host, _, port = str(coordinator).rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"{names[0]}: expected HOST:PORT of process 0, got {coordinator!r}")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise DistributedError(
            f"{names[2]}: expected an integer in [0, {names[1]}={num_processes}), got {process_id!r}"
        )


def plan_join(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> JoinPlan:
    """Decides how to join (module docstring order) without touching jax; raises DistributedError."""
    env = os.environ if environ is None else environ
    heartbeat = _positive_int(env.get(ENV_HEARTBEAT), ENV_HEARTBEAT) or DEFAULT_HEARTBEAT_S
    init_timeout = _positive_int(env.get(ENV_INIT_TIMEOUT), ENV_INIT_TIMEOUT) or DEFAULT_INIT_TIMEOUT_S
    timeouts = dict(heartbeat_timeout_s=heartbeat, init_timeout_s=init_timeout)
    mode = env.get(ENV_MODE, "").strip().lower()
    if mode not in MODES:
        raise DistributedError(f"{ENV_MODE}: expected one of {[m for m in MODES if m]} or unset, got {mode!r}")

    if (coordinator, num_processes, process_id) != (None, None, None):
        _check_triple(coordinator, num_processes, process_id, ("--coordinator", "--num-processes", "--process-id"))
        method = "flags"
    elif any(env.get(name) for name in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)):
        names = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
        coordinator = env.get(ENV_COORDINATOR) or None
        num_processes = _positive_int(env.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES)
        raw_id = env.get(ENV_PROCESS_ID)
        if raw_id not in (None, "") and not str(raw_id).isdigit():
            raise DistributedError(f"{ENV_PROCESS_ID}: expected a non-negative integer, got {raw_id!r}")
        process_id = None if raw_id in (None, "") else int(raw_id)
        _check_triple(coordinator, num_processes, process_id, names)
        method = "env"
    elif mode == "off":
        return JoinPlan("single", **timeouts)
    elif mode == "auto":
        return JoinPlan("cluster", **timeouts)
    elif "SLURM_PROCID" in env and "SLURM_STEP_NODELIST" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return JoinPlan("slurm", **timeouts)
    elif len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
        return JoinPlan("cluster", **timeouts)
    else:
        return JoinPlan("single", **timeouts)
    if num_processes == 1:
        return JoinPlan("single", **timeouts)  # nothing to join
    return JoinPlan(method, coordinator, num_processes, process_id, **timeouts)


# --- joining --------------------------------------------------------------------------------

_joined: JoinPlan | None = None


def _wait_for_coordinator(plan: JoinPlan) -> None:
    """Probes process 0's port until it answers, so an unreachable coordinator is a clear error.

    (jax itself aborts the whole process with a DEADLINE_EXCEEDED that blames "another task".)
    """
    host, _, port = str(plan.coordinator).rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + plan.init_timeout_s
    last_error: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, int(port)), timeout=min(5.0, plan.init_timeout_s)):
                return
        except OSError as err:
            last_error = err
            time.sleep(0.2)
    raise DistributedError(
        f"process {plan.process_id}/{plan.num_processes}: nothing answered at the coordinator {plan.coordinator} "
        f"within {plan.init_timeout_s} s ({last_error}). Process 0 serves it: start process 0, or fix the address "
        f"(--coordinator / {ENV_COORDINATOR}); {ENV_INIT_TIMEOUT} sets the wait"
    )


def topology(plan: JoinPlan | None = None) -> Topology:
    """The topology as this process sees it (call after `initialize`)."""
    plan = plan or _joined or JoinPlan("single")
    devices = jax.devices()
    per_process = collections.Counter(d.process_index for d in devices)
    return Topology(
        method=plan.method,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_devices=jax.local_device_count(),
        global_devices=len(devices),
        devices_per_process=tuple(per_process[i] for i in sorted(per_process)),
        platform=devices[0].platform,
        device_kind=devices[0].device_kind,
        coordinator=plan.coordinator,
        heartbeat_timeout_s=plan.heartbeat_timeout_s if plan.joins else None,
    )


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> Topology:
    """Joins the other processes (if any) before any device work; returns the topology.

    Must run before anything touches a jax backend. Calling it again after a successful join is
    a no-op that returns the topology.
    """
    global _joined
    plan = plan_join(coordinator, num_processes, process_id, environ=environ)
    if _joined is not None or not plan.joins:
        return topology(_joined or plan)
    if plan.coordinator is not None and plan.process_id != 0:
        _wait_for_coordinator(plan)
    try:
        jax.distributed.initialize(
            coordinator_address=plan.coordinator,
            num_processes=plan.num_processes,
            process_id=plan.process_id,
            initialization_timeout=plan.init_timeout_s,
            heartbeat_timeout_seconds=plan.heartbeat_timeout_s,
        )
    except (RuntimeError, ValueError) as err:
        raise DistributedError(f"joining via {plan.method} failed: {err}") from err
    _joined = plan
    return topology(plan)


_barriers = itertools.count()


def barrier(name: str, timeout_s: int = DEFAULT_INIT_TIMEOUT_S) -> None:
    """Every process waits here, through the coordination service (no device collective).

    Why not `multihost_utils.sync_global_devices`: that is itself a device collective, and on
    CPU (gloo) the first use of a collective gives the processes only 30 s to meet, which a
    process compiling for longer than that misses. Every process must pass the same barriers
    in the same order (each gets a sequence number).
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed  # the runtime's client; no public handle

    client = jax_distributed.global_state.client
    if client is None:
        raise DistributedError(f"barrier {name!r}: {jax.process_count()} processes but no distributed client")
    try:
        client.wait_at_barrier(f"bltjax/{next(_barriers)}/{name}", timeout_in_ms=int(timeout_s * 1000))
    except Exception as err:  # jaxlib raises its own XlaRuntimeError subclasses
        raise DistributedError(
            f"process {jax.process_index()}/{jax.process_count()}: not every process reached {name!r} within "
            f"{timeout_s} s ({err})"
        ) from err


def compile_then_meet(name: str, jitted: Any, *args: Any, timeout_s: int = 3600) -> None:
    """Multi-process: compiles `jitted` for `args` now, then waits for every process to have done so.

    Call it before a program's first run. Processes compile at different speeds (one loads the
    program from the persistent cache while another compiles it), and on CPU the first
    collective of a program fails or hangs when they arrive more than 30 s apart (gloo's set-up
    timeout, not configurable in this jax). The later call reuses the compiled program.
    """
    if jax.process_count() == 1:
        return
    jitted.lower(*args).compile()
    barrier(f"compiled {name}", timeout_s)


def is_primary() -> bool:
    """True on the process that writes logs, metrics and summaries (process 0)."""
    return jax.process_index() == 0


class _Sink(io.TextIOBase):
    """A text stream that drops everything (the console of processes other than 0)."""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return len(text)


def primary_console(stream: TextIO | None = None) -> TextIO:
    """`stream` (default stdout) on process 0, a sink elsewhere: N hosts print one log, not N."""
    if is_primary():
        return sys.stdout if stream is None else stream
    return _Sink()


# --- command line ---------------------------------------------------------------------------


def define_flags(flag_values=None) -> None:
    """absl flags --coordinator / --num_processes / --process_id (into ``flag_values``, default absl's FLAGS).

    Dashed spellings are accepted through `bltjax.runtime.cli`.
    """
    from absl import flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    if "coordinator" in flag_values:
        return
    flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0 of a multi-process run.", flag_values=flag_values)
    flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.", flag_values=flag_values)
    flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).", flag_values=flag_values)


def initialize_from_flags(flag_values=None) -> Topology:
    """`initialize` with the values of `define_flags`' flags (unset flags defer to the environment)."""
    from absl import flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    values = [flag_values[name].value for name in FLAG_NAMES]
    return initialize(*values)
