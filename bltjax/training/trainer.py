"""The training loop: one `Trainer` runs one workdir to `config.train.steps`, resumably.

  from bltjax.training.trainer import train
  result = train(config, "runs/tiny")          # TrainResult(final_step, preempted, validation_bpb, ...)

`python -m bltjax.train` is the command around it. The workdir fully determines the run.
Relaunching continues from the latest complete checkpoint, bit for bit: the batch of step s is
a pure function of the data, the seed and s, and the checkpoint holds the whole training state
plus the grain iterator state. What lands in the workdir:

    config.json        the resolved config of the first launch (a relaunch must agree with it)
    checkpoints/<s>/   orbax steps (bltjax/checkpoints.py)
    metrics.jsonl      one line per logged step / evaluation (train and validation)
    tensorboard/       event files: tensorboard --logdir WORKDIR/tensorboard
    profile/           with config.train.profile_steps: a jax.profiler trace (training/profiling.py)
    wandb_run_id       with the wandb backend (config.metrics.backends): the W&B run of this workdir
    shardings.txt      where every parameter lives on the mesh

Order of work, so that bad input fails before any device work: validate the config and the
workdir, open and verify the data, then build the mesh and the sharded state.

SIGTERM (pre-emption) is caught: the loop finishes its current step, saves a checkpoint, waits
for it to be on disk and returns with `preempted` set. A NaN or Inf loss raises
`TrainingDivergedError` and saves nothing after the last good checkpoint. Metrics are fetched
one step late, so the host never waits for the step it just dispatched. Every checkpoint and
evaluation consumes the pending metrics first, so no state is saved or evaluated unchecked.

Multi-host: every process runs the same loop; process 0 alone prints and writes the workdir's
logs, and every process writes its own shards of each checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TextIO

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from bltjax.checkpoints import Checkpointer
from bltjax.config import ConfigError, validate
from bltjax.data import pipeline, token_pipeline
from bltjax.models import flops
from bltjax.models.factory import build_model
from bltjax.runtime import distributed, observability, paths, peaks
from bltjax.runtime.atomic import write_atomic
from bltjax.training import padding, sharding
from bltjax.training.metrics import MetricsWriter, bits_per_byte
from bltjax.training.optimizer import learning_rate_schedule, make_optimizer
from bltjax.training.profiling import PROFILE_DIR, StepProfiler
from bltjax.training.state import TrainState, abstract_state, create_train_state, restore_target, state_placements
from bltjax.training.step import batch_fields, jit_eval_step, jit_train_step, make_eval_step, train_step_of_config
from bltjax.training.token_metrics import bpb_denominator
from bltjax.training.wandb_tracker import require_wandb

# Fields a relaunch may change: where the data lives, how the run is laid out and reported.
RESUMABLE_CHANGES = ("data.path", "data.verify", "mesh.", "train.", "metrics.")
COMPILE_BARRIER_S = 3600  # multi-process: how long the fastest process waits for the others to compile


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or Inf; the message names the step and the last good checkpoint."""


class WorkdirError(ValueError):
    """The workdir holds a run whose config disagrees with this launch."""


# --- workdir and config ---------------------------------------------------------------------


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: list(value) if isinstance(value, tuple) else value}


