"""The IR's text form: prints a Graph and parses it back (dumps, plans and golden tests).

    graph forward {
      %0 = input() : int32[T] {name='input_ids'}
      %1 = param() : float32[512,64] {name='model.embed_tokens.weight'}
      %2 = embedding(%0, %1) : float32[T,64] {dtype='float32'}
      %3, %4 = split(%2) : float32[T,32], float32[T,32] {axis=1, sizes=(32, 32)}
      return hidden=%2
    }

Values are numbered in order of definition; attributes are Python literals.
"""
from __future__ import annotations

import ast
import re

from .graph import Graph, Node, Value
from .types import TensorType

HEADER = "# reft-ir v1"


def _type_str(t: TensorType) -> str:
    return f"{t.dtype}[{','.join(str(d) for d in t.shape)}]"


def print_graph(graph: Graph) -> str:
    ids: dict[int, str] = {}
    lines = [f"graph {graph.name} {{"]
    for n in graph.nodes:
        outs = []
        for v in n.outputs:
            ids[id(v)] = f"%{len(ids)}"
            outs.append(ids[id(v)])
        args = ", ".join(ids[id(v)] for v in n.inputs)
        types = ", ".join(_type_str(v.type) for v in n.outputs)
        attrs = ", ".join(f"{k}={v!r}" for k, v in n.attrs.items())
        lines.append(f"  {', '.join(outs)} = {n.op}({args}) : {types}" + (f" {{{attrs}}}" if attrs else ""))
    rets = ", ".join(f"{k}={ids[id(v)]}" for k, v in graph.outputs.items())
    lines.append(f"  return {rets}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def print_module(graphs: list[Graph]) -> str:
    return HEADER + "\n" + "\n".join(print_graph(g) for g in graphs)


class ParseError(Exception):
    pass


_NODE = re.compile(r"^\s*(?P<outs>%\d+(?:, %\d+)*) = (?P<op>\w+)\((?P<args>[^)]*)\) : "
                   r"(?P<types>\w+\[[^\]]*\](?:, \w+\[[^\]]*\])*)(?: \{(?P<attrs>.*)\})?\s*$")
_TYPE = re.compile(r"(\w+)\[([^\]]*)\]")
_RET = re.compile(r"^\s*return(?P<rets>.*)$")


def _parse_type(s: str) -> TensorType:
    m = _TYPE.fullmatch(s.strip())
    dims = tuple(int(d) if d.isdigit() else d for d in m.group(2).split(",") if d) if m.group(2) else ()
    return TensorType(dims, m.group(1))


def _parse_attrs(s: str | None) -> dict:
    if not s:
        return {}
    call = ast.parse(f"f({s})", mode="eval").body
    if not isinstance(call, ast.Call) or call.args:
        raise ParseError(f"bad attributes {{{s}}}")
    return {kw.arg: ast.literal_eval(_SpecialFloats().visit(kw.value)) for kw in call.keywords}


class _SpecialFloats(ast.NodeTransformer):
    """`inf` and `nan` (as repr prints them) are literals in attributes."""

    def visit_Name(self, node):
        if node.id in ("inf", "nan"):
            return ast.copy_location(ast.Constant(float(node.id)), node)
        return node


def parse_module(text: str) -> list[Graph]:
    graphs, g, env = [], None, {}
    for lineno, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        try:
            if s.startswith("graph ") and s.endswith("{"):
                if g is not None:
                    raise ParseError(f"graph {g.name} is not closed before the next one")
                g, env = Graph(s[6:-1].strip()), {}
            elif s == "}":
                if g is None:
                    raise ParseError("'}' outside a graph")
                graphs.append(g)
                g = None
            elif (m := _RET.match(s)) and g is not None:
                for item in filter(None, (x.strip() for x in m.group("rets").split(","))):
                    k, v = item.split("=")
                    g.outputs[k.strip()] = env[v.strip()]
            elif (m := _NODE.match(s)) and g is not None:
                outs = m.group("outs").split(", ")
                args = [env[a.strip()] for a in m.group("args").split(",") if a.strip()]
                types = [_parse_type(t) for t in re.findall(r"\w+\[[^\]]*\]", m.group("types"))]
                if len(types) != len(outs):
                    raise ParseError(f"{len(outs)} results but {len(types)} types")
                n = Node(m.group("op"), args, _parse_attrs(m.group("attrs")), types)
                for name, v in zip(outs, n.outputs):
                    if name in env:
                        raise ParseError(f"{name} is defined twice")
                    env[name] = v
                g.nodes.append(n)
            else:
                raise ParseError("unrecognised line")
        except (KeyError, ValueError, SyntaxError, TypeError, ParseError) as e:
            raise ParseError(f"line {lineno}: {e}: {s[:120]}") from None
    if g is not None:
        raise ParseError("unterminated graph")
    return graphs


def parse_graph(text: str) -> Graph:
    gs = parse_module(text)
    if len(gs) != 1:
        raise ParseError(f"expected one graph, found {len(gs)}")
    return gs[0]
