"""Reading collective traffic and matmul FLOPs out of compiled HLO text.

Counts every all-reduce, reduce-scatter, all-gather, all-to-all and collective-permute
(ring attention's sends; each device sends its whole buffer), multiplied by the
trip counts of the ``while`` loops around it, as ring-equivalent bytes per device:
an all-reduce moves ``2 * size * (n-1)/n``, a reduce-scatter or all-gather
``size * (n-1)/n`` of the full (unsharded) size, an all-to-all ``size * (n-1)/n``.
"""
from __future__ import annotations

import collections
import math
import re
from typing import NamedTuple

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
    "s4": 0.5, "u4": 0.5, "f8e4m3fn": 1, "f8e5m2": 1,
}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_KINDS = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all")
# Point-to-point sends (ring attention's K/V rotation): each device sends its whole buffer once.
_PERMUTE = "collective-permute"

# HLO instructions that move or name data without computing: not "compute between start and done".
_BOOKKEEPING = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "copy", "copy-start", "copy-done",
    "after-all", "partition-id", "replica-id",
}
_NAMED_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_PARAM = re.compile(r"([\w.\-]+):\s*[a-z][a-z0-9]*\[([0-9,]*)\]")


def shape_bytes(text: str) -> float:
    """Bytes of every array shape written in ``text`` (a shape or a tuple of shapes)."""
    total = 0.0
    for dtype, dims in _SHAPE.findall(text):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _group_size(line: str, default: int) -> int:
    m = re.search(r"replica_groups=\{\{([0-9,]+)\}", line)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
    if m:
        return int(m.group(2))
    return default


def _computations(hlo: str) -> dict[str, list[str]]:
    comps, name = {}, None
    for line in hlo.splitlines():
        m = _HEADER.match(line)
        if m:
            name = m.group(1)
            comps[name] = []
        elif name is not None:
            if line.strip() == "}":
                name = None
            else:
                comps[name].append(line)
    return comps


def _multipliers(comps: dict[str, list[str]]) -> dict[str, int]:
    """How many times each computation runs per step, from while trip counts."""
    calls = collections.defaultdict(list)
    for parent, lines in comps.items():
        for line in lines:
            trips = 1
            if " while(" in line:
                m = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                trips = int(m.group(1)) if m else 1
            callees = re.findall(r"(?:body|condition|to_apply|calls)=%?([\w.\-]+)", line)
            # a conditional counts every branch as run (an upper bound: a pipeline stage's idle ticks skip theirs)
            for branches in re.findall(r"branch_computations=\{([^}]*)\}", line):
                callees += [b.strip().lstrip("%") for b in branches.split(",")]
            for callee in callees:
                calls[parent].append((callee, trips if "body=" in line or "condition=" in line else 1))
    called = {c for lst in calls.values() for c, _ in lst}
    roots = [c for c in comps if c not in called]
    mult = collections.Counter()

    def visit(name, m):
        mult[name] += m
        for callee, trips in calls.get(name, ()):
            if callee in comps:
                visit(callee, m * trips)

    for r in roots:
        visit(r, 1)
    return dict(mult)


class Collective(NamedTuple):
    """One collective instruction of a compiled program."""

    kind: str          # all-reduce, reduce-scatter, all-gather or all-to-all
    full_bytes: float  # size of the unsharded data it moves (all-gather: its result)
    group: int         # devices taking part
    runs: int          # executions per step (product of enclosing loop trip counts)
    axes: tuple = ()   # the mesh axes it runs over (when a mesh shape was given)
    groups: tuple = ()  # its device groups (ids in mesh order; permutes: the source-target pairs), when spelled

    @property
    def ring_bytes(self) -> float:
        """Bytes each device sends per step, ring-equivalent."""
        if self.kind == _PERMUTE:
            return self.full_bytes * self.runs
        factor = 2 if self.kind == "all-reduce" else 1
        return factor * self.full_bytes * (self.group - 1) / self.group * self.runs


def replica_groups(line: str) -> list[list[int]] | None:
    """The device groups of one collective instruction (explicit ``{{0,1},{2,3}}`` or the
    iota form ``[2,4]<=[4,2]T(1,0)``), or None when it does not spell them."""
    m = re.search(r"replica_groups=\{((?:\{[0-9,]*\},?)+)\}", line)
    if m:
        return [[int(d) for d in g.split(",") if d] for g in re.findall(r"\{([0-9,]*)\}", m.group(1))]
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", line)
    if not m:
        return None
    dims = [int(d) for d in m.group(3).split(",")]
    ids = list(range(math.prod(dims)))
    if m.group(4):
        perm = [int(p) for p in m.group(4).split(",")]
        strides = [math.prod(dims[i + 1:]) for i in range(len(dims))]
        shape = [dims[p] for p in perm]
        ids = [sum(idx[k] * strides[perm[k]] for k in range(len(perm))) for idx in _indices(shape)]
    size = int(m.group(2))
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def _indices(shape: list[int]):
    if not shape:
        yield ()
        return
    for i in range(shape[0]):
        for rest in _indices(shape[1:]):
            yield (i, *rest)


