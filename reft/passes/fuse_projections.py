"""Fuse matmuls that read the same input into one (q/k/v -> qkv, gate/up -> gate_up).

Pattern: two or more `linear(x, param W_i [, param b_i])` on the same x, with weights of the
same dtype and all-or-none biases.  Replacement: one `linear(x, W, b)` whose weight is the
row-wise concatenation of the W_i, made at compile time, followed by a `split`.
The fused weight is named after its parts: `model.layers.0.self_attn.q_proj+k_proj+v_proj.weight`.
Mixture-of-experts gate/up projections fuse alike: `expert_linear(x, order, offsets, W_i)` on the
same x and dispatch, with stacked weights [E, N_i, K] joined expert by expert ([E, sum N_i, K]),
and their biases [E, N_i] (GPT-OSS) likewise. A mixture-of-experts router (a linear feeding
`moe_router`) never fuses: DeepSeek-V3's shared experts read the router's input too.
"""
from __future__ import annotations

import numpy as np

from ..ir import Graph, Node, ops
from ..ir.types import TensorType
from .context import PassContext


def fused_name(names: list[str]) -> str:
    """Common dotted prefix and suffix kept, the differing middles joined with '+'."""
    parts = [n.split(".") for n in names]
    pre = 0
    while all(len(p) > pre + 1 for p in parts) and len({p[pre] for p in parts}) == 1:
        pre += 1
    suf = 0
    while all(len(p) > pre + suf + 1 for p in parts) and len({p[-1 - suf] for p in parts}) == 1:
        suf += 1
    mids = [".".join(p[pre:len(p) - suf]) for p in parts]
    return ".".join(parts[0][:pre] + ["+".join(mids)] + (parts[0][len(parts[0]) - suf:] if suf else []))


# matmuls that fuse: op -> (index of the weight; the inputs before it must be shared, those after
# it are biases), axis of the weight's output rows, counter prefix
FUSABLE = {"linear": (1, 0, "fused"), "expert_linear": (3, 1, "fused_experts")}


def _groups(graph: Graph) -> list[list[Node]]:
    by_input: dict[tuple, list[Node]] = {}
    users = graph.users()
    for n in graph.nodes:
        if n.op in FUSABLE and all(v.node.op == "param" for v in n.inputs[FUSABLE[n.op][0]:]):
            if any(u.op == "moe_router" for u in users.get(id(n.out), [])):
                continue   # a router stays its own float matmul (quantize_weights keeps it float)
            key = (n.op, *(id(v) for v in n.inputs[:FUSABLE[n.op][0]]))
            by_input.setdefault(key, []).append(n)
    groups = []
    for nodes in by_input.values():
        # all-or-none bias and one weight dtype per group; split into compatible subgroups
        buckets: dict[tuple, list[Node]] = {}
        for n in nodes:
            buckets.setdefault((len(n.inputs), n.inputs[FUSABLE[n.op][0]].dtype), []).append(n)
        groups += [g for g in buckets.values() if len(g) > 1]
    return groups


def _fused_param(ctx: PassContext, sources: list, where: list, axis: int = 0) -> Node:
    names = [v.node.name for v in sources]
    name = fused_name(names)
    shape = list(sources[0].shape)
    shape[axis] = sum(v.shape[axis] for v in sources)
    t = TensorType(tuple(shape), sources[0].dtype)
    ws = ctx.weights
    ws.define(name, lambda names=tuple(names): np.concatenate([ws[n] for n in names], axis=axis))
    node = Node("param", [], {"name": name}, [t])
    where.append(node)
    return node


def fuse_projections(graph: Graph, ctx: PassContext) -> Graph:
    for group in _groups(graph):
        new: list[Node] = []
        op = group[0].op
        wi, axis, counter = FUSABLE[op]
        w = _fused_param(ctx, [n.inputs[wi] for n in group], new, axis)
        args = [*group[0].inputs[:wi], w.out]
        for j in range(wi + 1, len(group[0].inputs)):   # biases: [N], or [E, N] per expert, joined like the rows
            args.append(_fused_param(ctx, [n.inputs[j] for n in group], new, axis).out)
        lin = Node(op, args, {}, ops.infer_types(op, [a.type for a in args], {}))
        sizes = tuple(n.out.shape[-1] for n in group)
        split_attrs = {"axis": -1, "sizes": sizes}
        split = Node("split", [lin.out], split_attrs, ops.infer_types("split", [lin.out.type], split_attrs))
        new += [lin, split]
        at = graph.nodes.index(group[0])
        graph.nodes[at:at] = new
        for n, part in zip(group, split.outputs):
            graph.replace_uses(n.out, part)
        for n in group:
            graph.nodes.remove(n)
        ctx.count(f"{counter}_{len(group)}")
    return graph
