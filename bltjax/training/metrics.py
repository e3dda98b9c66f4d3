"""Training and evaluation metrics: the loss arithmetic of docs/architecture.md §11 and one writer for them.

Bits per byte are computed from summed nats and counts, never from averaged losses, so that
batches, hosts and evaluation shards combine exactly. Two counts are kept (docs/architecture.md §11):

* ``bpb``: every loss-mask target counts as a byte, BOS/EOS included. This is what the
  official training log reports, and the headline number of bltjax's logs.
* ``bpb_bytes``: only targets that are bytes (ids >= `tokenizer.OFFSET`), the paper's
  definition over the bytes of the text.

Use::

    summary = summarize_nll(token_nll(logits, targets), targets, loss_mask)   # inside jit
    with MetricsWriter.from_config(config, workdir, total_steps=steps) as writer:
        writer.write_config(config.to_dict(), step=0)      # every backend, once per launch
        writer.write(step, loss_metrics(summary))          # split="validation" for evaluations
    records = read_jsonl(workdir / METRICS_FILE)

`MetricsWriter` is a clu ``MetricWriter`` that sends each record, only on process 0, to the
backends of ``config.metrics.backends`` and a compact progress line on the console:

* ``jsonl``: an append-only ``metrics.jsonl``, the durable record (one line per step and split,
  plus a ``"split": "config"`` line per launch holding the config): read it with `read_jsonl`.
* ``tensorboard``: event files under ``tensorboard/{split}/``; the config as text and as the
  HParams tab's session (nested keys flattened).
* ``wandb``: one Weights & Biases run per workdir (`bltjax.training.wandb_tracker`), keys
  ``{split}/{name}``, the config as the run's config.

Known keys of the progress line: loss, bpb, bytes_per_sec, patches_per_sec, mean_patch_size,
mfu (a fraction), learning_rate; any missing one is left out. Paths go through
`bltjax.runtime.paths`, so a ``gs://`` workdir works (object stores cannot append: there the JSONL
object is rewritten whole, atomically, per record).
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any

import jax
import jax.numpy as jnp
import numpy as np

from bltjax.runtime import event_files, observability, paths
from bltjax.runtime.atomic import write_atomic
from bltjax.tokenizer import OFFSET

LN2 = math.log(2.0)
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CONFIG_SPLIT = "config"  # the JSONL line of a launch's config
DEFAULT_BACKENDS = ("tensorboard", "jsonl")


# --- loss and bits per byte (pure, jit-friendly) -----------------------------------------------


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-ln softmax(logits)[target] per position, in float32 nats: [B, N, V], [B, N] -> [B, N]."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)
    return -picked[..., 0]


def summarize_nll(nll: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> dict[str, jax.Array]:
    """Sums that bits per byte are made of, over all loss-mask targets and over byte targets only.

    Returns float32 ``nats_sum`` / ``nats_bytes_sum`` and int32 ``n_targets`` / ``n_bytes``;
    add such dicts across batches (`add_summaries`) before dividing.
    """
    mask = loss_mask.astype(bool)
    byte_mask = mask & (targets >= OFFSET)
    nll = nll.astype(jnp.float32)
    return dict(
        nats_sum=jnp.sum(jnp.where(mask, nll, 0.0)),
        n_targets=jnp.sum(mask, dtype=jnp.int32),
        nats_bytes_sum=jnp.sum(jnp.where(byte_mask, nll, 0.0)),
        n_bytes=jnp.sum(byte_mask, dtype=jnp.int32),
    )


def add_summaries(*summaries: Mapping[str, Any]) -> dict[str, Any]:
    """Element-wise sum of `summarize_nll` results (e.g. over evaluation batches)."""
    if not summaries:
        raise ValueError("add_summaries: expected at least one summary")
    return {key: sum(s[key] for s in summaries) for key in summaries[0]}


def bits_per_byte(nats_sum: Any, n: Any) -> Any:
    """bpb = nats / (ln 2 · n); NaN when nothing was counted. Works on Python numbers and jnp arrays."""
    if isinstance(nats_sum, jax.Array) or isinstance(n, jax.Array):
        n = jnp.asarray(n, jnp.float32)
        return jnp.where(n > 0, nats_sum / (LN2 * jnp.maximum(n, 1.0)), jnp.nan)
    n = float(n)
    return float(nats_sum) / (LN2 * n) if n > 0 else math.nan


def loss_metrics(summary: Mapping[str, Any]) -> dict[str, Any]:
    """loss (nats per target, the training loss of docs/architecture.md §11), bpb and bpb_bytes from a summary."""
    return dict(
        loss=summary["nats_sum"] / (summary["n_targets"] + 1e-6),
        bpb=bits_per_byte(summary["nats_sum"], summary["n_targets"]),
        bpb_bytes=bits_per_byte(summary["nats_bytes_sum"], summary["n_bytes"]),
    )


# --- console progress line ---------------------------------------------------------------------


def _si(value: float) -> str:
    """12345 -> '12.3k', 2.5e6 -> '2.50M': throughput at a glance."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            scaled = value / scale
            return f"{scaled:.3g}{suffix}" if scaled < 100 else f"{scaled:.0f}{suffix}"
    return f"{value:.3g}"