def group_axes(group: list[int], mesh_shape: dict[str, int]) -> tuple[str, ...]:
    """The mesh axes along which the devices of ``group`` (ids in mesh order) differ."""
    names, sizes = list(mesh_shape), list(mesh_shape.values())

    def coords(i):
        out = []
        for n in reversed(sizes):
            out.append(i % n)
            i //= n
        return out[::-1]

    first = coords(group[0])
    varying = set()
    for d in group[1:]:
        varying.update(k for k, c in enumerate(coords(d)) if c != first[k])
    return tuple(names[k] for k in sorted(varying))


def collectives(hlo: str, num_devices: int, mesh_shape: dict[str, int] | None = None) -> list[Collective]:
    """Every collective in ``hlo`` with its size, group and runs per step.

    Args:
      hlo: HLO text (``compiled.as_text()``).
      num_devices: group size to assume when an op does not spell its groups.
      mesh_shape: the mesh's axis sizes in order (``dict(mesh.shape)``); when given, each
        collective names the mesh axes it runs over.
    """
    comps = _computations(hlo)
    mult = _multipliers(comps)
    found = []
    for name, lines in comps.items():
        for line in lines:
            m = _NAMED_INSTR.match(line)
            if not m:
                continue
            _, result, op, _ = m.groups()
            kind = op.removesuffix("-start")
            if kind == _PERMUTE:
                pairs = re.search(r"source_target_pairs=\{\{(\d+),(\d+)\}", line)
                size = shape_bytes("%s[%s]" % _SHAPE.findall(result)[-1]) if op.endswith("-start") else shape_bytes(result)
                axes = ()
                if mesh_shape is not None and pairs:
                    axes = group_axes([int(pairs.group(1)), int(pairs.group(2))], mesh_shape)
                every = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)+)\}", line)
                groups = tuple(tuple(int(d) for d in p.split(",")) for p in re.findall(r"\{(\d+,\d+)\}", every.group(1))) \
                    if every else ()
                found.append(Collective(kind, size, 2, mult.get(name, 1), axes, groups))
                continue
            if kind not in _KINDS:
                continue
            n = _group_size(line, num_devices)
            if n <= 1:
                continue
            # Compiled HLO prints operand names without shapes: size everything from the
            # result (an async "-start" op returns (operand, result): take the last shape).
            shapes = _SHAPE.findall(result)
            size = shape_bytes("%s[%s]" % shapes[-1]) if op.endswith("-start") else shape_bytes(result)
            if kind == "reduce-scatter":
                size *= n
            axes = ()
            groups = replica_groups(line)
            if mesh_shape is not None:
                axes = group_axes(groups[0], mesh_shape) if groups else tuple(a for a, k in mesh_shape.items() if k > 1)
            found.append(Collective(kind, size, n, mult.get(name, 1), axes, tuple(map(tuple, groups or ()))))
    return found


