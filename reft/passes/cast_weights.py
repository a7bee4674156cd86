"""Store matrices (embeddings, projections, LM head) in the plan's weight dtype.

1-D weights (norm scales, biases) become float32, the compute dtype, whatever the
checkpoint stored. Ops read weights of any float dtype and compute in float32, so no other
node changes.
"""
from __future__ import annotations

from ..ir import Graph
from ..ir.types import FLOAT_DTYPES, TensorType, np_dtype
from .context import PassContext


def cast_weights(graph: Graph, ctx: PassContext) -> Graph:
    dtype = ctx.options.get("weight_dtype", "float32")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"weight dtype must be one of {sorted(FLOAT_DTYPES)}, got {dtype!r}")
    for n in graph.params():
        v = n.out
        want = dtype if v.type.rank >= 2 else "float32"
        if v.dtype in FLOAT_DTYPES and v.dtype != want:
            v.type = TensorType(v.shape, want)
            ctx.weights.transform(n.name, lambda a, dt=np_dtype(want): a.astype(dt))
            ctx.count(f"to_{want}")
    return graph
