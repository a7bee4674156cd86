"""Small helpers for local rewrites: who uses a value, and replacing a matched chain by one node."""
from __future__ import annotations

from ..ir import Graph, Node, Value, ops


class Uses:
    """id(value) -> consuming nodes (graph outputs count as a use, under the name None)."""

    def __init__(self, graph: Graph):
        self.map = graph.users()
        self.outputs = {id(v) for v in graph.outputs.values()}

    def of(self, v: Value) -> list[Node]:
        return self.map.get(id(v), [])

    def only(self, v: Value) -> Node | None:
        """The single consuming node of v, if it has exactly one use and is not a graph output."""
        us = self.of(v)
        return us[0] if len(us) == 1 and id(v) not in self.outputs else None


def make(op: str, inputs: list[Value], **attrs) -> Node:
    return Node(op, inputs, attrs, ops.infer_types(op, [v.type for v in inputs], attrs))


def replace(graph: Graph, new: Node, at: Node, results: list[tuple[Value, Value]], dead: list[Node]) -> None:
    """Insert `new` where `at` stands, point uses of each old value at its new one, drop `dead`,
    then restore a valid order (the new node's inputs may be defined after `at`)."""
    graph.nodes.insert(graph.nodes.index(at), new)
    for old, nv in results:
        graph.replace_uses(old, nv)
    dead_ids = {id(n) for n in dead}
    graph.nodes = [n for n in graph.nodes if id(n) not in dead_ids]
    toposort(graph)


def toposort(graph: Graph) -> None:
    """Reorder nodes so every input is defined before use, keeping the current order where it
    already is valid (a node waits only for its own inputs)."""
    placed: set[int] = set()
    order: list[Node] = []
    producer = {id(v): n for n in graph.nodes for v in n.outputs}

    def place(n: Node) -> None:
        stack = [(n, False)]
        while stack:
            cur, expanded = stack.pop()
            if id(cur) in placed:
                continue
            if expanded:
                placed.add(id(cur))
                order.append(cur)
                continue
            stack.append((cur, True))
            for v in reversed(cur.inputs):
                p = producer[id(v)]
                if id(p) not in placed:
                    stack.append((p, False))

    for n in graph.nodes:
        place(n)
    graph.nodes = order