def node_bytes(found: list[Collective], node_devices: int) -> dict[str, float]:
    """Ring-equivalent bytes per device per step of ``found`` split into ``intra`` (every group
    inside one node of ``node_devices`` consecutive device ids) and ``cross`` (a group spanning
    nodes, or groups not spelled in the HLO, counted as crossing).

    Example:
      >>> c = [Collective("all-to-all", 400.0, 4, 1, (), ((0, 1, 2, 3), (4, 5, 6, 7))),
      ...      Collective("all-to-all", 100.0, 2, 1, (), ((0, 4), (1, 5), (2, 6), (3, 7)))]
      >>> node_bytes(c, 4)
      {'intra': 300.0, 'cross': 50.0}
    """
    out = {"intra": 0.0, "cross": 0.0}
    for c in found:
        inside = bool(c.groups) and all(len({d // node_devices for d in g}) == 1 for g in c.groups)
        out["intra" if inside else "cross"] += c.ring_bytes
    return out


def collective_bytes(hlo: str, num_devices: int) -> dict[str, float]:
    """Ring-equivalent bytes per device of each collective kind in one step.

    Returns:
      ``{"all-reduce": b, "reduce-scatter": b, "all-gather": b, "all-to-all": b, "total": b}``.
    """
    out = dict.fromkeys(_KINDS, 0.0)
    for c in collectives(hlo, num_devices):
        out[c.kind] = out.get(c.kind, 0.0) + c.ring_bytes
    out["total"] = sum(out.values())
    return out


def matmul_flops(text: str) -> float:
    """FLOPs of every matmul in compiled HLO text, times the trip counts of its loops.

    ``2 x prod(result dims) x prod(contracted lhs dims)`` per ``dot``, or per cuBLAS
    gemm custom-call (what XLA:GPU turns dots into; its contracting dimensions are in
    the backend config); per device for a shard_map'd program. Elementwise work and
    ``convolution`` instructions are not counted.
    """
    comps = _computations(text)
    runs = _multipliers(comps)
    shapes: dict[str, dict[str, list[int]]] = {}
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            params = line[line.index("(") + 1: line.rindex("->")]
            shapes[header.group(1)] = {k: _dims(v) for k, v in _PARAM.findall(params)}
    total = 0.0
    for name, lines in comps.items():
        known = shapes.setdefault(name, {})
        for line in lines:
            m = _NAMED_INSTR.match(line)
            if not m:
                continue
            inst, result, op, rest = m.groups()
            found = _SHAPE.search(result)
            if found:
                known[inst] = _dims(found.group(2))
            gemm = op == "custom-call" and re.search(r'custom_call_target="[^"]*(gemm|matmul)', rest)
            if not found or not (op == "dot" or gemm):
                continue
            # An operand is ``%name``, or ``f32[8,16]{1,0} %name`` where the HLO prints shapes.
            lhs = re.match(r"\s*(?:[a-z][a-z0-9]*\[([0-9,]*)\]\S*\s+)?%?([\w.\-]+)", rest)
            if gemm:
                contracting = re.search(r'"lhs_contracting_dimensions":\[([0-9",]*)\]', rest)
            else:
                contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", rest)
            lhs_dims = None
            if lhs:
                lhs_dims = _dims(lhs.group(1)) if lhs.group(1) is not None else known.get(lhs.group(2))
            if lhs_dims is None or contracting is None:
                raise ValueError(f"cannot size this dot's operands in the HLO: {line.strip()[:200]}")
            k = math.prod(lhs_dims[int(i)] for i in contracting.group(1).replace('"', "").split(",") if i)
            total += 2 * math.prod(known[inst]) * k * runs.get(name, 1)
    return total


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def collective_schedule(text: str) -> list[tuple[str, bool, int]]:
    """Each collective of compiled HLO text: ``(kind, async, compute ops between start and done)``.

    An async collective is a ``<kind>-start`` / ``<kind>-done`` pair, or an
    ``async-start`` wrapping a computation that holds the collective. The compiled
    module is scheduled, so the instructions printed between start and done are the
    ones that run while the collective is in flight.
    """
    comps = _computations(text)
    parsed = {name: [m.groups() for line in lines if (m := _NAMED_INSTR.match(line))] for name, lines in comps.items()}
    wrapped = {}
    for name, instrs in parsed.items():
        for _, _, op, rest in instrs:
            if op == "async-start":
                called = re.search(r"calls=%?([\w.\-]+)", rest)
                if called and called.group(1) in parsed:
                    kinds = [o for _, _, o, _ in parsed[called.group(1)] if o in _KINDS]
                    if kinds:
                        wrapped[called.group(1)] = kinds[0]
    found = []
    for name, instrs in parsed.items():
        if name in wrapped:
            continue
        for i, (inst, _, op, rest) in enumerate(instrs):
            if op in _KINDS:
                found.append((op, False, 0))
                continue
            if op == "async-start":
                called = re.search(r"calls=%?([\w.\-]+)", rest)
                kind = wrapped.get(called.group(1)) if called else None
            else:
                kind = op.removesuffix("-start") if op.endswith("-start") else None
            if kind not in _KINDS:
                continue
            # Not a prefix of a longer name: %all-gather-start must not match %all-gather-start.1.
            uses = re.compile(rf"%{re.escape(inst)}(?![\w.\-])")
            between = 0
            for _, _, later_op, later_rest in instrs[i + 1:]:
                if later_op.endswith("-done") and uses.search(later_rest):
                    break
                if later_op not in _BOOKKEEPING and not later_op.endswith(("-start", "-done")):
                    between += 1
            found.append((kind, True, between))
    return found
