"""Reading collective traffic out of compiled HLO text.

Counts every all-reduce, reduce-scatter, all-gather and all-to-all, multiplied by the
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
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_KINDS = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all")


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
            for callee in re.findall(r"(?:body|condition|to_apply|calls|branch_computations)=\{?%?([\w.\-]+)", line):
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

    @property
    def ring_bytes(self) -> float:
        """Bytes each device sends per step, ring-equivalent."""
        factor = 2 if self.kind == "all-reduce" else 1
        return factor * self.full_bytes * (self.group - 1) / self.group * self.runs


def collectives(hlo: str, num_devices: int) -> list[Collective]:
    """Every collective in ``hlo`` with its size, group and runs per step.

    Args:
      hlo: HLO text (``compiled.as_text()``).
      num_devices: group size to assume when an op does not spell its groups.
    """
    comps = _computations(hlo)
    mult = _multipliers(comps)
    found = []
    for name, lines in comps.items():
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            result, op, _ = m.groups()
            kind = op.removesuffix("-start")
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
            found.append(Collective(kind, size, n, mult.get(name, 1)))
    return found


def collective_bytes(hlo: str, num_devices: int) -> dict[str, float]:
    """Ring-equivalent bytes per device of each collective kind in one step.

    Returns:
      ``{"all-reduce": b, "reduce-scatter": b, "all-gather": b, "all-to-all": b, "total": b}``.
    """
    out = dict.fromkeys(_KINDS, 0.0)
    for c in collectives(hlo, num_devices):
        out[c.kind] += c.ring_bytes
    out["total"] = sum(out[k] for k in _KINDS)
    return out
