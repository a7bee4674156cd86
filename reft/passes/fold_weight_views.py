"""Fold view ops on weights into the weights: a reshape or transpose of a graph weight becomes a
weight itself, computed once at compile time.

Pattern: reshape(param W) | transpose(param W)  ->  param `W|reshape(..)` / `W|transpose(..)`, its
value the op's reference applied to W's (a lazy WeightStore entry). Nodes fold in graph order, so a
chain of views folds whole, one op at a time; the weights a fold leaves unused go with the following
eliminate_dead_code, and only the chain's last value is ever materialised.

Why: a family whose checkpoint stores a weight in another layout than the ops read writes the
reordering as views and keeps the checkpoint's names (models/gpt_oss.py: the experts' x @ W
tensors with gate and up interleaved become reft's [E, N, K] stacks), and the plan stores the
reordered weight, so no kernel ever copies it. Block-quantized weights stay as they are (their bytes
are blocks of the last dimension).

Counters: `folded_reshape`, `folded_transpose`.
"""
from __future__ import annotations

from ..ir import Graph, Node, ops
from ..ir.types import FLOAT_DTYPES
from .context import PassContext

VIEWS = {"reshape": "shape", "transpose": "perm"}   # op -> the attribute that says which view


def fold_weight_views(graph: Graph, ctx: PassContext) -> Graph:
    made: dict[str, Node] = {}      # folded name -> its param node (a view taken twice folds once)
    nodes = []
    for n in graph.nodes:
        src = n.inputs[0].node if n.op in VIEWS else None
        if src is None or src.op != "param" or src.out.dtype not in FLOAT_DTYPES:
            nodes.append(n)
            continue
        name = f"{src.name}|{n.op}({','.join(str(d) for d in n.attrs[VIEWS[n.op]])})"
        if name not in made:
            d, attrs, ws = ops.get(n.op), ops.get(n.op).full_attrs(n.attrs), ctx.weights
            ws.define(name, lambda d=d, attrs=attrs, s=src.name: d.ref([ws[s]], attrs)[0].copy())
            made[name] = Node("param", [], {"name": name}, [n.out.type])
            nodes.append(made[name])
            ctx.count(f"folded_{n.op}")
        graph.replace_uses(n.out, made[name].out)
    graph.nodes = nodes
    return graph

