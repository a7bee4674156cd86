"""Fold head split, optional q/k RMSNorm and rotary embedding into the q/k/v projection.

Pattern: y = linear(x, W[, b]); q, k, v = split(y); q, k, v = reshape(.., (T, heads, D));
[q = rms_norm(q, qn); k = rms_norm(k, kn)]; q = rope(q, pos[, ext]); k = rope(k, pos[, ext])
->  q, k, v = qkv_rope(x, W, [b], pos, [ext], [qn, kn]).
"""
from __future__ import annotations

from ..ir import Graph
from .context import PassContext
from .rewrite import Uses, make, replace


def _match(lin, uses):
    split = uses.only(lin.out)
    if not split or split.op != "split" or len(split.outputs) != 3:
        return None
    views = [uses.only(v) for v in split.outputs]
    if not all(v and v.op == "reshape" and v.out.type.rank == 3 for v in views):
        return None
    qv, kv, vv = views
    D = qv.out.shape[2]
    if kv.out.shape[2] != D or vv.out.shape[1:] != kv.out.shape[1:]:
        return None
    chain, ends, norms = [lin, split, *views], [], []
    for head in (qv, kv):
        n = uses.only(head.out)
        if n and n.op == "rms_norm":
            norms.append(n)
            chain.append(n)
            n = uses.only(n.out)
        if not n or n.op != "rope":
            return None
        chain.append(n)
        ends.append(n)
    if len(norms) == 1 or (norms and norms[0].attrs != norms[1].attrs):
        return None
    if ends[0].attrs != ends[1].attrs or any(a is not b for a, b in zip(ends[0].inputs[1:], ends[1].inputs[1:])):
        return None
    return chain, ends, norms, vv


def fuse_qkv_rope(graph: Graph, ctx: PassContext) -> Graph:
    uses = Uses(graph)
    for lin in [n for n in graph.nodes if n.op == "linear" and n.out.type.rank == 2]:
        m = _match(lin, uses)
        if not m:
            continue
        chain, (rq, rk), norms, vv = m
        inputs = list(lin.inputs) + list(rq.inputs[1:]) + [n.inputs[1] for n in norms]
        attrs = dict(rq.attrs, heads=rq.out.shape[1], kv_heads=rk.out.shape[1], head_dim=rq.out.shape[2],
                     bias=len(lin.inputs) == 3, qk_norm=bool(norms))
        if norms:
            attrs.update(norms[0].attrs)     # eps (and offset)
        fused = make("qkv_rope", inputs, **attrs)
        q, k, v = fused.outputs
        replace(graph, fused, lin, [(rq.out, q), (rk.out, k), (vv.out, v)], chain)
        uses = Uses(graph)
        ctx.fused(fused, chain)
    return graph
