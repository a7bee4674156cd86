"""The text form: print -> parse -> print is the identity; errors name their line."""
from __future__ import annotations

import keyword
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reft.backends.reference.executor import ReferenceExecutor
from reft.ir import (Graph, GraphBuilder, Node, ParseError, TensorType, parse_graph, parse_module,
                     print_graph, print_module, verify)
from strategies import random_graphs

GRAPHS = settings(max_examples=50, deadline=None)


@GRAPHS
@given(random_graphs())
def test_print_parse_print_round_trips(gwf):
    g, weights, feeds = gwf
    text = print_graph(g)
    g2 = parse_graph(text)
    verify(g2)
    assert print_graph(g2) == text
    assert [n.attrs for n in g2.nodes] == [n.attrs for n in g.nodes]


@settings(max_examples=20, deadline=None)
@given(random_graphs())
def test_parsed_graph_computes_the_same(gwf):
    g, weights, feeds = gwf
    g2 = parse_graph(print_graph(g))
    a = ReferenceExecutor(g, weights).run(feeds)
    b = ReferenceExecutor(g2, weights).run(feeds)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@settings(max_examples=10, deadline=None)
@given(st.lists(random_graphs(max_steps=4), min_size=1, max_size=3))
def test_module_round_trips(gwfs):
    graphs = []
    for i, (g, _, _) in enumerate(gwfs):
        g.name = f"entry{i}"
        graphs.append(g)
    text = print_module(graphs)
    assert text.startswith("# reft-ir v1\n")
    back = parse_module(text)
    assert [g.name for g in back] == [g.name for g in graphs]
    assert print_module(back) == text


def test_docstring_example_parses():
    text = """graph forward {
      %0 = input() : int32[T] {name='input_ids'}
      %1 = param() : float32[512,64] {name='model.embed_tokens.weight'}
      %2 = embedding(%0, %1) : float32[T,64] {dtype='float32'}
      %3, %4 = split(%2) : float32[T,32], float32[T,32] {axis=1, sizes=(32, 32)}
      return hidden=%2
    }
    """
    g = parse_graph(text)
    verify(g)
    assert [n.op for n in g.nodes] == ["input", "param", "embedding", "split"]
    assert len(g.nodes[3].outputs) == 2 and g.outputs["hidden"] is g.nodes[2].out
    assert g.nodes[3].attrs == {"axis": 1, "sizes": (32, 32)}


def test_scalar_and_symbolic_types_round_trip():
    b = GraphBuilder("g")
    x = b.input("x", (), "float32")
    y = b.input("y", ("S", "MP"), "int64")
    z = b.input("z", ("T", 0, 3), "bfloat16")
    b.output("x", x), b.output("y", y), b.output("z", z)
    g = parse_graph(print_graph(b.graph))
    assert [n.out.type for n in g.nodes] == [TensorType((), "float32"), TensorType(("S", "MP"), "int64"),
                                             TensorType(("T", 0, 3), "bfloat16")]


# -- attribute literals ----------------------------------------------------------------

def _graph_with_attrs(attrs: dict) -> Graph:
    """One `custom` node carrying `attrs` (printing and parsing do not consult the registry)."""
    g = Graph("attrs")
    x = Node("input", [], {"name": "x"}, [TensorType(("T",), "float32")])
    n = Node("custom", [x.out], attrs, [TensorType(("T",), "float32")])
    g.nodes += [x, n]
    g.outputs["y"] = n.out
    return g


