r"""What occupies a compiled program's memory at its peak, by source: read from XLA's own dump.

  compiled = memory_report.compile_with_dump(lowered, directory)   # lowered: a jax Lowered
  breakdown = memory_report.read_dump(directory)                   # None when the dump is missing

`compiled.memory_analysis()` gives totals only, and on TPU `compiled.as_text()` fails (libtpu's
HLO carries instructions this jaxlib cannot parse back), so the per-buffer view comes from the
files the compiler itself writes with ``xla_dump_to`` (libtpu's and XLA:CPU's alike):

* ``*-live-range.txt``: the instruction sequence, each buffer's live range, and the list
  "Live ranges at N (peak):" of every buffer alive at the program's peak, with its size;
* ``*-buffer-assignment.txt``: the shape of every value (``value: <id name{index} @pos> ...: shape``);
* ``*after_optimizations.txt``: the optimized HLO, whose instructions carry the jax source in
  ``metadata={op_name="jit(train_step)/jvp(BLT)/local_encoder/layers_0/..."}``. Flax module paths
  name the layer; ``transpose(jvp(...))`` marks the backward pass; entry parameters are named
  after the argument (``state.params['latent']...``, ``state.opt_state...``).

From these, `read_dump` lists the buffers live at the peak, largest first, and sums them per
layer kind and pass (`LAYER_KINDS`). jax leaves the dump options out of its persistent-cache
key, so a cached program would come back without a dump: `compile_with_dump` compiles with
the persistent cache off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import re
from collections.abc import Iterable, Iterator
from typing import Any

import jax
from jax.experimental.compilation_cache import compilation_cache

# Ordered (first match wins): layer kind -> substrings of an op_name that belong to it.
LAYER_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("train state", ("state.",)),
    ("batch", ("batch",)),
    ("hash embeddings", ("hash_embedding",)),
    ("encoder cross-attention", ("local_encoder/cross_attention",)),
    ("local encoder", ("local_encoder",)),
    ("latent transformer", ("/latent/",)),
    ("decoder cross-attention", ("local_decoder/cross_attention",)),
    ("logits and loss", ("local_decoder.logits", "log_softmax", "/output/", "cross_entropy")),
    ("local decoder", ("local_decoder",)),
    ("optimizer update", ("optax", "adam", "clip", "update")),
)
OTHER = "other"

_PEAK_HEADER = re.compile(r"^\s*Live ranges at \d+ \(peak\):\s*$")
_NAME = r"(?P<name>[\w.\-]+)(?P<index>\{[\d,]*\})"
_PEAK_ROW = re.compile(rf"^\s*{_NAME}: (?P<bytes>\d+) bytes")
_VALUE_ROW = re.compile(rf"^\s*value: <\d+ {_NAME}?(?: \(phi\))? @\d+> \([^)]*\): (?P<shape>.+)$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?(?P<name>[\w.\-]+) = .*?metadata=\{(?P<meta>[^}]*)\}")
_OP_NAME = re.compile(r'op_name="(?P<op>(?:[^"\\]|\\.)*)"')
_SOURCE = re.compile(r'source_file="(?P<file>[^"]*)" source_line=(?P<line>\d+)')
_LAYOUT = re.compile(r"\{[^{}]*\}")
_NUMBERING = re.compile(r"(\.\d+)+$")


@dataclasses.dataclass(frozen=True)
class Buffer:
    """One buffer alive at the peak: its HLO value, size, shape and the jax op that made it."""

    value: str  # HLO instruction name and tuple index, e.g. "fusion.12{1}"
    bytes: int
    shape: str  # e.g. "f32[4,16384,1024]" (layout stripped); "" when unknown
    op_name: str  # jax's name stack, e.g. "jit(train_step)/transpose(jvp(BLT))/latent/..."; "" when none
    source: str = ""  # "file.py:123" when the metadata has it

    @property
    def kind(self) -> str:
        """The layer kind of its op; for a buffer without one (loop carries, copies the compiler
        added), "no jax op: " and the HLO instruction it belongs to, numbering dropped."""
        if not self.op_name:
            return f"no jax op: {_NUMBERING.sub('', self.value.split('{')[0])}"
        return layer_kind(self.op_name)

    @property
    def backward(self) -> bool:
        """Made by the backward pass (gradients, recomputation) rather than kept from the forward pass."""
        return "transpose(" in self.op_name


@dataclasses.dataclass(frozen=True)
class MemoryBreakdown:
    """The buffers live at the peak of a compiled program (the compiler's own accounting)."""

    buffers: tuple[Buffer, ...]  # largest first
    source: str  # the live-range file it was read from (basename)

    @property
    def peak_live_bytes(self) -> int:
        return sum(b.bytes for b in self.buffers)

    def temporaries(self) -> list[Buffer]:
        """The buffers that are not the program's arguments (train state, batch)."""
        return [b for b in self.buffers if b.kind not in ("train state", "batch")]

    def by_kind(self) -> dict[str, dict[str, int]]:
        """Bytes live at the peak per layer kind, split into forward (kept activations) and backward."""
        totals: dict[str, dict[str, int]] = {}
        for buffer in self.buffers:
            row = totals.setdefault(buffer.kind, {"forward": 0, "backward": 0})
            row["backward" if buffer.backward else "forward"] += buffer.bytes
        return dict(sorted(totals.items(), key=lambda item: -sum(item[1].values())))

    def table(self, top: int = 10, format_bytes: Any = None, top_kinds: int = 14) -> str:
        fmt = format_bytes or (lambda n: f"{n / (1 << 20):.1f} MiB")
        lines = [
            f"buffers live at the compiler's peak ({fmt(self.peak_live_bytes)} in {len(self.buffers)} buffers; the "
            "temporaries above also count how the allocator packs them), by layer kind:"
        ]
        kinds = list(self.by_kind().items())
        width = max([len(k) for k, _ in kinds[:top_kinds]] + [10])
        rest = sum(split["forward"] + split["backward"] for _, split in kinds[top_kinds:])
        for kind, split in kinds[:top_kinds]:
            lines.append(f"  {kind:<{width}}  {fmt(split['forward'] + split['backward']):>12}  "
                         f"(forward {fmt(split['forward'])}, backward {fmt(split['backward'])})")  # fmt: skip
        if rest:
            lines.append(f"  {'the rest':<{width}}  {fmt(rest):>12}  ({len(kinds) - top_kinds} more kinds)")
        temporaries = self.temporaries()[:top]
        if temporaries:
            lines.append(f"largest {len(temporaries)} temporaries at the peak:")
            for b in temporaries:
                where = f" [{b.source}]" if b.source else ""
                lines.append(f"  {fmt(b.bytes):>12}  {b.shape or b.value:<28} {b.op_name or b.value}{where}")
        return "\n".join(lines)

    def to_json(self, top: int = 10) -> dict[str, Any]:
        return {
            "source": self.source,
            "peak_live_bytes": self.peak_live_bytes,
            "by_kind": self.by_kind(),
            "top_temporaries": [
                {**dataclasses.asdict(b), "kind": b.kind, "backward": b.backward} for b in self.temporaries()[:top]
            ],
        }


def layer_kind(op_name: str) -> str:
    """The `LAYER_KINDS` entry an op_name belongs to (its Flax module path), else "other"."""
    for kind, needles in LAYER_KINDS:
        if any(needle in op_name for needle in needles):
            return kind
    return OTHER


def dump_options(directory: str | pathlib.Path) -> dict[str, Any]:
    """Compiler options that make XLA (CPU or libtpu) write the optimized HLO and its buffer files."""
    return {
        "xla_dump_to": str(directory),
        "xla_dump_hlo_as_text": True,
        "xla_dump_hlo_pass_re": "NONE",  # no per-pass snapshots: only the module before/after optimisation
    }


@contextlib.contextmanager
def _without_persistent_cache() -> Iterator[None]:
    previous = jax.config.jax_enable_compilation_cache
    compilation_cache.reset_cache()  # jax decides once per process whether the cache is used
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", previous)
        compilation_cache.reset_cache()


def compile_with_dump(lowered: Any, directory: str | pathlib.Path) -> Any:
    """``lowered.compile()`` with the dump options, bypassing the persistent cache (see the module docstring)."""
    with _without_persistent_cache():
        return lowered.compile(dump_options(directory))


def parse_peak(live_range_text: str) -> list[tuple[str, int]]:
    """("name{index}", bytes) of every buffer listed under "Live ranges at N (peak):"."""
    rows, inside = [], False
    for line in live_range_text.splitlines():
        if not inside:
            inside = bool(_PEAK_HEADER.match(line))
            continue
        match = _PEAK_ROW.match(line)
        if match is None:
            break
        rows.append((match["name"] + match["index"], int(match["bytes"])))
    return rows


def _strip_layout(shape: str) -> str:
    return _LAYOUT.sub("", shape).strip()


def parse_value_shapes(buffer_assignment_text: str, wanted: Iterable[str] | None = None) -> dict[str, str]:
    """ "name{index}" -> shape (layout stripped) from the buffer assignment's value rows."""
    wanted_set = set(wanted) if wanted is not None else None
    shapes: dict[str, str] = {}
    for line in buffer_assignment_text.splitlines():
        if "value: <" not in line:
            continue
        match = _VALUE_ROW.match(line)
        if match is None:
            continue
        key = match["name"] + (match["index"] or "{}")
        if (wanted_set is None or key in wanted_set) and key not in shapes:
            shapes[key] = _strip_layout(match["shape"])
    return shapes


def parse_metadata(hlo_text: str, wanted: Iterable[str] | None = None) -> dict[str, tuple[str, str]]:
    """Instruction name -> (op_name, "file:line") from the optimized HLO text."""
    wanted_set = set(wanted) if wanted is not None else None
    found: dict[str, tuple[str, str]] = {}
    for line in hlo_text.splitlines():
        if "metadata={" not in line:
            continue
        match = _INSTRUCTION.match(line)
        if match is None or (wanted_set is not None and match["name"] not in wanted_set):
            continue
        op = _OP_NAME.search(match["meta"])
        source = _SOURCE.search(match["meta"])
        op_name = op["op"].replace("\\'", "'").replace('\\"', '"') if op else ""
        found.setdefault(match["name"], (op_name, f"{source['file']}:{source['line']}" if source else ""))
    return found


def _one(directory: pathlib.Path, pattern: str, module: str) -> pathlib.Path | None:
    # The largest match: the train step, not a small helper module compiled alongside.
    files = sorted(
        directory.glob(f"*{module}*{pattern}" if module else f"*{pattern}"),
        key=lambda p: p.stat().st_size,
        reverse=True,
    )
    return files[0] if files else None


def optimized_hlo_text(directory: str | pathlib.Path, module: str = "") -> str | None:
    """The optimized HLO text of the (largest) compiled module dumped in ``directory``; None if absent."""
    hlo = _one(pathlib.Path(directory), "after_optimizations.txt", module)
    return hlo.read_text(errors="replace") if hlo else None


def read_dump(directory: str | pathlib.Path, module: str = "") -> MemoryBreakdown | None:
    """The peak breakdown of the (largest) compiled module dumped in ``directory``; None if absent."""
    directory = pathlib.Path(directory)
    live_range = _one(directory, "after_optimizations-live-range.txt", module)
    if live_range is None:
        return None
    peak = parse_peak(live_range.read_text(errors="replace"))
    if not peak:
        return None
    prefix = live_range.name[: -len("-live-range.txt")]
    assignment = directory / f"{prefix}-buffer-assignment.txt"
    hlo = directory / f"{prefix}.txt"
    names = [value for value, _ in peak]
    shapes = parse_value_shapes(assignment.read_text(errors="replace"), names) if assignment.exists() else {}
    instructions = {value.split("{")[0] for value in names}
    metadata = parse_metadata(hlo.read_text(errors="replace"), instructions) if hlo.exists() else {}
    buffers = []
    for value, size in peak:
        op_name, source = metadata.get(value.split("{")[0], ("", ""))
        buffers.append(Buffer(value, size, shapes.get(value, ""), op_name, source))
    buffers.sort(key=lambda b: (-b.bytes, b.value))
    return MemoryBreakdown(tuple(buffers), live_range.name)
