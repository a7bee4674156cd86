"""Graph, Node and Value: the one IR every pass and backend reads.

- A `Value` is an SSA value: a TensorType plus the node that produces it.
- A `Node` is one op application: op name, input values, frozen attributes, outputs.
- Graph inputs and weights are nodes too (`input` and `param` ops carry a `name`
  attribute), so the text form and every pass treat them uniformly.
- A `Graph` keeps nodes in a valid (topological) order and names its outputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from .types import Shape, TensorType


def freeze(v: Any) -> Any:
    """Attributes are immutable: lists become tuples, recursively."""
    if isinstance(v, (list, tuple)):
        return tuple(freeze(x) for x in v)
    if isinstance(v, dict):
        raise TypeError("dict attributes are not allowed; use a tuple of pairs")
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"attribute value {v!r} of type {type(v).__name__} is not allowed")


class Value:
    __slots__ = ("type", "node", "index")

    def __init__(self, type: TensorType, node: "Node | None" = None, index: int = 0):
        self.type = type
        self.node = node
        self.index = index

    @property
    def shape(self) -> Shape:
        return self.type.shape

    @property
    def dtype(self) -> str:
        return self.type.dtype

    def __repr__(self) -> str:
        op = self.node.op if self.node else "?"
        return f"<Value {self.type} from {op}#{self.index}>"


class Node:
    __slots__ = ("op", "inputs", "attrs", "outputs")

    def __init__(self, op: str, inputs: Iterable[Value], attrs: dict[str, Any], out_types: Iterable[TensorType]):
        self.op = op
        self.inputs: list[Value] = list(inputs)
        self.attrs: dict[str, Any] = {k: freeze(v) for k, v in sorted(attrs.items())}
        self.outputs: list[Value] = [Value(t, self, i) for i, t in enumerate(out_types)]

    @property
    def out(self) -> Value:
        assert len(self.outputs) == 1, f"{self.op} has {len(self.outputs)} outputs"
        return self.outputs[0]

    @property
    def name(self) -> str | None:
        return self.attrs.get("name")

    def key(self) -> tuple:
        """Structural identity used by CSE: op, inputs (by identity), attributes, types."""
        return (self.op, tuple(id(v) for v in self.inputs), tuple(self.attrs.items()),
                tuple(v.type for v in self.outputs))

    def __repr__(self) -> str:
        return f"<Node {self.op} {self.attrs}>"


@dataclass
class Graph:
    name: str = "forward"
    nodes: list[Node] = field(default_factory=list)
    outputs: dict[str, Value] = field(default_factory=dict)

    # -- queries -----------------------------------------------------------------
    def inputs(self) -> list[Node]:
        return [n for n in self.nodes if n.op == "input"]

    def params(self) -> list[Node]:
        return [n for n in self.nodes if n.op == "param"]

    def input(self, name: str) -> Node:
        for n in self.nodes:
            if n.op == "input" and n.name == name:
                return n
        raise KeyError(f"graph {self.name} has no input {name!r}")

    def users(self) -> dict[int, list[Node]]:
        """id(value) -> nodes that consume it."""
        out: dict[int, list[Node]] = {}
        for n in self.nodes:
            for v in n.inputs:
                out.setdefault(id(v), []).append(n)
        return out

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return dict(sorted(counts.items()))

    # -- edits -------------------------------------------------------------------
    def replace_uses(self, old: Value, new: Value) -> None:
        for n in self.nodes:
            n.inputs = [new if v is old else v for v in n.inputs]
        for k, v in self.outputs.items():
            if v is old:
                self.outputs[k] = new

    def to_networkx(self):
        """Directed graph of node indices (edges follow data flow) for analyses and .dot."""
        import networkx as nx

        g = nx.DiGraph()
        index = {id(n): i for i, n in enumerate(self.nodes)}
        for i, n in enumerate(self.nodes):
            label = n.op if n.op not in ("input", "param") else f"{n.op} {n.name}"
            g.add_node(i, label=label, shape="box" if n.op not in ("input", "param") else "ellipse")
            for v in n.inputs:
                g.add_edge(index[id(v.node)], i, label=str(v.type))
        for name, v in self.outputs.items():
            g.add_node(f"out:{name}", label=f"output {name}", shape="ellipse")
            g.add_edge(index[id(v.node)], f"out:{name}", label=str(v.type))
        return g
