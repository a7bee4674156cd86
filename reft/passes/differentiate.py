"""Reverse-mode autodiff over the IR: append the backward graph to a graph with a `loss` output.

  differentiate(graph, ctx)      the pass: outputs `loss` and one `grad.<param name>` per trainable
                                 parameter (checkpoint names verbatim; float32 for float32 params)
  gradients(graph, seeds, wrt)   the core: walks the nodes in reverse, calls each op's gradient rule
                                 (OpDef.vjp, see reft/ir/ops/autodiff.py) and sums the contributions
                                 of a value's several users
  build_train_graph(family, cfg, trainable=None, gradient_checkpointing=False)
                                 a family's forward graph through the TRAIN pipeline

Notable:
- Only values that depend on a trainable parameter and reach the loss get gradients: frozen
  weights (and everything upstream of the first trainable one) cost no backward nodes.
- Gradient contributions are summed with `add`, except that a row scatter into zeros (the
  embedding's rule) is folded into the gradient it is summed with: with tied embeddings the LM
  head's gradient is the base the embedding rows are added into.
- Gradient checkpointing (option `gradient_checkpointing`): the nodes of each decoder layer
  (the nodes after one reading a `...layers.{i}.` weight, up to the next node reading a weight of
  another layer or of none) are recomputed from the layer's input just before its backward, so
  the forward keeps only the residual stream between layers alive. CSE must not run after this
  pass (it would merge the recomputation back into the forward).

Options (ctx.options): `trainable` (parameter names; None = every float parameter),
`gradient_checkpointing` (bool). Counts `trainable`, `backward_nodes`, `recomputed_layers`.
"""
from __future__ import annotations

import re

from ..errors import ReftError
from ..ir import Graph, GraphBuilder, Node, Value, ops
from ..ir.ops.autodiff import ONE
from ..ir.types import FLOAT_DTYPES
from .context import PassContext

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
LOSS_OPS = frozenset({"linear_cross_entropy"})     # ops whose rule takes ONE (d loss / d loss)


def differentiate(graph: Graph, ctx: PassContext) -> Graph:
    loss = graph.outputs.get("loss")
    if loss is None or loss.type.shape != () or loss.dtype != "float32":
        raise ReftError(f"graph {graph.name}: autodiff needs a float32[] `loss` output (run attach_loss first)")
    effects = [n.op for n in graph.nodes if ops.SIDE_EFFECT in ops.get(n.op).traits]
    if effects:
        raise ReftError(f"graph {graph.name}: cannot differentiate through {effects[0]}"
                        " (autodiff runs before paged-KV lowering)")
    chosen = trainable_params(graph, ctx.options.get("trainable"))
    segments = layer_segments(graph) if ctx.options.get("gradient_checkpointing") else []
    before = len(graph.nodes)
    grads = gradients(graph, [(loss, ONE)], [n.out for n in chosen], segments)
    b = GraphBuilder(graph=graph)
    for n, g in zip(chosen, grads):
        graph.outputs[f"grad.{n.name}"] = g if g is not None else b.zeros_like(n.out)
    ctx.count("trainable", len(chosen))
    ctx.count("backward_nodes", len(graph.nodes) - before)
    ctx.count("recomputed_layers", len(segments))
    return graph


def trainable_params(graph: Graph, names) -> list[Node]:
    params = graph.params()
    if names is None:
        chosen = [n for n in params if n.out.dtype in FLOAT_DTYPES]
    else:
        names = set(names)
        unknown = sorted(names - {n.name for n in params})
        if unknown:
            raise ReftError(f"trainable parameter {unknown[0]!r} is not a weight of the model")
        chosen = [n for n in params if n.name in names]
        quantized = [n.name for n in chosen if n.out.type.quantized]
        if quantized:
            raise ReftError(f"parameter {quantized[0]} is quantized and cannot be trained (train an adapter instead)")
    if not chosen:
        raise ReftError("no trainable parameters")
    return chosen