def _short_exp(value: float) -> str:
    """3e-4 -> '3.0e-4' (no zero-padded exponent)."""
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def _finite(metrics: Mapping[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def format_progress(step: int, total_steps: int | None, metrics: Mapping[str, Any], elapsed_s: float) -> str:
    """``step   120/2000 | loss 1.234 | bpb 1.780 | 12.3k bytes/s | ... | 0:01:23``; absent keys are skipped."""
    if total_steps:
        width = len(str(total_steps))
        parts = [f"step {step:>{width}}/{total_steps}"]
    else:
        parts = [f"step {step}"]
    fields = (
        ("loss", lambda v: f"loss {v:.3f}"),
        ("bpb", lambda v: f"bpb {v:.3f}"),
        ("bytes_per_sec", lambda v: f"{_si(v)} bytes/s"),
        ("patches_per_sec", lambda v: f"{_si(v)} patches/s"),
        ("mean_patch_size", lambda v: f"patch {v:.2f}"),
        ("mfu", lambda v: f"MFU {100 * v:.1f}%"),
        ("learning_rate", lambda v: f"lr {_short_exp(v)}"),
    )
    for key, render in fields:
        value = _finite(metrics, key)
        if value is not None:
            parts.append(render(value))
    parts.append(_duration(elapsed_s))
    return " | ".join(parts)


# --- writers: clu's MetricWriter interface over JSONL, TensorBoard and the console --------------


def _clu_writer_modules():
    """clu's ``metric_writers.interface`` and ``multi_writer`` modules, with or without TensorFlow.

    clu 0.0.12's ``metric_writers/__init__`` imports TensorFlow for its SummaryWriter (an open issue
    upstream, google/CommonLoopUtils#358), and bltjax does not depend on TensorFlow; so without it
    the package is registered unexecuted and only its TensorFlow-free modules are loaded.
    """
    name = "clu.metric_writers"
    if name not in sys.modules and importlib.util.find_spec("tensorflow") is None:
        spec = importlib.util.find_spec(name)
        if spec is None:
            raise ImportError("bltjax.training.metrics needs the 'clu' package (pip install clu)")
        sys.modules[name] = importlib.util.module_from_spec(spec)  # its __init__ is the part that needs TensorFlow
    from clu.metric_writers import interface, multi_writer

    return interface, multi_writer


_clu_interface, _clu_multi_writer = _clu_writer_modules()
MetricWriter = _clu_interface.MetricWriter
MultiWriter = _clu_multi_writer.MultiWriter


def _scalar(value: Any) -> int | float:
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"metrics: expected scalars, got an array of shape {array.shape}")
    item = array.reshape(()).item()
    return int(item) if isinstance(item, (bool, int)) else float(item)


def flatten_hparams(hparams: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested config -> {"model.stack.n_layers": 2, ...}: TensorBoard's HParams tab takes flat scalars only.

    Lists, tuples and None become their JSON text, anything else its ``str``.
    """
    flat: dict[str, bool | int | float | str] = {}
    for key, value in hparams.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_hparams(value, prefix=f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif isinstance(value, (np.integer, np.floating, np.bool_)):
            flat[name] = value.item()
        elif value is None or isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value, default=str)
        else:
            flat[name] = str(value)
    return flat


class _ScalarWriter(MetricWriter):
    """A clu MetricWriter for scalars (and hyperparameters, where it has somewhere to put them).

    Training writes nothing else; the other kinds raise and name the writer, rather than vanish.
    """

    def _unsupported(self, kind: str) -> None:
        raise NotImplementedError(f"{type(self).__name__}: writes scalars only, not {kind}")

    def write_summaries(self, step: int, values: Mapping[str, Any], metadata: Mapping[str, Any] | None = None):
        self._unsupported("summaries")

    def write_images(self, step: int, images: Mapping[str, Any]):
        self._unsupported("images")

    def write_videos(self, step: int, videos: Mapping[str, Any]):
        self._unsupported("videos")

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
        self._unsupported("audios")

    def write_texts(self, step: int, texts: Mapping[str, str]):
        self._unsupported("texts")

    def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets: Mapping[str, int] | None = None):
        self._unsupported("histograms")

    def write_hparams(self, hparams: Mapping[str, Any]):
        """Ignored unless the backend has a place for them (the config is also saved with every checkpoint)."""

    def write_config(self, step: int, config: Mapping[str, Any]) -> None:
        """The launch's whole config, in the backend's own form; ignored where there is none (the console)."""

    def flush(self):
        pass

    def close(self):
        pass


class JsonlLog:
    """The append-only ``metrics.jsonl``: one JSON object per line, flushed per record (clu has no JSONL writer).

    It is the durable record that sweeps and tests read (`read_jsonl`), so it is written in the
    caller's thread and flushed at once, never buffered behind an asynchronous writer.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = paths.resolve(path)
        self.remote = paths.is_uri(path)
        self._file: IO[str] | None = None
        self._text: str | None = None  # an object store's current object (it cannot be appended to)

    def append(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        if self.remote:
            if self._text is None:
                self._text = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
                if self._text and not self._text.endswith("\n"):
                    self._text += "\n"
            self._text += line
            write_atomic(self.path, self._text.encode("utf-8"))
            return
        if self._file is None:
            torn = self.path.exists() and os.path.getsize(self.path) > 0 and not _ends_with_newline(self.path)
            self._file = open(self.path, "a", encoding="utf-8")
            if torn:  # a crash mid-line: start a fresh line rather than glue the next record to it
                self._file.write("\n")
        self._file.write(line)
        self._file.flush()

    def truncate_after(self, step: int) -> int:
        """Drops records with step > ``step`` and torn lines (atomic rewrite); returns how many were dropped."""
        self.close()
        if not self.path.exists():
            return 0
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if (parsed := _line_step(line)) is not None and parsed <= step]
        dropped = len(lines) - len(kept)
        if dropped:
            write_atomic(self.path, "".join(kept).encode("utf-8"))
        return dropped

    def close(self) -> None:
        self._text = None
        if self._file is not None:
            self._file.close()
            self._file = None


class JsonlWriter(_ScalarWriter):
    """One split's view of a `JsonlLog`: records ``{"step", "split", **scalars, "time"}``."""

    def __init__(self, log: JsonlLog, split: str) -> None:
        self.log, self.split = log, split

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        self.log.append({"step": int(step), "split": self.split, **scalars, "time": time.time()})

    def write_config(self, step: int, config: Mapping[str, Any]) -> None:
        """A ``{"step", "split": "config", "config": {...}}`` line: what each launch ran with (train.* may change)."""
        self.log.append({"step": int(step), "split": CONFIG_SPLIT, "config": config, "time": time.time()})


class TensorboardXWriter(_ScalarWriter):
    """TensorBoard event files of one run folder, through tensorboardX.

    Ours rather than clu's TorchTensorboardWriter: resuming needs tensorboardX's ``purge_step``
    and a unique file suffix, which that writer does not expose, and torch is not a dependency.
    """

    def __init__(self, logdir: str | os.PathLike, *, purge_step: int | None = None) -> None:
        from tensorboardX import SummaryWriter  # imported on first use: seconds when torch is installed

        if paths.is_uri(logdir):
            event_files.register(os.fspath(logdir))  # a bucket's events through epath, like every other file
        # tensorboardX names files by the second and opens them with "wb", so two writers in one
        # second (a quick restart) would clobber each other; time_ns first keeps names in creation order.
        self._writer = SummaryWriter(
            str(logdir), purge_step=purge_step, flush_secs=1, filename_suffix=f".{time.time_ns()}.{os.getpid()}"
        )

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, int(step))
        # tensorboardX writes from a thread: flush() pushes what that thread has written, flush_secs=1
        # bounds the lag, close() waits for everything. metrics.jsonl is the durable record.
        self._writer.flush()

    def write_hparams(self, hparams: Mapping[str, Any]):
        """The HParams tab's session records, in this run's own folder (add_hparams would open a sub-run)."""
        from tensorboardX.summary import hparams as hparams_summaries

        for summary in hparams_summaries(flatten_hparams(hparams), {}):
            self._writer.file_writer.add_summary(summary)
        self._writer.flush()

    def write_texts(self, step: int, texts: Mapping[str, str]):
        for key, text in texts.items():
            self._writer.add_text(key, text, int(step))
        self._writer.flush()

    def write_config(self, step: int, config: Mapping[str, Any]) -> None:
        """The config as JSON in the Text tab (tag ``config``) and as the HParams tab's session."""
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        # Indented four spaces: TensorBoard renders text as markdown, and this keeps it a code block.
        self.write_texts(step, {"config": "\n".join("    " + line for line in text.splitlines())})
        self.write_hparams(config)

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


class ConsoleWriter(_ScalarWriter):
    """The one-line progress report of `format_progress`, prefixed with ``[split]`` except for train."""

    def __init__(self, stream: IO[str], *, total_steps: int | None, start: float, prefix: str = "") -> None:
        self.stream, self.total_steps, self.start, self.prefix = stream, total_steps, start, prefix

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        line = format_progress(step, self.total_steps, scalars, time.monotonic() - self.start)
        print(f"{self.prefix}{line}", file=self.stream, flush=True)


_STDOUT = object()  # default console: sys.stdout as it is when the writer is made
RESERVED_KEYS = ("step", "split", "time")


class MetricsWriter(_ScalarWriter):
    """The chosen backends + console for one run's ``workdir``; a no-op on processes other than 0.

    Each split ("train", "validation", "eval/<split>") gets a clu `MultiWriter` over a
    `JsonlWriter`, a `TensorboardXWriter` on ``tensorboard/{split}/``, a wandb view and a
    `ConsoleWriter`, as ``backends`` asks; `write` fans a record out to them, and
    `write_scalars` / `write_hparams` make the whole a clu MetricWriter of the train split. No
    AsyncWriter: the JSONL line must be on disk before the step's checkpoint is, and
    tensorboardX and wandb already write from their own threads.

    After a restart at step s, call `truncate_after(s)` before writing: lines of the interrupted
    run past s leave ``metrics.jsonl`` and TensorBoard hides its events from step s + 1 on
    (tensorboardX's purge_step), so each step shows once. ``console=None`` silences the progress
    line (default: the current ``sys.stdout``); its clock starts when the writer is made.
    ``wandb`` holds the keyword arguments of `wandb_tracker.WandbRun` (project, entity, name, ...).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        process_index: int = 0,
        console: IO[str] | None | object = _STDOUT,
        total_steps: int | None = None,
        tensorboard: bool = True,
        backends: Sequence[str] | None = None,
        wandb: Mapping[str, Any] | None = None,
    ) -> None:
        self.workdir = paths.resolve(workdir)
        self.active = process_index == 0
        self.console = sys.stdout if console is _STDOUT else console  # resolved now, not at import
        self.total_steps = total_steps
        if backends is None:
            backends = DEFAULT_BACKENDS if tensorboard else ("jsonl",)
        self.backends = tuple(backends)
        unknown = sorted(set(self.backends) - set(observability.METRIC_BACKENDS))
        if unknown:
            raise ValueError(f"metrics backends: unknown {unknown[0]!r}; expected tensorboard, jsonl or wandb")
        self.tensorboard = "tensorboard" in self.backends
        self.path = self.workdir / METRICS_FILE
        self._start = time.monotonic()
        self._purge_step: int | None = None
        self._resumed_step = 0
        self._log = JsonlLog(self.path)
        self._splits: dict[str, MetricWriter] = {}
        self._members: dict[str, list[MetricWriter]] = {}
        self._wandb = None
        if "wandb" in self.backends:
            from bltjax.training import wandb_tracker  # optional extra: imported only when asked for

            wandb_tracker.require_wandb()  # a missing package fails here, before any training
            if self.active:
                self._wandb = wandb_tracker.WandbRun(self.workdir, **dict(wandb or {}))
        if self.active:
            self.workdir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_config(
        cls,
        config: Any,
        workdir: str | os.PathLike,
        *,
        job_type: str = "train",
        run_suffix: str = "",
        **kwargs: Any,
    ) -> MetricsWriter:
        """The writer ``config.metrics`` asks for (a config without that section: TensorBoard + JSONL).

        ``job_type`` / ``run_suffix`` name a W&B run beside the training run's (evaluations).
        """
        section = config.get("metrics") if hasattr(config, "get") else None
        if section is None:
            return cls(workdir, **kwargs)
        wandb = dict(
            project=section.get("wandb_project", ""),
            entity=section.get("wandb_entity", ""),
            name=section.get("wandb_name", ""),
            job_type=job_type,
            run_suffix=run_suffix,
        )
        return cls(workdir, backends=observability.parse_backends(section.backends), wandb=wandb, **kwargs)

    def writer(self, split: str) -> MetricWriter:
        """The clu MetricWriter of one split (made on first use, after any `truncate_after`)."""
        if split not in self._splits:
            writers: list[MetricWriter] = []
            if "jsonl" in self.backends:
                writers.append(JsonlWriter(self._log, split))
            if self.tensorboard:
                logdir = self.workdir / TENSORBOARD_DIR / split
                writers.append(TensorboardXWriter(logdir, purge_step=self._purge_step))
            if self._wandb is not None:
                writers.append(self._wandb.writer(split))
            if self.console is not None:
                prefix = "" if split == "train" else f"[{split}] "
                writers.append(
                    ConsoleWriter(self.console, total_steps=self.total_steps, start=self._start, prefix=prefix)
                )
            self._members[split] = writers
            self._splits[split] = MultiWriter(writers)
        return self._splits[split]

    def write(self, step: int, metrics: Mapping[str, Any], *, split: str = "train") -> None:
        """Records scalar ``metrics`` of ``step`` for ``split`` ("train", "validation", "eval/<split>")."""
        if not self.active:
            return
        reserved = sorted(set(metrics) & set(RESERVED_KEYS))
        if reserved:
            raise ValueError(f"metrics: {reserved[0]!r} is a reserved key of each record; rename the metric")
        scalars = {key: _scalar(value) for key, value in metrics.items()}
        self.writer(split).write_scalars(int(step), scalars)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        self.write(step, scalars, split="train")

    def write_config(self, config: Mapping[str, Any], *, step: int | None = None) -> None:
        """The launch's config to every backend: a JSONL line, TensorBoard text + HParams, the wandb run config.

        ``step`` defaults to the step this launch starts at (`truncate_after`'s, else 0).
        """
        if not self.active:
            return
        step = self._resumed_step if step is None else int(step)
        self.writer("train")
        for member in self._members["train"]:
            member.write_config(step, config)

    def write_hparams(self, hparams: Mapping[str, Any]):
        """clu's name for `write_config` (nested dicts are flattened for TensorBoard's HParams tab)."""
        self.write_config(hparams)

    def truncate_after(self, step: int) -> int:
        """Drops JSONL records with step > ``step`` (atomic rewrite); returns how many were dropped."""
        if not self.active:
            return 0
        self._close_writers()
        self._purge_step = int(step) + 1
        self._resumed_step = int(step)
        if "jsonl" not in self.backends:
            return 0
        return self._log.truncate_after(int(step))

    def _close_writers(self) -> None:
        for writer in self._splits.values():
            writer.close()
        self._splits, self._members = {}, {}
        self._log.close()

    def flush(self):
        for writer in self._splits.values():
            writer.flush()

    def close(self) -> None:
        """Flushes and closes every file (TensorBoard events are complete on disk, the wandb run finished)."""
        self._close_writers()
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _line_step(line: str) -> int | None:
    """The step of one JSONL line; None for a blank or torn line (a crash mid-write), which is dropped."""
    if not line.endswith("\n"):
        return None
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _ends_with_newline(path: os.PathLike) -> bool:
    with open(path, "rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete JSON object of a metrics file, in order (a torn last line is skipped).

    This is the library's way to read a run's metrics; TensorBoard's files are for TensorBoard.
    """
    records = []
    with paths.resolve(path).open(encoding="utf-8") as file:
        for line in file:
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
