r"""How many times a compiled program's loop bodies run: matmul FLOPs counted with trip counts.

  counts = hlo_loops.count_matmuls(optimized_hlo_text)
  counts.loop_factor      # matmul FLOPs with every loop's trips / matmul FLOPs with each body once

XLA's ``cost_analysis()`` adds up every instruction of the program once, so the body of a
``while`` loop (a scanned layer stack, gradient accumulation) counts for one iteration whatever
its trip count. The optimized HLO text says how often each loop runs: XLA:CPU writes
``known_trip_count`` in a ``while``'s backend config; libtpu does not, but its loop conditions
are jax's counter test, ``ROOT compare(counter, constant(N)), direction=LT`` (counters start at
0 and step by 1), whose N is the trip count. So this module counts the matmuls (``dot`` and ``convolution``,
which is what the TPU compiler turns many dots into) of every computation, multiplies each
loop body by its trip count, and compares with the same count taken once per body. The ratio
rescales XLA's FLOPs and bytes (`bltjax.runtime.roofline`), on the assumption that a loop's
other work and traffic repeat as its matmuls do.

Custom calls are opaque to XLA: a Pallas kernel's FLOPs (splash attention on TPU) are in
neither count; ``kernel_calls`` says how many run per step, so the report can say so.

Hand-written rather than an XLA API because jax exposes no per-computation cost analysis;
the text format read here (``%name = f32[8,16]{1,0} dot(%a, %b), lhs_contracting_dims={1}``,
``while(...), condition=%c, body=%b, backend_config={..."known_trip_count":{"n":"5"}...}``)
is the one both XLA:CPU and libtpu write.
"""

from __future__ import annotations

import dataclasses
import math
import re

_HEADER = re.compile(r"^(?:ENTRY )?%?(?P<name>[\w.\-]+) \((?P<params>.*)\) -> .*\{\s*$")
_PARAM = re.compile(r"(?P<name>[\w.\-]+): (?P<type>[a-z]\w*)\[(?P<dims>[\d,]*)\]")
# The shape is an array (f32[8,16]{1,0}) or a tuple with spaces; the op is the first "name(" after it.
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%(?P<name>[\w.\-]+) = (?P<shape>.*?) (?P<op>[a-z][\w\-]*)\((?P<args>[^)]*)\)(?P<rest>.*)$"
)
_ARRAY = re.compile(r"^[a-z]\w*\[(?P<dims>[\d,]*)\]")
_CALLEES = re.compile(r"(?:calls|to_apply|body|condition)=%(?P<name>[\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{(?P<names>[^}]*)\}")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(?P<n>\d+)"\}')
_BODY = re.compile(r"body=%(?P<name>[\w.\-]+)")
_CONDITION = re.compile(r"condition=%(?P<name>[\w.\-]+)")
_INT_CONSTANT = re.compile(r"^\s*(?P<value>-?\d+)\s*$")
_CONTRACTING = re.compile(r"lhs_contracting_dims=\{(?P<dims>[\d,]*)\}")
_DIM_LABELS = re.compile(r"dim_labels=(?P<lhs>\w+)_(?P<rhs>\w+)->(?P<out>\w+)")
_CUSTOM_TARGET = re.compile(r'custom_call_target="(?P<target>[^"]+)"')
# Custom calls that are kernels doing math (Pallas / Mosaic on TPU, Triton on GPU), not layout or collectives.
_KERNEL_TARGETS = ("tpu_custom_call", "__gpu$xla.gpu.triton", "cudnn")


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(",") if d)


@dataclasses.dataclass
class _Computation:
    matmul_flops: float = 0.0
    kernel_calls: int = 0
    callees: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # (computation, times per run)
    loops: list[tuple[str, str, int | None]] = dataclasses.field(default_factory=list)  # (body, condition, trips)
    branches: list[list[str]] = dataclasses.field(default_factory=list)  # conditionals: one runs
    constants: dict[str, int] = dataclasses.field(default_factory=dict)  # scalar integer constants
    counter_bound: int | None = None  # as a loop condition: the N of ``ROOT compare(i, N), direction=LT``


@dataclasses.dataclass(frozen=True)
class MatmulCounts:
    """Matmul FLOPs of one device's program, with loop trips (``flops``) and with each body once."""

    flops: float
    flops_once: float
    kernel_calls: int  # custom-call kernels (Pallas, Triton, cuDNN) run per step, trips included

    @property
    def loop_factor(self) -> float:
        """How many times more matmul work runs than a once-per-body count sees (1 without loops)."""
        return self.flops / self.flops_once if self.flops_once > 0 else 1.0


