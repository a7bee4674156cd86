"""verify(graph): types, shapes, attributes and ordering hold. Run after every pass in tests."""
from __future__ import annotations

from . import ops
from .graph import Graph
from .ops.registry import quantized_weight_inputs


class VerifyError(Exception):
    pass


def verify(graph: Graph) -> None:
    defined: set[int] = set()
    names: dict[tuple[str, str], object] = {}
    for i, n in enumerate(graph.nodes):
        where = f"graph {graph.name}, node {i} ({n.op})"
        if n.op not in ops.REGISTRY:
            raise VerifyError(f"{where}: unknown op")
        for v in n.inputs:
            if id(v) not in defined:
                raise VerifyError(f"{where}: input {v} is not defined before use")
        for j, v in enumerate(n.outputs):
            if v.node is not n or v.index != j:
                raise VerifyError(f"{where}: output {j} does not point back at its node")
        for j, v in enumerate(n.inputs):
            if v.type.quantized and ops.get(n.op).quantized_input != j:
                raise VerifyError(f"{where}: input {j} is quantized ({v.type}); only the weight of"
                                  f" {', '.join(sorted(quantized_weight_inputs()))} may be")
        if any(v.type.quantized for v in n.outputs) and n.op != "param":
            raise VerifyError(f"{where}: only weights (param) may be quantized, not {n.op} results")
        d = ops.get(n.op)
        if d.infer is None:  # sources: declared type, unique name per kind
            if not isinstance(n.name, str) or len(n.outputs) != 1 or n.inputs:
                raise VerifyError(f"{where}: a source takes no inputs, has one output and a name")
            key = (n.op, n.name)
            if key in names:
                raise VerifyError(f"{where}: duplicate {n.op} {n.name!r}")
            names[key] = n
        else:
            try:
                want = ops.infer_types(n.op, [v.type for v in n.inputs], n.attrs)
            except (TypeError, ValueError) as e:
                raise VerifyError(f"{where}: {e}") from None
            got = [v.type for v in n.outputs]
            if want != got:
                raise VerifyError(f"{where}: declared types {[str(t) for t in got]} but the rule gives {[str(t) for t in want]}")
        defined.update(id(v) for v in n.outputs)
    for name, v in graph.outputs.items():
        if id(v) not in defined:
            raise VerifyError(f"graph {graph.name}: output {name!r} is not produced by a node of the graph")
