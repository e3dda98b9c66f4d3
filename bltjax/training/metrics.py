"""Training and evaluation metrics: the loss arithmetic of spec §11 and one writer for them.

Bits per byte are computed from summed nats and counts, never from averaged losses, so that
batches, hosts and evaluation shards combine exactly. Two counts are kept (spec §11):

* ``bpb``: every loss-mask target counts as a byte, BOS/EOS included. This is what the
  official training log reports, and the headline number of bltjax's logs.
* ``bpb_bytes``: only targets that are bytes (ids >= `tokenizer.OFFSET`), the paper's
  definition over the bytes of the text.

`MetricsWriter` sends each record to three places, only on process 0: an append-only
``metrics.jsonl`` (the durable record, one line per step and split), TensorBoard event files
under ``tensorboard/{split}/``, and a compact progress line on the console. Known keys of the
progress line: loss, bpb, bytes_per_sec, patches_per_sec, mean_patch_size, mfu (a fraction),
learning_rate; any missing one is left out.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import struct
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

import jax
import jax.numpy as jnp
import numpy as np

from bltjax.runtime.atomic import write_atomic
from bltjax.tokenizer import OFFSET

LN2 = math.log(2.0)
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


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
    """loss (nats per target, the training loss of spec §11), bpb and bpb_bytes from a summary."""
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


# --- the writer --------------------------------------------------------------------------------


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


_STDOUT = object()  # default console: sys.stdout as it is when the writer is made
RESERVED_KEYS = ("step", "split", "time")


class MetricsWriter:
    """JSONL + TensorBoard + console for one run's ``workdir``; a no-op on processes other than 0.

    After a restart at step s, call `truncate_after(s)` before writing: lines of the interrupted
    run past s leave ``metrics.jsonl`` and TensorBoard hides its events from step s + 1 on
    (tensorboardX's purge_step), so each step shows once. ``console=None`` silences the progress
    line (default: the current ``sys.stdout``); its clock starts when the writer is made.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        process_index: int = 0,
        console: IO[str] | None | object = _STDOUT,
        total_steps: int | None = None,
        tensorboard: bool = True,
    ) -> None:
        self.workdir = pathlib.Path(workdir)
        self.active = process_index == 0
        self.console = sys.stdout if console is _STDOUT else console  # resolved now, not at import
        self.total_steps = total_steps
        self.tensorboard = tensorboard
        self.path = self.workdir / METRICS_FILE
        self._start = time.monotonic()
        self._purge_step: int | None = None
        self._tb: dict[str, Any] = {}
        self._file: IO[str] | None = None
        if self.active:
            self.workdir.mkdir(parents=True, exist_ok=True)

    def _jsonl(self) -> IO[str]:
        if self._file is None:
            torn = self.path.exists() and self.path.stat().st_size > 0 and not _ends_with_newline(self.path)
            self._file = open(self.path, "a", encoding="utf-8")
            if torn:  # a crash mid-line: start a fresh line rather than glue the next record to it
                self._file.write("\n")
        return self._file

    def _tb_writer(self, split: str):
        if split not in self._tb:
            from tensorboardX import SummaryWriter  # imported on first use: seconds with torch installed

            # A unique suffix: tensorboardX names files by the second and opens them with "wb",
            # so two writers in one second (a quick restart) would clobber each other.
            self._tb[split] = SummaryWriter(
                str(self.workdir / TENSORBOARD_DIR / split),
                purge_step=self._purge_step,
                flush_secs=1,
                filename_suffix=f".{os.getpid()}.{time.time_ns()}",
            )
        return self._tb[split]

    def write(self, step: int, metrics: Mapping[str, Any], *, split: str = "train") -> None:
        """Records scalar ``metrics`` of ``step`` for ``split`` ("train" or "validation")."""
        if not self.active:
            return
        reserved = sorted(set(metrics) & set(RESERVED_KEYS))
        if reserved:
            raise ValueError(f"metrics: {reserved[0]!r} is a reserved key of each record; rename the metric")
        scalars = {key: _scalar(value) for key, value in metrics.items()}
        record = {"step": int(step), "split": split, **scalars, "time": time.time()}
        file = self._jsonl()
        file.write(json.dumps(record) + "\n")
        file.flush()
        if self.tensorboard:
            writer = self._tb_writer(split)
            for key, value in scalars.items():
                writer.add_scalar(key, value, int(step))
            # tensorboardX writes from a thread: flush() pushes what it has written, flush_secs=1
            # bounds the lag, close() waits for everything. metrics.jsonl is the durable record.
            writer.flush()
        if self.console is not None:
            line = format_progress(step, self.total_steps, scalars, time.monotonic() - self._start)
            if split != "train":
                line = f"[{split}] {line}"
            print(line, file=self.console, flush=True)

    def truncate_after(self, step: int) -> int:
        """Drops JSONL records with step > ``step`` (atomic rewrite); returns how many were dropped."""
        if not self.active:
            return 0
        self._close_files()
        self._purge_step = int(step) + 1
        if not self.path.exists():
            return 0
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if (parsed := _line_step(line)) is not None and parsed <= step]
        dropped = len(lines) - len(kept)
        if dropped:
            write_atomic(self.path, "".join(kept).encode("utf-8"))
        return dropped

    def _close_files(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for writer in self._tb.values():
            writer.close()
        self._tb = {}

    def close(self) -> None:
        """Flushes and closes every file (TensorBoard events are complete on disk after this)."""
        self._close_files()

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


def _ends_with_newline(path: pathlib.Path) -> bool:
    with open(path, "rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"


# --- readers (tests, notebooks) ----------------------------------------------------------------


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete JSON object of a metrics file, in order (a torn last line is skipped)."""
    records = []
    with open(path, encoding="utf-8") as file:
        for line in file:
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _tfrecords(path: pathlib.Path):
    """Payloads of a TFRecord file: [uint64 length][uint32 crc][data][uint32 crc], little-endian."""
    with open(path, "rb") as file:
        while header := file.read(12):
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            data = file.read(length)
            if len(data) < length or len(file.read(4)) < 4:
                return  # a record still being written
            yield data


def read_tensorboard_scalars(directory: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the event files of one directory, as TensorBoard shows them.

    Files are read in creation order; a session-start event at step s (a purge_step) hides the
    values at steps >= s recorded before it, which is how resumed runs show each step once.
    """
    from tensorboardX.proto import event_pb2

    def first_time(path: pathlib.Path) -> float:
        for data in _tfrecords(path):
            return event_pb2.Event.FromString(data).wall_time
        return math.inf

    files = sorted(pathlib.Path(directory).glob("events.out.tfevents.*"), key=lambda p: (first_time(p), p.name))
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in files:
        for data in _tfrecords(path):
            event = event_pb2.Event.FromString(data)
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                scalars = {tag: [(s, v) for s, v in values if s < event.step] for tag, values in scalars.items()}
            if event.HasField("summary"):
                for value in event.summary.value:
                    if value.HasField("simple_value"):
                        number = float(value.simple_value)
                    elif value.HasField("tensor") and len(value.tensor.float_val) == 1:
                        number = float(value.tensor.float_val[0])
                    else:
                        continue
                    scalars.setdefault(value.tag, []).append((int(event.step), number))
    return scalars
