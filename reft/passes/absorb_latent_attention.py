"""Multi-head latent attention in the absorbed form: attend over the latent, never over expanded heads.

DeepSeek's model file writes MLA naively (models/deepseek_v3.py): the per-token latent c_kv [T, C]
is expanded by kv_b_proj into every head's key and value, and ordinary attention runs on them:

    kv = linear(c_kv, W_kv_b)                          W_kv_b [H * (Dn + Dv), C]
    k_nope, v = split(reshape(kv, (T, H, Dn + Dv)))    (T, H, Dn), (T, H, Dv)
    k = concat(k_nope, concat(k_rot x H, axis=1))      k_rot (T, 1, R): one rope key for all heads
    q = concat(q_nope, q_rot)
    o = causal_attention(q, k, v, pos, sid)            (T, H, Dv)

With W_UK[h] [Dn, C] and W_UV[h] [Dv, C] head h's rows of W_kv_b, q_nope . k_nope = (W_UK[h]^T q_nope) . c
and p . v = W_UV[h] (p . c), so the same attention is

    q_lat = head_linear(q_nope, W_UK^T)                W_UK^T [H, C, Dn] -> (T, H, C)
    o_lat = latent_attention(q_lat, q_rot, c_kv, reshape(k_rot, (T, R)), pos, sid)     (T, H, C)
    o     = head_linear(o_lat, W_UV)                   W_UV [H, Dv, C]  -> (T, H, Dv)

which reads C + R numbers per key instead of H * (Dn + R + Dv): the paged-KV pass then caches only
[c_kv; k_rot] per token (latent_cache_write / paged_latent_attention, reft/ir/ops/mla.py). The two
weights are made at compile time from kv_b_proj (`<module>.absorbed_k.weight`, `.absorbed_v.weight`;
a GGUF-quantized kv_b_proj is dequantized first); the expansion left behind is dead code for the DCE
that follows. Every batch shape (prompts too) takes this form: one forward graph serves prefill,
decode and mixed batches, and a row's result does not depend on which path its batch took.

Only attention without a sliding window or soft-capping matches (MLA has neither). Counts
`absorbed_layers`.
"""
from __future__ import annotations

import numpy as np

from ..ir import Graph, Node, Value, ops
from ..ir.quantized import dequantize_rows
from ..ir.types import TensorType
from .context import PassContext
from .rewrite import make


def _last_axis(n: Node) -> bool:
    return n.attrs["axis"] in (-1, n.out.type.rank - 1)


def _shared_rope_key(v: Value, H: int) -> Value | None:
    """k_rot (T, 1, R) if v is it repeated for H heads (concat on the head axis), or is it (H = 1)."""
    if H == 1 and v.type.shape[1] == 1:
        return v
    n = v.node
    if n.op == "concat" and n.attrs["axis"] in (1, -2) and len(n.inputs) == H and all(x is n.inputs[0] for x in n.inputs):
        return n.inputs[0] if n.inputs[0].type.shape[1] == 1 else None
    return None


def _match(n: Node):
    """(q_nope, q_rot, c_kv, k_rot, kv_b param) of a naive MLA causal_attention, or None."""
    a = ops.get(n.op).full_attrs(n.attrs)
    if a["sliding_window"] or a["softcap"]:
        return None
    q, k, v = n.inputs[:3]
    qc, kc, sp = q.node, k.node, v.node
    if not (qc.op == kc.op == "concat" and len(qc.inputs) == len(kc.inputs) == 2 and _last_axis(qc) and _last_axis(kc)):
        return None
    if sp.op != "split" or len(sp.outputs) != 2 or kc.inputs[0] is not sp.outputs[0] or v is not sp.outputs[1]:
        return None
    view = sp.inputs[0].node
    lin = view.inputs[0].node if view.op == "reshape" else None
    if lin is None or lin.op != "linear" or len(lin.inputs) != 2 or lin.inputs[1].node.op != "param":
        return None
    H = q.type.shape[1]
    k_rot = _shared_rope_key(kc.inputs[1], H)
    q_nope, q_rot = qc.inputs
    c_kv, w = lin.inputs
    if k_rot is None or c_kv.type.rank != 2 or q_nope.type.shape != kc.inputs[0].type.shape \
            or q_rot.type.shape[2] != k_rot.type.shape[2]:
        return None
    return q_nope, q_rot, c_kv, k_rot, w


def _absorbed_params(ctx: PassContext, w: Value, H: int, Dn: int, made: dict) -> tuple[Node, Node]:
    """param nodes W_UK^T [H, C, Dn] and W_UV [H, Dv, C] made from kv_b_proj [H * (Dn + Dv), C]."""
    name = w.node.name
    if name in made:
        return made[name]
    N, C = w.shape
    Dv = N // H - Dn
    dtype = "float32" if w.type.quantized else w.dtype
    store = ctx.weights

    def heads():
        x = store[name]
        x = dequantize_rows(x, w.dtype, C) if w.type.quantized else np.asarray(x)
        return x.reshape(H, Dn + Dv, C)

    base = name.removesuffix(".weight")
    uk, uv = f"{base}.absorbed_k.weight", f"{base}.absorbed_v.weight"
    store.define(uk, lambda: np.ascontiguousarray(heads()[:, :Dn].transpose(0, 2, 1)))
    store.define(uv, lambda: np.ascontiguousarray(heads()[:, Dn:]))
    made[name] = (Node("param", [], {"name": uk}, [TensorType((H, C, Dn), dtype)]),
                  Node("param", [], {"name": uv}, [TensorType((H, Dv, C), dtype)]))
    return made[name]


def absorb_latent_attention(graph: Graph, ctx: PassContext) -> Graph:
    made: dict[str, tuple[Node, Node]] = {}
    for n in [n for n in graph.nodes if n.op == "causal_attention"]:
        m = _match(n)
        if m is None:
            continue
        q_nope, q_rot, c_kv, k_rot, w = m
        T, H, Dn = q_nope.type.shape
        if w.shape[0] % H or w.shape[0] // H <= Dn or w.shape[1] != c_kv.type.shape[1]:
            continue
        uk, uv = _absorbed_params(ctx, w, H, Dn, made)
        q_lat = make("head_linear", [q_nope, uk.out])                                  # (T, H, C)
        kr = make("reshape", [k_rot], shape=(T, k_rot.type.shape[2]))                  # (T, R)
        att = make("latent_attention", [q_lat.out, q_rot, c_kv, kr.out, *n.inputs[3:]], scale=n.attrs["scale"])
        out = make("head_linear", [att.out, uv.out])                                   # (T, H, Dv)
        new = [x for x in (uk, uv) if x not in graph.nodes] + [q_lat, kr, att, out]
        at = graph.nodes.index(n)
        graph.nodes[at:at] = new
        graph.replace_uses(n.out, out.out)
        graph.nodes.remove(n)
        ctx.count("absorbed_layers")
    return graph