def _same(a, b) -> bool:
    """Equal and of the same types all the way down (True is not 1, 1.0 is not 1)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, float):
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return a == b


def _round_trip(attrs: dict) -> dict:
    g = _graph_with_attrs(attrs)
    text = print_graph(g)
    g2 = parse_graph(text)
    assert print_graph(g2) == text
    return g2.nodes[1].attrs


scalars = (st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
           | st.none() | st.booleans())
attr_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4).map(tuple), max_leaves=12)
attr_names = st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True).filter(lambda s: not keyword.iskeyword(s))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(attr_names, attr_values, min_size=1, max_size=4))
def test_attribute_literals_round_trip(attrs):
    back = _round_trip(attrs)
    assert list(back) == sorted(attrs)
    for k, v in attrs.items():
        assert _same(back[k], v), (k, v, back[k])


@pytest.mark.parametrize("value", [
    0, -1, 7, 2**63, 1e-06, 0.1, 1e-5, -0.0, 1.5e300, 5e-324, 10000.0, 0.7071067811865475,
    "", "it's", 'say "hi"', "both ' and \"", "back\\slash", "new\nline", "braces {x} ) : %0", "ünï",
    None, True, False, (), (1,), (1, 2), ((1, 2), (3, (4, None))), ("T", 4, 1.0, True),
])
def test_attribute_literal_kinds(value):
    back = _round_trip({"v": value})
    assert _same(back["v"], value)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
def test_non_finite_float_attributes_round_trip(value):
    back = _round_trip({"v": value})
    assert _same(back["v"], value)


def test_list_attributes_are_frozen_to_tuples():
    n = Node("custom", [], {"b": [1, [2, 3]], "a": "x"}, [TensorType((), "float32")])
    assert n.attrs == {"a": "x", "b": (1, (2, 3))} and list(n.attrs) == ["a", "b"]
    with pytest.raises(TypeError):
        Node("custom", [], {"d": {"k": 1}}, [])
    with pytest.raises(TypeError):
        Node("custom", [], {"d": np.float32(1.0)}, [])


# -- parse errors ----------------------------------------------------------------------

GOOD = """graph g {
  %0 = input() : float32[T,4] {name='x'}
  %1 = silu(%0) : float32[T,4]
  return y=%1
}
"""


@pytest.mark.parametrize("line,bad", [
    (3, "  %1 = silu(%7) : float32[T,4]"),                        # undefined value
    (3, "  %1 = silu(%0) : float99[T,4]"),                        # unknown dtype
    (3, "  %1 = silu(%0) : float32[T,-4]"),                       # bad dim
    (3, "  %1 = silu(%0) float32[T,4]"),                          # no colon
    (3, "  %1, %2 = silu(%0) : float32[T,4]"),                    # results vs types
    (3, "  %1 = silu(%0) : float32[T,4] {eps=}"),                 # attribute syntax
    (3, "  %1 = silu(%0) : float32[T,4] {eps=foo}"),              # not a literal
    (3, "  %1 = silu(%0) : float32[T,4] {1}"),                    # positional attribute
    (3, "  this is not IR"),
    (4, "  return y=%9"),                                          # undefined output
    (4, "  return y"),                                             # no '='
])
def test_parse_errors_name_the_line(line, bad):
    lines = GOOD.splitlines()
    lines[line - 1] = bad
    with pytest.raises(ParseError, match=rf"^line {line}:"):
        parse_graph("\n".join(lines) + "\n")


def test_line_numbers_count_comments_and_blank_lines():
    text = "# reft-ir v1\n\n" + GOOD.replace("silu(%0)", "silu(%5)")
    with pytest.raises(ParseError, match=r"^line 5:"):
        parse_module(text)


def test_unterminated_graph():
    with pytest.raises(ParseError, match="unterminated"):
        parse_graph(GOOD.rsplit("}", 1)[0])


def test_parse_graph_wants_exactly_one():
    with pytest.raises(ParseError):
        parse_graph("")
    with pytest.raises(ParseError):
        parse_graph(GOOD + GOOD)


def test_node_outside_a_graph():
    with pytest.raises(ParseError, match="^line 1:"):
        parse_module("%0 = input() : float32[4] {name='x'}\n")


def test_stray_closing_brace():
    with pytest.raises(ParseError, match="^line 1:"):
        parse_module("}\n")


def test_graph_inside_a_graph():
    text = GOOD.rsplit("}", 1)[0] + GOOD
    with pytest.raises(ParseError, match="^line 5:"):
        parse_module(text)


def test_value_defined_twice():
    text = GOOD.replace("  %1 = silu(%0)", "  %0 = silu(%0)").replace("y=%1", "y=%0")
    with pytest.raises(ParseError, match="^line 3:"):
        parse_graph(text)
