"""Remove nodes whose results reach no graph output. Graph inputs (the signature) and
side-effecting nodes stay."""
from __future__ import annotations

from ..ir import Graph, ops
from .context import PassContext


def eliminate_dead_code(graph: Graph, ctx: PassContext) -> Graph:
    live: set[int] = {id(v.node) for v in graph.outputs.values()}
    keep_always = ops.ops_with(ops.SIDE_EFFECT) | {"input"}
    for n in reversed(graph.nodes):
        if n.op in keep_always:
            live.add(id(n))
        if id(n) in live:
            live.update(id(v.node) for v in n.inputs)
    before = len(graph.nodes)
    graph.nodes = [n for n in graph.nodes if id(n) in live]
    ctx.count("removed", before - len(graph.nodes))
    return graph