def config_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Dotted names whose values differ, except the ones a relaunch may change."""
    a, b = _flatten(stored), _flatten(current)
    names = sorted(set(a) | set(b))
    return [n for n in names if a.get(n) != b.get(n) and not n.startswith(RESUMABLE_CHANGES)]


def resolve_workdir_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> ml_collections.ConfigDict:
    """Checks a relaunch against the stored config; takes over fields fixed at the first launch."""
    stored_path = workdir / "config.json"
    if not stored_path.is_file():
        return config
    try:
        stored = json.loads(stored_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise WorkdirError(f"{stored_path}: unreadable ({err}); move the workdir away to start a new run") from err
    if config.model_type == "blt":
        # Decided from the mesh of the first launch; the parameter shapes depend on it.
        config.model.hash_rows_multiple = int(stored.get("model", {}).get("hash_rows_multiple", 1))
    diffs = config_differences(stored, config.to_dict())
    if diffs:
        first = diffs[0]
        raise WorkdirError(
            f"{stored_path}: this launch changes {len(diffs)} field(s) of the run in the workdir, first "
            f"config.{first}: stored {_flatten(stored).get(first)!r}, now {_flatten(config.to_dict()).get(first)!r}. "
            "Use a new --workdir for a different run."
        )
    return config


# --- the loop's helpers ---------------------------------------------------------------------


class PreemptionWatch:
    """Turns SIGTERM into a flag the loop polls; all processes agree on it (multi-host)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> PreemptionWatch:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        logging.warning("SIGTERM received: saving a checkpoint after the current step")
        self.requested = True

    def should_stop(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags_all = multihost_utils.process_allgather(np.array([self.requested]))
        return bool(np.any(flags_all))


def _host_batch_stats(batch: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Bytes and patches of one (process-local) batch, counted on the host for free."""
    stats = {"bytes": padding.real_bytes(batch)}  # packed rows: their BOE padding is no throughput
    if "target_bytes" in batch:  # a token LM: the bytes its tokens cover, and (untimed copies) per token
        stats["bytes"] = stats["token_bytes"] = float(batch["target_bytes"].sum())
        stats["token_count"] = float(batch["tokens"].size)
    if "patch_lengths" in batch:
        lengths = padding.real_patch_lengths(batch)
        stats["patches"] = float(np.count_nonzero(lengths))
        stats["patch_count"] = stats["patches"]  # untimed copies for the mean patch length
        stats["patch_bytes"] = float(lengths.sum())
        stats["patch_max"] = float(lengths.max())
    stats.update(padding.batch_padding(batch))
    return stats


THROUGHPUT_KEYS = ("bytes", "patches")


@dataclasses.dataclass
class _Window:
    """Host-side sums over the steps since the last log line.

    Throughput counts only `timed` steps: the first step of a launch includes compilation.
    """

    start: float
    steps: int = 0
    timed_steps: int = 0
    paused: float = 0.0  # seconds spent evaluating: not training throughput
    data_wait: float = 0.0  # seconds blocked on the input iterator, within the window's time
    sums: dict[str, float] = dataclasses.field(default_factory=dict)

    def add(self, values: Mapping[str, float], timed: bool = True) -> None:
        self.steps += 1
        self.timed_steps += int(timed)
        for key, value in values.items():
            if key in THROUGHPUT_KEYS and not timed:
                value = 0.0
            if key == "patch_max":
                self.sums[key] = max(self.sums.get(key, 0.0), value)
            else:
                self.sums[key] = self.sums.get(key, 0.0) + value


@dataclasses.dataclass(frozen=True)
class TrainResult:
    final_step: int
    preempted: bool
    validation_bpb: float | None  # of the final step (None if pre-empted before it)
    workdir: epath.Path
    state: TrainState


class Trainer:
    """Everything one run needs, built in the order the module docstring gives; `run` trains."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: str | os.PathLike,
        console: TextIO = sys.stdout,
        devices: Sequence[jax.Device] | None = None,
    ):
        self.workdir = paths.resolve(workdir)  # gs://... stays a URI; a local path becomes absolute
        self.console = console
        validate(config)
        if not config.data.path and not config.data.get("mixture"):
            raise ConfigError("config.data.path: expected a folder written by `python -m bltjax.prepare`, got ''")
        config = token_pipeline.with_bytes_per_token(config)  # a token LM's FLOPs per byte need its tokenizer's
        self.config = resolve_workdir_config(ml_collections.ConfigDict(config.to_dict()), self.workdir)
        validate(self.config)
        cfg = self.config
        if cfg.get("metrics") is not None and "wandb" in observability.parse_backends(cfg.metrics.backends):
            require_wandb()  # a missing optional package fails before the data is read
        self.model_type = cfg.model_type
        process = dict(process_index=jax.process_index(), process_count=jax.process_count())
        self.train_data = pipeline.make_dataset(
            cfg, cfg.data.path, "train", seed=cfg.seed, verify=cfg.data.verify, **process
        )
        # eval_every=0 evaluates the last step only if the data has the split; a corpus of a few
        # large files may have none, and such a run must not need one (eval_data is None then).
        self.eval_data = None
        if cfg.train.eval_every or pipeline.has_data_split(cfg, cfg.train.eval_split):
            self.eval_data = pipeline.make_dataset(
                cfg, cfg.data.path, cfg.train.eval_split, seed=cfg.seed, verify=cfg.data.verify, **process
            )

        self.mesh = sharding.make_mesh(cfg, devices)
        sharding.check_batch(cfg, self.mesh)
        first_launch = not (self.workdir / "config.json").is_file()
        if cfg.model_type == "blt" and first_launch and cfg.model.hash_rows_multiple == 1:
            cfg.model.hash_rows_multiple = sharding.hash_rows_multiple(self.mesh)
        self.model = build_model(cfg)
        self.schedule = learning_rate_schedule(cfg)
        self.optimizer = make_optimizer(cfg)
        abstract = abstract_state(self.model, self.optimizer, cfg)
        self.placements = state_placements(abstract, self.mesh)
        self.state_shardings = sharding.shardings_of(self.placements, self.mesh)
        self.abstract = abstract
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        step_fn = train_step_of_config(cfg, self.model, self.optimizer, self.schedule, self.batch_sharding)
        self.train_step = jit_train_step(step_fn, self.state_shardings, self.batch_sharding)
        eval_fn = make_eval_step(
            self.model,
            model_type=cfg.model_type,
            batch_sharding=self.batch_sharding,
            activation_rules=sharding.activation_rules(cfg.mesh.get("sequence")),
        )
        self.eval_step = jit_eval_step(eval_fn, self.state_shardings.params, self.batch_sharding)
        self.checkpointer = Checkpointer(
            self.workdir / "checkpoints",
            keep=cfg.train.keep,
            keep_every=cfg.train.keep_every,
            async_save=cfg.train.async_checkpoint,
        )
        self.fields = batch_fields(cfg.model_type)
        self.padding = padding.PaddingMeter(cfg)
        self.peak_flops, self.peak_source = peaks.peak_flops_total(
            list(self.mesh.devices.flat), cfg.model.get("dtype", "float32")
        )

    # -- pieces ---------------------------------------------------------------------------

    def _write_workdir_files(self) -> None:
        if jax.process_index() != 0:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "config.json"
        if not config_path.is_file():
            write_atomic(config_path, (self.config.to_json(indent=2) + "\n").encode())
        table = self._mesh_rules() + "\n\nparameters and optimizer state:\n"
        table += sharding.format_placements(self.placements.params, self.mesh) + "\n"
        write_atomic(self.workdir / "shardings.txt", table.encode())

    def _meta(self, step: int) -> dict[str, Any]:
        return {
            "step": step,
            "data_step": step,
            padding.META_KEY: self.padding.state(),
            "config": json.loads(self.config.to_json()),
            "mesh": {k: int(v) for k, v in self.mesh.shape.items()},
            "process_count": jax.process_count(),
            "jax_version": jax.__version__,
            "time": time.time(),
        }

    def _global(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        return pipeline.global_batch({k: local[k] for k in self.fields}, self.batch_sharding)

    def _mesh_rules(self) -> str:
        return sharding.format_rules(self.mesh, slices=sharding.mesh_slices(self.mesh, self.config))

    def evaluate(self, params: Any) -> dict[str, float]:
        """Bits-per-byte on `eval_batches` fixed batches of the held-out split (same every time)."""
        totals: dict[str, float] = {}
        for index in range(self.config.train.eval_batches):
            stats = jax.device_get(self.eval_step(params, self._global(pipeline.batch_at_step(self.eval_data, index))))
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + float(value)
        return {
            "loss": totals["nats_sum"] / max(totals["n_targets"], 1.0),
            "bpb": bits_per_byte(totals["nats_sum"], bpb_denominator(totals)),
            "bpb_bytes": bits_per_byte(totals["nats_bytes_sum"], totals["n_bytes"]),
            "targets": totals["n_targets"],
        }

    def _flops_per_byte(self, mean_patch: float | None, bytes_per_token: float | None = None) -> float:
        return flops.analytic_flops_per_byte(
            self.config, mean_patch_size=mean_patch, bytes_per_token=bytes_per_token
        ).train

    def _log_window(self, writer: MetricsWriter, step: int, window: _Window, now: float) -> None:
        s, elapsed = window.sums, max(now - window.start - window.paused, 1e-9)
        processes = jax.process_count()
        values = {
            "loss": s["nats_sum"] / max(s["n_targets"], 1.0),
            "bpb": bits_per_byte(s["nats_sum"], bpb_denominator(s)),
            "bpb_bytes": bits_per_byte(s["nats_bytes_sum"], s["n_bytes"]),
            "learning_rate": s["learning_rate"] / window.steps,
            "grad_norm": s["grad_norm"] / window.steps,
            "bytes_per_sec": s["bytes"] * processes / elapsed,
        }
        values.update(step_times(elapsed, window.data_wait, window.timed_steps))
        mean_patch = None
        if "patches" in s:
            mean_patch = s["patch_bytes"] / max(s["patch_count"], 1.0)
            values.update(
                patches_per_sec=s["patches"] * processes / elapsed,
                mean_patch_size=mean_patch,
                max_patch_length=s["patch_max"],
            )
        bytes_per_token = None
        if "token_count" in s:  # a token LM: the FLOPs per byte of the tokens seen
            bytes_per_token = values["bytes_per_token"] = s["token_bytes"] / max(s["token_count"], 1.0)
        flops_per_byte = self._flops_per_byte(mean_patch, bytes_per_token)
        values["flops_per_byte"] = flops_per_byte
        values["flops_per_sec"] = flops_per_byte * values["bytes_per_sec"]
        values["mfu"] = peaks.mfu(flops_per_byte, values["bytes_per_sec"], self.peak_flops)
        values.update(self.padding.values(s, step))
        writer.write(step, values, split="train")

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg = self.config
        self._write_workdir_files()
        print(self._mesh_rules(), file=self.console, flush=True)
        if self.eval_data is None:
            print(f"no {cfg.train.eval_split!r} split in {cfg.data.path} and config.train.eval_every=0: no validation",
                  file=self.console, flush=True)  # fmt: skip
        iterator = pipeline.make_iterator(self.train_data, num_threads=cfg.train.data_threads)
        start = self.checkpointer.latest_complete_step()
        if start is None:
            state, _ = create_train_state(self.model, self.optimizer, cfg, self.mesh, jax.random.key(cfg.seed))
            start = 0
            print(f"started a new run in {self.workdir}", file=self.console, flush=True)
        else:
            target = restore_target(self.abstract, self.state_shardings)
            state, meta = self.checkpointer.restore(start, target, iterator)
            if int(meta["data_step"]) != start or int(state.step) != start:
                raise WorkdirError(f"{self.checkpointer.directory / str(start)}: step {start} holds data step "
                                   f"{meta['data_step']} and state step {int(state.step)}")  # fmt: skip
            self.padding.restore(meta, start, lambda s: pipeline.batch_at_step(self.train_data, s))
            print(f"resumed {self.workdir} at step {start}", file=self.console, flush=True)
        writer = MetricsWriter.from_config(
            cfg, self.workdir, process_index=jax.process_index(), console=self.console, total_steps=cfg.train.steps
        )
        writer.truncate_after(start)
        writer.write_config(json.loads(self.config.to_json()), step=start)  # every backend, once per launch
        profiler = StepProfiler(cfg.train.get("profile_steps"), self.workdir / PROFILE_DIR, console=self.console)
        try:
            return self._loop(state, iterator, start, writer, profiler)
        finally:  # also on divergence or an error: stop a trace, finish in-flight saves, flush the logs
            profiler.close()
            writer.close()
            self.checkpointer.close()

    def _check_finite(self, step: int, metrics: Mapping[str, float]) -> None:
        if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
            self.checkpointer.wait()  # earlier (finite) steps still being written complete first
            last = self.checkpointer.latest_complete_step()
            raise TrainingDivergedError(
                f"step {step}: loss {metrics['loss']} / gradient norm {metrics['grad_norm']} is not finite; stopped "
                f"without saving. The last good checkpoint is step {last} in {self.checkpointer.directory}. Lower "
                "config.optimizer.learning_rate or check the data."
            )

    def _save(self, step: int, state: TrainState, iterator: Any, wait: bool = False) -> None:
        if self.checkpointer.save(step, state, iterator, self._meta(step)):
            print(f"checkpoint {step} -> {self.checkpointer.directory / str(step)}", file=self.console, flush=True)
        if wait:
            self.checkpointer.wait()

    def _compile_together(self, state: TrainState, train_too: bool) -> None:
        """Multi-process: compile the step programs on every process, then start together.

        On CPU a process that compiles while another loads the program from the persistent
        cache can reach the first collective too late (see `distributed.compile_then_meet`).
        """
        if jax.process_count() == 1:
            return
        if train_too:
            batch = self._global(pipeline.batch_at_step(self.train_data, 0))
            distributed.compile_then_meet("train step", self.train_step, state, batch, timeout_s=COMPILE_BARRIER_S)
        if self.eval_data is not None:
            batch = self._global(pipeline.batch_at_step(self.eval_data, 0))
            distributed.compile_then_meet("eval step", self.eval_step, state.params, batch, timeout_s=COMPILE_BARRIER_S)

    def _loop(
        self, state: TrainState, iterator: Iterator, start: int, writer: MetricsWriter, profiler: StepProfiler
    ) -> TrainResult:
        cfg = self.config.train
        total = cfg.steps
        self._compile_together(state, train_too=start < total)
        window = _Window(start=time.time())
        pending: tuple[int, dict[str, jax.Array], dict[str, float]] | None = None
        validation_bpb = None
        step = start

        def consume(entry: tuple[int, dict[str, jax.Array], dict[str, float]]) -> None:
            done_step, device_metrics, host_stats = entry
            fetched = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
            self._check_finite(done_step, fetched)
            first_of_launch = done_step == start + 1
            window.add({**fetched, **host_stats}, timed=not first_of_launch)
            self.padding.add(host_stats)
            if first_of_launch:
                window.start, window.data_wait = time.time(), 0.0
            if done_step % cfg.log_every == 0 or done_step == total:
                self._log_window(writer, done_step, window, time.time())
                window.__init__(start=time.time())

        with PreemptionWatch() as watch:
            while step < total:
                if watch.should_stop():
                    if pending is not None:
                        consume(pending)
                        pending = None
                    self._save(step, state, iterator, wait=True)
                    print(f"pre-empted: saved step {step}; relaunch the same command to continue",
                          file=self.console, flush=True)  # fmt: skip
                    return TrainResult(step, True, validation_bpb, self.workdir, state)
                waited = time.time()
                local = next(iterator)
                window.data_wait += time.time() - waited
                host_stats = _host_batch_stats(local)
                profiler.before_step(step + 1)
                with profiler.annotation(step + 1):
                    state, device_metrics = self.train_step(state, self._global(local))
                step += 1
                profiler.after_step(step, (state, device_metrics))
                if pending is not None:
                    consume(pending)  # the previous step's metrics: this one is still running
                pending = (step, device_metrics, host_stats)
                checkpoint_due = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == total
                eval_due = (cfg.eval_every and step % cfg.eval_every == 0) or step == total
                eval_due = eval_due and self.eval_data is not None
                if checkpoint_due or eval_due:
                    consume(pending)  # never save or evaluate a state whose loss was not checked
                    pending = None
                if eval_due:
                    eval_start = time.time()
                    result = self.evaluate(state.params)
                    validation_bpb = result["bpb"]
                    writer.write(step, result, split="validation")
                    window.paused += time.time() - eval_start
                if checkpoint_due:
                    self._save(step, state, iterator, wait=step == total)
        if pending is not None:
            consume(pending)
        if validation_bpb is None and self.eval_data is not None:  # relaunched after the last step: report
            validation_bpb = self.evaluate(state.params)["bpb"]
        return TrainResult(step, False, validation_bpb, self.workdir, state)


def step_times(elapsed: float, data_wait: float, timed_steps: int) -> dict[str, float]:
    """Seconds per step, split into waiting for the input pipeline and the rest (compute, dispatch, saves).

    Steps run asynchronously, so the loop's wall time per step is what the device and the input
    pipeline allow together; the time blocked in ``next(iterator)`` is the input's share of it.
    """
    steps = max(timed_steps, 1)
    step_s = elapsed / steps
    wait_s = min(data_wait / steps, step_s)
    return {
        "time/step_s": step_s,
        "time/data_wait_s": wait_s,
        "time/compute_s": step_s - wait_s,
        "time/data_wait_fraction": wait_s / step_s if step_s > 0 else 0.0,
    }


def train(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    console: TextIO = sys.stdout,
    devices: Sequence[jax.Device] | None = None,
) -> TrainResult:
    """Builds a `Trainer` and runs it to `config.train.steps` (or until SIGTERM)."""
    return Trainer(config, workdir, console, devices).run()
