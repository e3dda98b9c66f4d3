"""Runs N processes of one command on this machine, each with M fake CPU devices.

    bash launch/local.sh --processes 2 --devices-per-process 2 -- python -m bltjax.train ...

This is how multi-host behaviour is exercised without a pod: the processes join through
jax's coordination service on 127.0.0.1 and run their collectives over CPU (gloo), exactly as
the hosts of a pod do over the network. Each process gets the environment that
bltjax/runtime/distributed.py reads (BLTJAX_COORDINATOR, BLTJAX_NUM_PROCESSES, BLTJAX_PROCESS_ID) plus
JAX_PLATFORMS=cpu and JAX_NUM_CPU_DEVICES=M, so any bltjax command joins without extra flags.

The launcher is a small supervisor (standard library only, so it needs no virtualenv):

* every output line is prefixed with its process index, ``[1] ...``, and also appended to
  ``LOG_DIR/process_<i>.log`` with --log-dir;
* SIGINT / SIGTERM to the launcher is forwarded to every process as SIGTERM (bltjax.train then
  saves a checkpoint and exits 143: a pre-emption rehearsal); the processes run in their own
  session, so Ctrl-C reaches them only this way, and they get SIGTERM if the launcher dies;
* when a process fails, the others are given --grace seconds to stop by themselves (they do:
  jax aborts a process that loses a peer within the heartbeat timeout), then terminated; a
  summary names each process's fate, and the launcher exits with the first failure's status.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

PROG = "launch/local.sh"
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
    """A TCP port nobody listens on right now (the coordinator binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        split = argv.index("--")
        own, command = argv[:split], argv[split + 1 :]
    else:
        own, command = argv, []
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, required=True, help="how many processes (simulated hosts)")
    parser.add_argument("--devices-per-process", type=int, required=True, help="fake CPU devices per process")
    parser.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--heartbeat-timeout", type=int, help="seconds before a silent peer counts as dead")
    parser.add_argument("--init-timeout", type=int, help="seconds every process may take to join")
    parser.add_argument("--log-dir", help="also write each process's output to LOG_DIR/process_<i>.log")
    parser.add_argument("--grace", type=float, help="after a failure, seconds the others get to stop by themselves")
    parser.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    args = parser.parse_args(own)
    if not command:
        parser.error("expected the command after --, e.g. -- python -m bltjax.train --config ...")
    if args.processes < 1 or args.devices_per_process < 1:
        parser.error("--processes and --devices-per-process must be positive")
    return args, command


