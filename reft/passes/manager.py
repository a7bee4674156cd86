"""PassManager: runs Graph -> Graph passes in order, verifying and timing each one.

A pass is a function `(graph, ctx) -> graph` (it may edit in place and return the graph).
With a dump directory the IR after every pass is written as `NNN_<pass>.ir` (text form),
preceded by `000_input.ir`, and the final graph is drawn as `final.dot`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..ir import Graph, print_graph, verify
from .context import PassContext

PassFn = Callable[[Graph, PassContext], Graph]


@dataclass
class PassRecord:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    counts: dict = field(default_factory=dict)


class PassManager:
    def __init__(self, passes: list[tuple[str, PassFn]], *, verify_each: bool = True,
                 dump_dir: str | Path | None = None):
        self.passes = passes
        self.verify_each = verify_each
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.records: list[PassRecord] = []

    def run(self, graph: Graph, ctx: PassContext | None = None) -> Graph:
        ctx = ctx or PassContext()
        if self.verify_each:
            verify(graph)
        self._dump(0, "input", graph)
        for i, (name, fn) in enumerate(self.passes, 1):
            before = len(graph.nodes)
            ctx.current = name
            ctx.counters.pop(name, None)
            t0 = time.perf_counter()
            graph = fn(graph, ctx)
            dt = time.perf_counter() - t0
            if self.verify_each:
                verify(graph)
            self.records.append(PassRecord(name, dt, before, len(graph.nodes), dict(ctx.counters.get(name, {}))))
            self._dump(i, name, graph)
        if self.dump_dir:
            write_dot(graph, self.dump_dir / "final.dot")
            self._reports(ctx)
        return graph

    def _reports(self, ctx: PassContext) -> None:
        """fusion.txt: every fused kernel and the ops it replaced; memory.json: the memory plan."""
        if ctx.artifacts.get("fusion"):
            (self.dump_dir / "fusion.txt").write_text("\n".join(ctx.artifacts["fusion"]) + "\n")
        if ctx.artifacts.get("memory"):
            (self.dump_dir / "memory.json").write_text(json.dumps(ctx.artifacts["memory"], indent=1) + "\n")

    def _dump(self, i: int, name: str, graph: Graph) -> None:
        if self.dump_dir:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_dir / f"{i:03d}_{name}.ir").write_text(print_graph(graph))


def write_dot(graph: Graph, path: Path) -> None:
    """Graphviz drawing of the graph (render with `dot -Tsvg final.dot`)."""
    g = graph.to_networkx()
    q = lambda s: '"' + str(s).replace('"', r'\"') + '"'  # noqa: E731
    lines = [f"digraph {q(graph.name)} {{", "  node [fontname=monospace];"]
    for n, d in g.nodes(data=True):
        lines.append(f"  {q(n)} [label={q(d['label'])}, shape={d['shape']}];")
    for a, b, d in g.edges(data=True):
        lines.append(f"  {q(a)} -> {q(b)} [label={q(d['label'])}];")
    lines.append("}")
    path.write_text("\n".join(lines) + "\n")
