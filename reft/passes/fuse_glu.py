"""Fold the gated activation into the gate/up projection: SiLU(gate) * up in the epilogue.

Pattern: y = linear(x, W[, b]); g, u = split(y, sizes=(F, F)); a = silu(g) | gelu_tanh(g);
m = mul(a, u) or mul(u, a)  ->  m = linear_glu(x, W[, b], act). The experts' gate/up projection
(`expert_linear`, after fuse_projections) becomes `expert_glu` the same way, and so does GPT-OSS's
two-input activation m = swiglu_oai(g, u) {alpha, limit} (experts only: act "swiglu_oai").
"""
from __future__ import annotations

from ..ir import Graph
from .context import PassContext
from .rewrite import Uses, make, replace

GLU = {"linear": "linear_glu", "expert_linear": "expert_glu"}   # projection -> its fused form


def fuse_glu(graph: Graph, ctx: PassContext) -> Graph:
    uses = Uses(graph)
    for lin in [n for n in graph.nodes if n.op in GLU]:
        split = uses.only(lin.out)
        if not split or split.op != "split" or len(split.outputs) != 2 or split.attrs["axis"] not in (-1, lin.out.type.rank - 1):
            continue
        g, u = split.outputs
        if g.shape != u.shape:
            continue
        act = uses.only(g)
        if act and act.op == "swiglu_oai" and lin.op == "expert_linear":
            _fuse_gated(graph, ctx, uses, lin, split, act)
            uses = Uses(graph)
            continue
        if not act or act.op not in ("silu", "gelu_tanh"):
            continue
        mul = uses.only(act.out)
        if not mul or mul.op != "mul" or {id(v) for v in mul.inputs} != {id(act.out), id(u)} or uses.only(u) is not mul:
            continue
        fused = make(GLU[lin.op], list(lin.inputs), act=act.op)
        replace(graph, fused, lin, [(mul.out, fused.out)], [lin, split, act, mul])
        uses = Uses(graph)
        ctx.fused(fused, [lin, split, act, mul], f"fused_{act.op}")
    return graph


def _fuse_gated(graph: Graph, ctx: PassContext, uses: Uses, lin, split, act) -> None:
    """expert_linear -> split -> swiglu_oai(gate, up)  ->  expert_glu(act="swiglu_oai")."""
    g, u = split.outputs
    if act.inputs[0] is not g or act.inputs[1] is not u or uses.only(u) is not act:
        return
    fused = make("expert_glu", list(lin.inputs), act=act.op, **act.attrs)
    replace(graph, fused, lin, [(act.out, fused.out)], [lin, split, act])
    ctx.fused(fused, [lin, split, act], f"fused_{act.op}")
