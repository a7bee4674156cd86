"""Merge nodes that compute the same thing: same op, same inputs, same attributes.

Params with the same name are one weight. Side-effecting nodes and graph inputs are never merged.
"""
from __future__ import annotations

from ..ir import Graph, ops
from .context import PassContext


def eliminate_common_subexpressions(graph: Graph, ctx: PassContext) -> Graph:
    never = ops.ops_with(ops.SIDE_EFFECT) | {"input"}
    seen: dict[tuple, object] = {}
    replace: dict[int, object] = {}
    kept = []
    for n in graph.nodes:
        n.inputs = [replace.get(id(v), v) for v in n.inputs]
        if n.op in never:
            kept.append(n)
            continue
        key = n.key()
        if key in seen:
            for old, new in zip(n.outputs, seen[key].outputs):
                replace[id(old)] = new
            ctx.count("merged")
            continue
        seen[key] = n
        kept.append(n)
    graph.nodes = kept
    graph.outputs = {k: replace.get(id(v), v) for k, v in graph.outputs.items()}
    return graph
