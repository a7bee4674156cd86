"""Make the forward entry return hidden states instead of logits (`reftc compile --task embed`).

Every family's forward ends in `take_rows(h, logit_rows)`, the final norm, and
`logits = linear(x, head)`, optionally soft-capped (Gemma). This pass swaps the `logits` output
for `hidden_states = x` (float32 [R, D]: the final norm's output at the rows `logit_rows` asks
for, as transformers' `last_hidden_state`), so the LM head matmul, its soft-cap and, when it is
not tied to the embedding, the head weight fall to the dead-code elimination that follows. The
inputs stay as they are: the runtime feeds an embed plan exactly as a generate plan.

It runs on the traced graph before the weights are bound (pipeline.TASKS), so a checkpoint without
an LM head (a base-model or embedding checkpoint) compiles.

Options (ctx.options): none. Counts `hidden_states_extracted`.
"""
from __future__ import annotations

from ..errors import ModelError
from ..ir import Graph, Node, ops
from .context import PassContext

OUTPUT = "hidden_states"


def extract_hidden_states(graph: Graph, ctx: PassContext) -> Graph:
    v = graph.outputs.get("logits")
    if v is not None and v.node.op == "softcap":
        v = v.node.inputs[0]
    if v is None or v.node.op != "linear":
        raise ModelError(f"graph {graph.name}: --task embed needs a `logits` output made by linear(hidden, head)"
                         " (optionally soft-capped)")
    hidden = v.node.inputs[0]
    if hidden.dtype != "float32":
        cast = Node("cast", [hidden], {"dtype": "float32"},
                    ops.infer_types("cast", [hidden.type], {"dtype": "float32"}))
        graph.nodes.append(cast)
        hidden = cast.out
    graph.outputs = {(OUTPUT if k == "logits" else k): (hidden if k == "logits" else o)
                     for k, o in graph.outputs.items()}
    ctx.count("hidden_states_extracted")
    return graph
