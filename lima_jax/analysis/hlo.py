"""Accounting of a compiled program's HLO text: which computations run how often per step (while loops
times their trip count), the collectives executed and their bytes, and the FLOPs of its `dot`s.

  HloModule.parse   the computations of the text and how often each runs per execution of ENTRY
  collective_stats  {kind: {"count", "bytes"}} of the collectives run per step, per device
  dot_flops         2 * output size * contracted size over every `dot` run (CPU/GPU HLO)
"""
from __future__ import annotations

import dataclasses
import math
import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLEE = re.compile(r"\b(?:body|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_OP = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start|-done)?\(")
_S32_CONSTANT = re.compile(r"=\s*s32\[\]\S*\s+constant\((\d+)\)")
_FUSED_REDUCE_SCATTER = re.compile(r"=\s*(.+?)\s+fusion\(.*calls=%?all-reduce-scatter")
_SHAPE = re.compile(r"\b(pred|s4|u4|s8|u8|s16|u16|s32|u32|s64|u64|f8\w*|bf16|f16|f32|f64|c64|c128)\[([\d,]*)\]")
_BITS = {"pred": 8, "s4": 4, "u4": 4, "c64": 64, "c128": 128}


def _shape_bytes(text: str) -> int:
    """Bytes of every array shape in an HLO type string (a tuple sums its elements)."""
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        bits = _BITS.get(dtype) or (8 if dtype.startswith("f8") else int(re.sub(r"\D", "", dtype)))
        total += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
    return total


@dataclasses.dataclass
class HloModule:
    """The computations of an HLO module's text and how often each runs per execution of ENTRY."""

    computations: dict[str, list[str]]
    runs: dict[str, int]

    @classmethod
    def parse(cls, hlo_text: str) -> "HloModule":
        computations: dict[str, list[str]] = {}
        entry, current = None, None
        for line in hlo_text.splitlines():
            header = _COMPUTATION.match(line)
            if header and not line.startswith(" "):
                current = header.group(1)
                computations[current] = []
                if line.startswith("ENTRY"):
                    entry = current
            elif current is not None and line.strip() == "}":
                current = None
            elif current is not None:
                computations[current].append(line)
        if entry is None:
            raise ValueError("no ENTRY computation in the HLO text")
        runs: dict[str, int] = {}

        def visit(name: str, times: int) -> None:
            runs[name] = runs.get(name, 0) + times
            for line in computations.get(name, ()):
                if _FUSED_REDUCE_SCATTER.search(line):
                    continue  # counted as one reduce-scatter by collective_stats
                callees = _CALLEE.findall(line)
                for group in _BRANCHES.findall(line):
                    callees += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
                for callee in callees:
                    if callee in computations:  # a while body runs trip-count times (once if unknown)
                        is_body = re.search(rf"\bbody=%?{re.escape(callee)}(?:[,\s]|$)", line) is not None
                        visit(callee, times * (_trip_count(line, computations) if is_body else 1))

        visit(entry, 1)
        return cls(computations, runs)

    def lines(self):
        """(line, times it runs) for every instruction reachable from ENTRY."""
        for name, times in self.runs.items():
            for line in self.computations[name]:
                yield name, line, times


def _trip_count(while_line: str, computations: dict[str, list[str]]) -> int:
    """A while loop's trip count: XLA's known_trip_count, else the one s32 bound its condition compares
    against (the `i < N` of a scan); 1 when neither is there."""
    known = _TRIP_COUNT.search(while_line)
    if known:
        return int(known.group(1))
    condition = re.search(r"\bcondition=%?([\w.\-]+)", while_line)
    lines = computations.get(condition.group(1), []) if condition else []
    bounds = [int(m.group(1)) for line in lines for m in [_S32_CONSTANT.search(line)] if m]
    if len(bounds) == 1 and any("direction=LT" in line for line in lines):
        return bounds[0]
    return 1


def collective_stats(module: HloModule) -> dict[str, dict[str, int]]:
    """{kind: {"count", "bytes"}} of the collectives executed per run of the module (per device).

    Each op counts as often as its computation runs: loop bodies times their known trip count. Bytes are
    the op's result size (for async ops, the `-done` result).
    """
    stats = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
    for _, line, times in module.lines():
        fused = _FUSED_REDUCE_SCATTER.search(line)
        if fused:  # TPU: a reduce-scatter implemented as a fusion around an all-reduce
            stats["reduce-scatter"]["count"] += times
            stats["reduce-scatter"]["bytes"] += times * _shape_bytes(fused.group(1))
            continue
        op = _OP.search(line)
        if not op or op.group(3) == "-start":
            continue
        stats[op.group(2)]["count"] += times
        stats[op.group(2)]["bytes"] += times * _shape_bytes(op.group(1))
    return stats


_DEF = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\S+?\[[\d,]*\])")
_DOT = re.compile(r"=\s*\S+?\[([\d,]*)\]\S*\s+dot\((?:\S+\[[\d,]*\]\S*\s+)?%([\w.\-]+)")
_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")


def dot_flops(module: HloModule) -> float:
    """2 * output size * contracted size, summed over every `dot` executed (loop bodies trip-count times)."""
    shapes: dict[tuple[str, str], list[int]] = {}
    for name, line, _ in module.lines():
        definition = _DEF.match(line)
        if definition:
            dims = definition.group(2).split("[", 1)[1].rstrip("]")
            shapes[(name, definition.group(1))] = [int(d) for d in dims.split(",") if d]
    total = 0.0
    for name, line, times in module.lines():
        dot = _DOT.search(line)
        contracting = _CONTRACTING.search(line)
        if not dot or not contracting or (name, dot.group(2)) not in shapes:
            continue
        lhs = shapes[(name, dot.group(2))]
        out = math.prod(int(d) for d in dot.group(1).split(",") if d)
        contracted = math.prod(lhs[int(i)] for i in contracting.group(1).split(",") if i)
        total += 2.0 * out * contracted * times
    return total