def process_env(args: argparse.Namespace, index: int, port: int, base: dict[str, str]) -> dict[str, str]:
    """The variables that make process `index` one of the simulated hosts (only what changes)."""
    kept = [f for f in base.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
    env = {
        "BLTJAX_COORDINATOR": f"127.0.0.1:{port}",
        "BLTJAX_NUM_PROCESSES": str(args.processes),
        "BLTJAX_PROCESS_ID": str(index),
        "JAX_PLATFORMS": "cpu",
        "JAX_NUM_CPU_DEVICES": str(args.devices_per_process),
        "XLA_FLAGS": " ".join([*kept, f"{DEVICE_COUNT_FLAG}={args.devices_per_process}"]),
    }
    if args.heartbeat_timeout:
        env["BLTJAX_HEARTBEAT_TIMEOUT"] = str(args.heartbeat_timeout)
    if args.init_timeout:
        env["BLTJAX_INIT_TIMEOUT"] = str(args.init_timeout)
    return env


def dry_run(args: argparse.Namespace, command: list[str], port: int) -> str:
    total = args.processes * args.devices_per_process
    lines = [
        f"# {PROG}: {args.processes} processes x {args.devices_per_process} fake CPU devices = {total} devices "
        f"on this machine, coordinator 127.0.0.1:{port}",
    ]
    for index in range(args.processes):
        env = process_env(args, index, port, dict(os.environ))
        assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        redirect = f" > {shlex.quote(os.path.join(args.log_dir, f'process_{index}.log'))} 2>&1" if args.log_dir else ""
        lines.append(f"PYTHONUNBUFFERED=1 {assignments} {shlex.join(command)}{redirect} &")
    lines.append("wait")
    return "\n".join(lines) + "\n"


def describe_status(code: int) -> str:
    """A process's fate in words, with what bltjax and jax mean by the usual ones."""
    if code in (-signal.SIGABRT, 128 + signal.SIGABRT):
        return "was killed by SIGABRT (jax stops a process that lost a peer or its coordinator)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    if code == 143:
        return "exited with status 143 (stopped after SIGTERM; bltjax.train saves a checkpoint first)"
    return f"exited with status {code}"


def _parent_death_signal():
    """Linux: a function that makes the calling process get SIGTERM when the launcher dies.

    Resolved here, in the launcher, so that the forked child only calls it (no library loading
    between fork and exec). Elsewhere: None, and a dying launcher leaves its processes running.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM)


def shell_status(code: int) -> int:
    return 128 - code if code < 0 else code


class Supervisor:
    """Starts the processes, prefixes their output, and decides when the run is over."""

    def __init__(self, args: argparse.Namespace, command: list[str], port: int):
        self.args, self.command, self.port = args, command, port
        self.procs: list[subprocess.Popen] = []
        self.lock = threading.RLock()  # re-entrant: the signal handler prints from the main thread
        self.readers: list[threading.Thread] = []
        self.terminated_by_us: set[int] = set()
        self.exits: list[int] = []  # process indices in the order they exited
        self.on_parent_death = _parent_death_signal()

    def say(self, text: str) -> None:
        with self.lock:
            print(f"{PROG}: {text}", file=sys.stderr, flush=True)

    def _pump(self, index: int, stream) -> None:
        log = None
        if self.args.log_dir:
            os.makedirs(self.args.log_dir, exist_ok=True)
            log = open(os.path.join(self.args.log_dir, f"process_{index}.log"), "a", encoding="utf-8")
        for line in iter(stream.readline, ""):
            with self.lock:
                sys.stdout.write(f"[{index}] {line}")
                sys.stdout.flush()
            if log is not None:
                log.write(line)
                log.flush()
        if log is not None:
            log.close()

    def start(self) -> None:
        base = dict(os.environ)
        for index in range(self.args.processes):
            env = {**base, **process_env(self.args, index, self.port, base), "PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen(
                self.command,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                start_new_session=True,  # Ctrl-C reaches the launcher only, which turns it into SIGTERM
                preexec_fn=self.on_parent_death,
            )
            self.procs.append(proc)
            reader = threading.Thread(target=self._pump, args=(index, proc.stdout), daemon=True)
            reader.start()
            self.readers.append(reader)
            threading.Thread(target=self._reap, args=(index, proc), daemon=True).start()
        pids = ", ".join(f"{i}: pid {p.pid}" for i, p in enumerate(self.procs))
        n = self.args.processes
        self.say(f"{n} process{'es' if n != 1 else ''} x {self.args.devices_per_process} CPU devices, coordinator "
                 f"127.0.0.1:{self.port} ({pids})")  # fmt: skip

    def _reap(self, index: int, proc: subprocess.Popen) -> None:
        proc.wait()
        with self.lock:
            self.exits.append(index)

    def forward(self, signum: int, frame) -> None:
        self.say(f"received {signal.Signals(signum).name}: sending SIGTERM to every process")
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def _stop(self, index: int, proc: subprocess.Popen) -> None:
        self.terminated_by_us.add(index)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()

    def wait(self) -> int:
        grace = self.args.grace
        if grace is None:
            grace = (self.args.heartbeat_timeout or 100) + 30.0
        first_failure: tuple[float, int] | None = None
        while True:
            with self.lock:
                exits = list(self.exits)
            if first_failure is None:
                failed = [i for i in exits if self.procs[i].returncode != 0]
                if failed:
                    first_failure = (time.monotonic(), failed[0])
                    self.say(f"process {failed[0]} {describe_status(self.procs[failed[0]].returncode)}; "
                             f"waiting up to {grace:g} s for the others to stop")  # fmt: skip
            if len(exits) == len(self.procs):
                break
            if first_failure is not None and time.monotonic() - first_failure[0] > grace:
                for index, proc in enumerate(self.procs):
                    if proc.poll() is None:
                        self.say(f"process {index} still runs {grace:g} s after the failure: terminating it")
                        self._stop(index, proc)
            time.sleep(0.05)
        for reader in self.readers:
            reader.join(timeout=5)
        codes = [p.returncode for p in self.procs]
        if all(code == 0 for code in codes):
            self.say("every process exited with status 0")
            return 0
        for index, code in enumerate(codes):
            fate = "was terminated by the launcher" if index in self.terminated_by_us else describe_status(code)
            self.say(f"process {index} {fate}")
        return shell_status(codes[first_failure[1]])


def main(argv: list[str]) -> int:
    args, command = parse_args(argv)
    port = args.port or free_port()
    if args.dry_run:
        sys.stdout.write(dry_run(args, command, port))
        return 0
    supervisor = Supervisor(args, command, port)
    signal.signal(signal.SIGINT, supervisor.forward)
    signal.signal(signal.SIGTERM, supervisor.forward)
    supervisor.start()
    return supervisor.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
