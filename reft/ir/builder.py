"""GraphBuilder: the only API model definitions use.

    b = GraphBuilder("forward")
    ids = b.input("input_ids", ("T",), "int32")
    w = b.param("model.embed_tokens.weight", (512, 64))
    x = b.embedding(ids, w, dtype="float32")      # any registered op is a method
    b.output("logits", ...)

Every emitted node is type-checked against its op's rule when it is built.
"""
from __future__ import annotations

from typing import Any

from . import ops
from .graph import Graph, Node, Value
from .types import Shape, TensorType


class GraphBuilder:
    def __init__(self, name: str = "forward", graph: Graph | None = None):
        """A new graph, or one to append to (passes emitting nodes, e.g. autodiff)."""
        self.graph = graph if graph is not None else Graph(name)
        self._params: dict[str, Value] = {n.name: n.out for n in self.graph.params()}

    def input(self, name: str, shape: Shape, dtype: str) -> Value:
        n = Node("input", [], {"name": name}, [TensorType(tuple(shape), dtype)])
        self.graph.nodes.append(n)
        return n.out

    def param(self, name: str, shape: Shape, dtype: str = "float32") -> Value:
        """A weight by its checkpoint name; asking twice for one name returns the same value."""
        t = TensorType(tuple(shape), dtype)
        if name in self._params:
            if self._params[name].type != t:
                raise TypeError(f"param {name} declared as {self._params[name].type} and {t}")
            return self._params[name]
        n = Node("param", [], {"name": name}, [t])
        self.graph.nodes.append(n)
        self._params[name] = n.out
        return n.out

    def emit(self, op: str, *inputs: Value, **attrs: Any) -> Value | list[Value]:
        types = ops.infer_types(op, [v.type for v in inputs], attrs)
        n = Node(op, inputs, attrs, types)
        self.graph.nodes.append(n)
        return n.outputs[0] if len(n.outputs) == 1 else n.outputs

    def output(self, name: str, value: Value) -> None:
        self.graph.outputs[name] = value

    def __getattr__(self, op: str):
        if op.startswith("_") or op not in ops.REGISTRY:
            raise AttributeError(op)
        return lambda *inputs, **attrs: self.emit(op, *inputs, **attrs)
