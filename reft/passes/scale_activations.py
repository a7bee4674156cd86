"""Activation-aware weight scaling before quantization (`reftc compile --quant ... --calibrate FILE`).

AWQ's observation: input channels that carry large activations matter most, so scale them up in
the weight before rounding and down in the activation. Here the activation side is folded into
the RMSNorm weight that produces the matmul's input, so the graph computes the same function
(up to float rounding) and only the quantization error changes:

    y = linear(rms_norm(h, g), W)  ==  linear(rms_norm(h, g / s), W * s)      (s per input channel)

(for a norm with an offset, scaling by o + g: g becomes (o + g) / s - o)

with s = mean|x|^alpha over a calibration text (alpha = 0.5, normalised to geometric mean 1).
Option `calibration_ids` (token ids, set by the compiler) runs the float graph once on the
reference executor to measure mean|x|. Applies to every linear fed by an rms_norm whose output
only linears read (q/k/v and gate/up after fuse_projections). Counter: `scaled`.
"""
from __future__ import annotations

import numpy as np

from ..ir.interpret import ReferenceExecutor
from ..errors import ReftError
from ..ir import Graph, parse_graph, print_graph
from ..ir.types import FLOAT_DTYPES
from .context import PassContext

ALPHA = 0.5


def _candidates(graph: Graph) -> list:
    """(norm node, [linear nodes]) where the norm's output feeds only float-weight linears."""
    users = graph.users()
    outs = {id(v) for v in graph.outputs.values()}
    found = []
    for n in graph.nodes:
        if n.op != "rms_norm" or n.inputs[1].node.op != "param" or id(n.out) in outs:
            continue
        readers = users.get(id(n.out), [])
        lin = [u for u in readers if u.op == "linear" and u.inputs[0] is n.out and u.inputs[1].node.op == "param"
               and u.inputs[1].dtype in FLOAT_DTYPES and len(users.get(id(u.inputs[1]), [])) == 1]
        norm_users = users.get(id(n.inputs[1]), [])
        if readers and len(lin) == len(readers) and len(norm_users) == 1:
            found.append((n, lin))
    return found


def _feeds(graph: Graph, ids: np.ndarray) -> dict:
    T = len(ids)
    known = {"input_ids": ids.astype(np.int32), "positions": np.arange(T, dtype=np.int32),
             "seq_ids": np.zeros(T, np.int32), "logit_rows": np.array([T - 1], np.int32)}
    missing = [n.name for n in graph.inputs() if n.name not in known]
    if missing:
        raise ReftError(f"--calibrate: cannot feed graph input {missing[0]!r} for calibration")
    return {n.name: known[n.name].astype(n.out.dtype) for n in graph.inputs()}


def scale_activations(graph: Graph, ctx: PassContext) -> Graph:
    ids = ctx.options.get("calibration_ids")
    if ids is None or not ctx.options.get("quant"):
        return graph
    found = _candidates(graph)
    if not found:
        return graph
    probe = parse_graph(print_graph(graph))          # the same graph with the norm outputs as outputs
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    probe.outputs = {f"act{j}": probe.nodes[index[id(norm)]].out for j, (norm, _) in enumerate(found)}
    acts = ReferenceExecutor(probe, ctx.weights).run(_feeds(graph, np.asarray(ids)))
    for j, (norm, linears) in enumerate(found):
        mag = np.abs(acts[f"act{j}"].astype(np.float32)).reshape(-1, norm.out.shape[-1]).mean(axis=0)
        s = np.maximum(mag, 1e-5) ** ALPHA
        s = (s / np.exp(np.log(s).mean())).astype(np.float32)
        o = np.float32(norm.attrs.get("offset", 0.0))
        if o:        # a norm that scales by (o + g) (Gemma): the folded weight keeps the offset
            ctx.weights.transform(norm.inputs[1].node.name,
                                  lambda g, s=s, o=o: ((g.astype(np.float32) + o) / s - o).astype(g.dtype))
        else:
            ctx.weights.transform(norm.inputs[1].node.name, lambda g, s=s: (g.astype(np.float32) / s).astype(g.dtype))
        for lin in linears:
            ctx.weights.transform(lin.inputs[1].node.name, lambda w, s=s: (w.astype(np.float32) * s).astype(w.dtype))
        ctx.count("scaled", len(linears))
    return graph