def _matmul_flops(op: str, out_dims: tuple[int, ...], args: list[str], rest: str, shapes: dict) -> float:
    if op == "dot":
        contracting = _CONTRACTING.search(rest)
        lhs = shapes.get(args[0]) if args else None
        if lhs is None or contracting is None:
            return 0.0
        return 2.0 * math.prod(out_dims) * math.prod(lhs[i] for i in _dims(contracting["dims"]))
    labels = _DIM_LABELS.search(rest)
    rhs = shapes.get(args[1]) if len(args) > 1 else None
    if labels is None or rhs is None or "o" not in labels["rhs"]:
        return 0.0
    # Each output element is a dot over the kernel's input features and window: prod(kernel) / out features.
    return 2.0 * math.prod(out_dims) * math.prod(rhs) / rhs[labels["rhs"].index("o")]


def _parse(hlo_text: str) -> tuple[dict[str, _Computation], str | None]:
    computations: dict[str, _Computation] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = computations.setdefault(header["name"], _Computation())
            if line.startswith("ENTRY"):
                entry = header["name"]
            for param in _PARAM.finditer(header["params"]):
                shapes[param["name"]] = _dims(param["dims"])
            continue
        instruction = _INSTRUCTION.match(line) if current is not None else None
        if instruction is None:
            continue
        array = _ARRAY.match(instruction["shape"])
        out_dims = _dims(array["dims"]) if array else ()
        if array:
            shapes[instruction["name"]] = out_dims
        op, rest = instruction["op"], instruction["rest"]
        args = [a.strip().lstrip("%") for a in instruction["args"].split(",") if a.strip()]
        if op in ("dot", "convolution"):
            current.matmul_flops += _matmul_flops(op, out_dims, args, rest, shapes)
        elif op == "custom-call":
            target = _CUSTOM_TARGET.search(rest)
            current.kernel_calls += bool(target and any(t in target["target"] for t in _KERNEL_TARGETS))
        if op == "constant" and instruction["shape"].startswith(("s32[]", "s64[]", "u32[]")):
            value = _INT_CONSTANT.match(instruction["args"])
            if value:
                current.constants[instruction["name"]] = int(value["value"])
        if op == "compare" and line.lstrip().startswith("ROOT") and "direction=LT" in rest and len(args) == 2:
            current.counter_bound = current.constants.get(args[1])
        if op == "while":
            trips, body, condition = _TRIPS.search(rest), _BODY.search(rest), _CONDITION.search(rest)
            if body and condition:
                current.loops.append((body["name"], condition["name"], int(trips["n"]) if trips else None))
            continue
        branches = _BRANCHES.search(rest)
        if branches:
            current.branches.append([n.strip().lstrip("%") for n in branches["names"].split(",") if n.strip()])
        current.callees.extend((callee["name"], 1) for callee in _CALLEES.finditer(rest))
    return computations, entry


def count_matmuls(hlo_text: str) -> MatmulCounts:
    """The matmul FLOPs of the program's ENTRY computation, with and without loop trip counts."""
    computations, entry = _parse(hlo_text)
    if entry is None:
        return MatmulCounts(0.0, 0.0, 0)

    def total(name: str, with_trips: bool, seen: tuple[str, ...] = ()) -> tuple[float, int]:
        computation = computations.get(name)
        if computation is None or name in seen:  # unknown or recursive: nothing to add
            return 0.0, 0
        flops, calls = computation.matmul_flops, computation.kernel_calls
        runs = [(callee, times, times) for callee, times in computation.callees]
        for body, condition, trips in computation.loops:
            if trips is None:  # libtpu: the condition's counter bound (unknown: counted once)
                bound = computations.get(condition)
                trips = bound.counter_bound if bound is not None and bound.counter_bound else 1
            runs += [(body, trips, trips if with_trips else 1), (condition, trips + 1, trips + 1 if with_trips else 1)]
        for callee, times_for_calls, times in runs:
            f, c = total(callee, with_trips, seen + (name,))
            flops, calls = flops + times * f, calls + times_for_calls * c
        for branches in computation.branches:  # one branch runs: count the most expensive
            flops += max((total(b, with_trips, seen + (name,))[0] for b in branches), default=0.0)
        return flops, calls

    flops, calls = total(entry, True)
    return MatmulCounts(flops, total(entry, False)[0], calls)
