"""Memory planning: liveness-based reuse of one activation arena.

Every value that is neither a graph input, a weight nor a view of another buffer gets an
offset in one arena. Two values may share bytes when their live ranges (from the node that
defines them to the last node that reads them; graph outputs live to the end) do not
overlap. Placement is greedy by size: biggest first, each at the lowest 64-byte aligned
offset that does not collide with an already placed buffer whose lifetime overlaps.

Sizes are evaluated for given symbol sizes (e.g. T = max tokens per step); a plan made for
the largest T serves every smaller T, since buffers only shrink.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..ir import Graph, Value, ops
from ..ir.types import bind, itemsize
from .context import PassContext

ALIGN = 64
# outputs that alias an input: op -> {output index: input index}


@dataclass
class MemoryPlan:
    offsets: dict[int, int] = field(default_factory=dict)   # id(value) -> arena offset
    roots: dict[int, Value] = field(default_factory=dict)    # id(alias) -> value owning the bytes
    arena_bytes: int = 0
    naive_bytes: int = 0                                     # without reuse

    def root(self, v: Value) -> Value:
        return self.roots.get(id(v), v)


def nbytes(v: Value, sizes: dict[str, int]) -> int:
    n = 1
    for d in bind(v.shape, sizes):
        n *= d
    return n * itemsize(v.dtype)


def plan_memory(graph: Graph, sizes: dict[str, int]) -> MemoryPlan:
    plan = MemoryPlan()
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    for n in graph.nodes:
        for o, i in ops.get(n.op).aliases.items():   # views and in-place writes share a buffer
            plan.roots[id(n.outputs[o])] = plan.root(n.inputs[i])
    end = len(graph.nodes)
    live: dict[int, list] = {}  # id(root) -> [value, first, last]
    for n in graph.nodes:
        if n.op in ("input", "param"):
            continue
        for v in n.outputs:
            r = plan.root(v)
            if r.node.op in ("input", "param"):
                continue
            live.setdefault(id(r), [r, index[id(n)], index[id(n)]])
        for v in n.inputs:
            r = plan.root(v)
            if id(r) in live:
                live[id(r)][2] = max(live[id(r)][2], index[id(n)])
    for v in graph.outputs.values():
        r = plan.root(v)
        if id(r) in live:
            live[id(r)][2] = end
    placed: list[tuple[int, int, int, int]] = []  # (offset, size, first, last)
    for r, first, last in sorted(live.values(), key=lambda e: (-nbytes(e[0], sizes), e[1])):
        size = -(-nbytes(r, sizes) // ALIGN) * ALIGN
        plan.naive_bytes += size
        busy = sorted((o, s) for o, s, f, l in placed if not (l < first or last < f))
        off = 0
        for o, s in busy:
            if off + size <= o:
                break
            off = max(off, o + s)
        placed.append((off, size, first, last))
        plan.offsets[id(r)] = off
        plan.arena_bytes = max(plan.arena_bytes, off + size)
    return plan


def plan_memory_pass(graph: Graph, ctx: PassContext) -> Graph:
    """Record the peak activation bytes for a few batch sizes (reported by `reftc inspect`)."""
    report = {}
    top = int(ctx.options.get("max_batch_tokens", 512))
    for t in sorted({1, 16, 128, top}):
        p = plan_memory(graph, {"T": t, "R": t})
        report[str(t)] = {"arena_bytes": p.arena_bytes, "without_reuse_bytes": p.naive_bytes}
        if t == top:   # the plan a backend lays the arena out by (planned once, here)
            ctx.artifacts.setdefault("memory_plans", {})[graph.name] = p
    ctx.artifacts["memory"] = report
    ctx.count("buffers", len(plan_memory(graph, {"T": 1, "R": 1}).offsets))
    return graph
