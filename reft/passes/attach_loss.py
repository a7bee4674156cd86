"""Turn the forward graph's logits into the training loss over every row of the batch.

The forward entry ends in `take_rows(h, logit_rows)`, row-wise ops (the final RMSNorm), and
`logits = linear(x, head)`, optionally soft-capped (`softcap(linear(x, head))`, Gemma 2: the loss
op's `softcap` attribute). This pass drops the row selection (the row-wise ops now run on all T
rows), replaces the head matmul with the fused `linear_cross_entropy` (chunked over rows, the
[T, V] logits never exist at once) and swaps the `logit_rows` input and `logits` output for:

  inputs   targets int32[T]    the next token of the same sequence, or -100 (no target: a
                               sequence's last token, or a masked SFT prompt token)
           loss_scale float32[]  the loss is loss_scale * the summed token losses; the runtime
                               feeds 1 / (target tokens in the whole accumulated batch)
  output   loss float32[]

Options (ctx.options): none. Counts `loss_attached`, `rows_widened` (row-wise ops moved in front
of the row selection).
"""
from __future__ import annotations

from ..errors import ModelError
from ..ir import Graph, Node, TensorType, ops
from .context import PassContext

# ops that act on each row independently (so they may run on all rows instead of the selected ones)
ROW_WISE = frozenset({"rms_norm", "cast", "add", "mul", "silu", "gelu_tanh", "softmax"})


def attach_loss(graph: Graph, ctx: PassContext) -> Graph:
    logits = graph.outputs.get("logits")
    attrs: dict = {}
    if logits is not None and logits.node.op == "softcap":
        attrs["softcap"] = logits.node.attrs["cap"]
        logits = logits.node.inputs[0]
    if logits is None or logits.node.op != "linear" or len(logits.node.inputs) != 2:
        raise ModelError(f"graph {graph.name}: training needs a `logits` output made by linear(x, head) without bias"
                         " (optionally soft-capped)")
    x, head = logits.node.inputs
    chain = []                                     # row-wise nodes between the row selection and the head
    v = x
    while v.node.op in ROW_WISE and v.type.rank == 2:
        chain.append(v.node)
        v = v.node.inputs[0]
    if v.node.op == "take_rows":
        x = v.node.inputs[0]
        for n in reversed(chain):                  # the same ops over every row
            ins = [x] + n.inputs[1:]
            m = Node(n.op, ins, n.attrs, ops.infer_types(n.op, [u.type for u in ins], n.attrs))
            graph.nodes.append(m)
            x = m.out
        ctx.count("rows_widened", len(chain))
    T = x.shape[0]
    targets = Node("input", [], {"name": "targets"}, [TensorType((T,), "int32")])
    scale = Node("input", [], {"name": "loss_scale"}, [TensorType((), "float32")])
    last_input = max(i for i, n in enumerate(graph.nodes) if n.op == "input")
    graph.nodes[last_input + 1:last_input + 1] = [targets, scale]
    loss = Node("linear_cross_entropy", [x, head, targets.out, scale.out], attrs,
                ops.infer_types("linear_cross_entropy", [x.type, head.type, targets.out.type, scale.out.type], attrs))
    graph.nodes.append(loss)
    del graph.outputs["logits"]
    graph.outputs = {"loss": loss.outputs[0], **graph.outputs}
    _drop_unused_inputs(graph, ("logit_rows",))
    ctx.count("loss_attached")
    return graph


def _drop_unused_inputs(graph: Graph, names) -> None:
    """Remove the named inputs (and the dead nodes that read them) once nothing live reads them."""
    live: set[int] = {id(v.node) for v in graph.outputs.values()}
    for n in reversed(graph.nodes):
        if id(n) in live:
            live.update(id(u.node) for u in n.inputs)
    dead = {id(n) for n in graph.nodes if n.op == "input" and n.name in names and id(n) not in live}
    if not dead:
        return
    keep = []
    for n in graph.nodes:
        if id(n) in dead or any(id(u.node) in dead for u in n.inputs):
            dead.add(id(n))
            continue
        keep.append(n)
    graph.nodes = keep
