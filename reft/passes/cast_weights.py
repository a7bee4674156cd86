"""Store matrices (embeddings, projections, LM head) in the plan's weight dtype.

1-D weights (norm scales, biases) and the experts' bias rows ([E, N], GPT-OSS) become float32, the
compute dtype, whatever the checkpoint stored. Ops read weights of any float dtype and compute in
float32, so no other node changes.
"""
from __future__ import annotations

from ..ir import Graph
from ..ir.types import FLOAT_DTYPES, TensorType, np_dtype
from .context import PassContext

EXPERT_BIAS = {"expert_linear": 4, "expert_glu": 4, "expert_linear_sum": 5}   # op -> its bias input



def cast_weights(graph: Graph, ctx: PassContext) -> Graph:
    dtype = ctx.options.get("weight_dtype", "float32")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"weight dtype must be one of {sorted(FLOAT_DTYPES)}, got {dtype!r}")
    biases = {id(n.inputs[EXPERT_BIAS[n.op]]) for n in graph.nodes
              if n.op in EXPERT_BIAS and len(n.inputs) > EXPERT_BIAS[n.op]}
    for n in graph.params():
        v = n.out
        want = dtype if v.type.rank >= 2 and id(v) not in biases else "float32"
        if v.dtype in FLOAT_DTYPES and v.dtype != want:
            v.type = TensorType(v.shape, want)
            ctx.weights.transform(n.name, lambda a, dt=np_dtype(want): a.astype(dt))
            ctx.count(f"to_{want}")
    return graph