def gradients(graph: Graph, seeds: list[tuple[Value, object]], wrt: list[Value],
              segments: list[list[Node]] = ()) -> list[Value | None]:
    """Append the backward of `graph` for the given (value, cotangent) seeds (ONE for the loss);
    returns the gradient of each value in `wrt` (None where none reaches it). `segments` are runs
    of nodes recomputed before their backward (gradient checkpointing)."""
    forward = list(graph.nodes)
    active = {id(v) for v in wrt}                   # values that depend on something in wrt
    for n in forward:
        if any(id(v) in active for v in n.inputs):
            active.update(id(o) for o in n.outputs if o.dtype in FLOAT_DTYPES)
    reach = {id(v) for v, _ in seeds}               # values the seeds depend on
    for n in reversed(forward):
        if any(id(o) in reach for o in n.outputs):
            reach.update(id(v) for v in n.inputs)
    last = {id(seg[-1]): seg for seg in segments}
    replay: dict[int, Node] = {}                    # id(forward node) -> its recomputed copy
    b = GraphBuilder(graph=graph)
    cts: dict[int, object] = {id(v): g for v, g in seeds}
    for n in reversed(forward):
        if id(n) in last:
            _recompute(b, last[id(n)], replay)
        outs = [cts.get(id(o)) for o in n.outputs]
        if all(g is None for g in outs):
            continue
        wants = [id(v) in active and id(v) in reach and v.dtype in FLOAT_DTYPES for v in n.inputs]
        if not any(wants):
            continue
        rule = ops.get(n.op).vjp
        if rule is None:
            raise ReftError(f"op {n.op} has no gradient rule; it cannot be trained through")
        if any(g is ONE for g in outs) and n.op not in LOSS_OPS:
            raise ReftError(f"the loss must be made by one of {sorted(LOSS_OPS)}, not {n.op}")
        grads = rule(b, replay.get(id(n), n), outs, wants)
        for v, want, g in zip(n.inputs, wants, grads):
            if want and g is not None:
                _accumulate(b, cts, v, g, n.op)
    return [cts.get(id(v)) for v in wrt]


def _recompute(b: GraphBuilder, segment: list[Node], replay: dict[int, Node]) -> None:
    """Copies of the segment's nodes, reading the copies of values made inside the segment."""
    copies: dict[int, Value] = {}
    for n in segment:
        m = Node(n.op, [copies.get(id(v), v) for v in n.inputs], n.attrs, [o.type for o in n.outputs])
        b.graph.nodes.append(m)
        replay[id(n)] = m
        copies.update((id(o), c) for o, c in zip(n.outputs, m.outputs))


def _accumulate(b: GraphBuilder, cts: dict, v: Value, g, op: str) -> None:
    if g is ONE or g.type != v.type:
        raise TypeError(f"gradient rule of {op} returned {getattr(g, 'type', g)} for an input of type {v.type}")
    old = cts.get(id(v))
    if old is None:
        cts[id(v)] = g
    elif old is ONE:
        raise ReftError("the loss may only be a graph output")
    else:
        cts[id(v)] = _fold_scatter(b, old, g) or _fold_scatter(b, g, old) or b.add(old, g)


def _fold_scatter(b: GraphBuilder, base: Value, g: Value) -> Value | None:
    """base + scatter_rows(zeros, rows, src) -> scatter_rows(base, rows, src)."""
    n = g.node
    if n.op == "scatter_rows" and n.inputs[0].node.op == "zeros_like":
        return b.scatter_rows(base, n.inputs[1], n.inputs[2])
    return None


def layer_segments(graph: Graph) -> list[list[Node]]:
    """The nodes of each decoder layer, in order (see the module docstring)."""
    segments: dict[int, list[Node]] = {}
    current = None
    for n in graph.nodes:
        if n.op in ("input", "param"):
            continue
        names = [v.node.name for v in n.inputs if v.node.op == "param"]
        if names:
            layers = [int(m.group(1)) for name in names if (m := LAYER.search(name))]
            current = max(layers) if layers else None
        if current is not None:
            segments.setdefault(current, []).append(n)
    return [segments[k] for k in sorted(segments)]


def build_train_graph(family, cfg, trainable=None, gradient_checkpointing: bool = False, *,
                      name: str = "train_step", ctx: PassContext | None = None, dump_dir=None) -> Graph:
    """The family's forward graph with the loss and its gradients (the TRAIN pipeline): inputs
    input_ids, positions, seq_ids, targets, loss_scale; outputs loss and grad.<param> for each
    trainable parameter."""
    from .manager import PassManager
    from .pipeline import TRAIN

    b = GraphBuilder(name)
    family.build(cfg, b)
    ctx = ctx or PassContext()
    ctx.options.update(trainable=trainable, gradient_checkpointing=gradient_checkpointing)
    return PassManager(TRAIN, dump_dir=dump_dir).run(b.graph, ctx)
