"""Rewrite `causal_attention` over the batch into KV-cache page reads and writes.

Each attention layer i gets two graph inputs, `kv_cache.{i}.k` / `kv_cache.{i}.v` of shape
[NP, page_size, Hkv, D] (NP pages in the pool, owned by the runtime), and all layers share
the input `page_table[S, MP]` (page ids of each sequence). Per layer:

    causal_attention(q, k, v, pos, sid[, sinks])
 -> kc', vc' = kv_cache_write(kc, vc, k, v, pos, sid, page_table)
    paged_attention(q, kc', vc', pos, sid, page_table[, sinks])

Latent attention (MLA after absorb_latent_attention) caches one [latent; rope key] row per token
instead: one input `kv_cache.{i}.latent` of shape [NP, page_size, 1, C + R] (no separate V), and

    latent_attention(q_lat, q_rope, c, k_rope, pos, sid)
 -> lc' = latent_cache_write(lc, c, k_rope, pos, sid, page_table)
    paged_latent_attention(q_lat, q_rope, lc', pos, sid, page_table)
"""
from __future__ import annotations

from ..ir import Graph, Node, ops
from ..ir.types import TensorType
from .context import PassContext


def _input(name: str, t: TensorType) -> Node:
    return Node("input", [], {"name": name}, [t])


def _node(op: str, args, **attrs) -> Node:
    return Node(op, args, attrs, ops.infer_types(op, [a.type for a in args], attrs))


def _lower_latent(graph: Graph, n: Node, i: int, table, page_size: int, kv_dtype: str) -> Node:
    """latent_attention -> latent_cache_write + paged_latent_attention; returns the cache input."""
    ql, qr, lat, kr, pos, sid = n.inputs
    width = lat.type.shape[1] + kr.type.shape[1]
    cache = _input(f"kv_cache.{i}.latent", TensorType(("NP", page_size, 1, width), kv_dtype))
    write = _node("latent_cache_write", [cache.out, lat, kr, pos, sid, table])
    read = _node("paged_latent_attention", [ql, qr, write.out, pos, sid, table], **n.attrs)
    at = graph.nodes.index(n)
    graph.nodes[at:at + 1] = [write, read]
    graph.replace_uses(n.out, read.out)
    return cache


def lower_paged_attention(graph: Graph, ctx: PassContext) -> Graph:
    page_size = int(ctx.options.get("page_size", 16))
    kv_dtype = ctx.options.get("kv_dtype", "float32")
    attn = [n for n in graph.nodes if n.op in ("causal_attention", "latent_attention")]
    if not attn:
        return graph
    new_inputs = [_input("page_table", TensorType(("S", "MP"), "int32"))]
    table = new_inputs[0].out
    for i, n in enumerate(attn):
        if n.op == "latent_attention":
            new_inputs.append(_lower_latent(graph, n, i, table, page_size, kv_dtype))
            ctx.count("paged_latent_layers")
            continue
        q, k, v, pos, sid = n.inputs[:5]
        cache_t = TensorType(("NP", page_size) + k.shape[1:], kv_dtype)
        kc, vc = _input(f"kv_cache.{i}.k", cache_t), _input(f"kv_cache.{i}.v", cache_t)
        new_inputs += [kc, vc]
        write = _node("kv_cache_write", [kc.out, vc.out, k, v, pos, sid, table])
        read = _node("paged_attention", [q, *write.outputs, pos, sid, table, *n.inputs[5:]], **n.attrs)
        at = graph.nodes.index(n)
        graph.nodes[at:at + 1] = [write, read]
        graph.replace_uses(n.out, read.out)
        ctx.count("paged_layers")
    # new inputs go after the graph's leading inputs, before any node that could use them
    at = next((i for i, n in enumerate(graph.nodes) if n.op != "input"), len(graph.nodes))
    graph.nodes[at:at] = new_inputs
    return graph
