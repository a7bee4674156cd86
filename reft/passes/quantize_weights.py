"""Weight-only quantization of the projection matmuls (`reftc compile --quant int8|int4`).

Options (ctx.options): `quant` None | "int8" | "int4", `group_size` (int4: 32, 64, 128),
`quant_head` (also quantize the LM head; default: it stays float, as does the embedding).

Every `linear` whose weight is a float graph weight becomes a reader of the same weight in
`int8` (per output channel, symmetric) or `int4_g{G}` (groups of G inputs, asymmetric),
round-to-nearest, converted lazily through the WeightStore by reft.quant's quantizers; so do the
experts' stacked weights (`expert_linear`, `expert_linear_sum`: each expert's matrix row by row).
The LM head is the linear that produces the `logits` output (through row selection); a weight also
read by something else than a matmul (a tied embedding table) is quantized only with the head.
A mixture-of-experts router (the linear whose logits feed `moe_router`) stays float: its choices
are discrete, and rounding its few weights would move them for a negligible saving.
Weights that arrive quantized (GGUF blocks) pass through unchanged.

Counters: `to_int8` / `to_int4_g{G}` per weight, `kept_head` when the head stays float,
`kept_router` per router.
"""
from __future__ import annotations

from ..errors import ReftError
from ..ir import Graph, Node
from ..ir.quantized import INT4_GROUPS, quantize_weight
from ..ir.types import FLOAT_DTYPES, TensorType
from .context import PassContext

MODES = ("int8", "int4")
MATMULS = {"linear": 1, "expert_linear": 3, "expert_linear_sum": 4}   # op -> index of the weight it quantizes


def lm_head(graph: Graph) -> Node | None:
    """The linear producing the `logits` output, seen through row selection / casts / reshapes."""
    v = graph.outputs.get("logits")
    while v is not None and v.node.op in ("take_rows", "cast", "reshape"):
        v = v.node.inputs[0]
    return v.node if v is not None and v.node.op == "linear" else None


def quant_dtype(mode: str, group_size: int) -> str:
    if mode not in MODES:
        raise ReftError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "int8":
        return "int8"
    if group_size not in INT4_GROUPS:
        raise ReftError(f"--group-size must be one of {', '.join(map(str, INT4_GROUPS))}, got {group_size}")
    return INT4_GROUPS[group_size]


def quantize_weights(graph: Graph, ctx: PassContext) -> Graph:
    mode = ctx.options.get("quant")
    if not mode:
        return graph
    dtype = quant_dtype(mode, int(ctx.options.get("group_size") or 32))
    with_head = bool(ctx.options.get("quant_head"))
    head = lm_head(graph)
    users = graph.users()
    done: set[str] = set()
    for n in graph.nodes:
        if n.op not in MATMULS:
            continue
        w = n.inputs[MATMULS[n.op]].node
        if w.op != "param" or w.out.dtype not in FLOAT_DTYPES or w.name in done:
            continue
        if any(u.op == "moe_router" for u in users.get(id(n.out), [])):
            ctx.count("kept_router")
            continue
        only_matmuls = all(u.op in MATMULS and [i for i, v in enumerate(u.inputs) if v is w.out] == [MATMULS[u.op]]
                           for u in users.get(id(w.out), []))
        if (n is head or not only_matmuls) and not with_head:
            ctx.count("kept_head")
            continue
        k = w.out.shape[-1]
        try:
            w.out.type = TensorType(w.out.shape, dtype)
        except TypeError:
            raise ReftError(f"--quant {mode}: {w.name} has {k} inputs; {dtype} needs a multiple of 32") from None
        ctx.weights.transform(w.name, lambda a, dt=dtype: quantize_weight(a, dt))
        ctx.count(f"to_{dtype}")
        done.add(w.name)
    return graph
