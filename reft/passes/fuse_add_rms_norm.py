"""Fuse a residual add with the RMSNorm that reads it: add + rms_norm -> add_rms_norm.

Pattern: s = add(x, r) (same shapes); y = rms_norm(s, w). The sum stays an output of the
fused node because the next residual add reads it.
"""
from __future__ import annotations

from ..ir import Graph
from .context import PassContext
from .rewrite import Uses, make, replace


def fuse_add_rms_norm(graph: Graph, ctx: PassContext) -> Graph:
    uses = Uses(graph)
    for add in [n for n in graph.nodes if n.op == "add"]:
        x, r = add.inputs
        if x.type != r.type:
            continue
        norms = [u for u in uses.of(add.out) if u.op == "rms_norm" and u.inputs[0] is add.out]
        if not norms:
            continue
        norm = norms[0]
        fused = make("add_rms_norm", [x, r, norm.inputs[1]], **norm.attrs)
        replace(graph, fused, add, [(add.out, fused.outputs[0]), (norm.out, fused.outputs[1])], [add, norm])
        uses = Uses(graph)
        ctx.fused(fused, [add, norm])
    return graph
