"""verify(graph) accepts what the builder makes and rejects each kind of broken graph."""
from __future__ import annotations

import pytest
from hypothesis import given, settings

from reft.ir import Graph, GraphBuilder, Node, TensorType, VerifyError, parse_graph, print_graph, verify
from strategies import random_graphs


@settings(max_examples=50, deadline=None)
@given(random_graphs())
def test_builder_graphs_verify(gwf):
    g, _, _ = gwf
    verify(g)
    verify(parse_graph(print_graph(g)))


def _small() -> tuple[GraphBuilder, list]:
    b = GraphBuilder("g")
    x = b.input("x", ("T", 4), "float32")
    w = b.param("w", (8, 4))
    y = b.linear(x, w)
    z = b.silu(y)
    b.output("z", z)
    return b, [x, w, y, z]


def test_small_graph_verifies():
    b, _ = _small()
    verify(b.graph)


def test_rejects_use_before_def():
    b, _ = _small()
    g = b.graph
    g.nodes[2], g.nodes[3] = g.nodes[3], g.nodes[2]       # silu before the linear it reads
    with pytest.raises(VerifyError, match="not defined before use"):
        verify(g)


def test_rejects_value_from_another_graph():
    b, _ = _small()
    other, vals = _small()
    b.graph.nodes[3].inputs = [vals[2]]
    with pytest.raises(VerifyError, match="not defined before use"):
        verify(b.graph)


def test_rejects_wrong_declared_type():
    b, [x, w, y, z] = _small()
    y.node.outputs[0].type = TensorType(("T", 9), "float32")
    with pytest.raises(VerifyError, match="declared types"):
        verify(b.graph)


def test_rejects_wrong_declared_dtype():
    b, [x, w, y, z] = _small()
    z.type = TensorType(("T", 8), "float16")
    with pytest.raises(VerifyError, match="declared types"):
        verify(b.graph)


def test_rejects_wrong_number_of_results():
    b, [x, w, y, z] = _small()
    n = Node("silu", [y], {}, [y.type, y.type])
    b.graph.nodes.append(n)
    with pytest.raises(VerifyError, match="declared types"):
        verify(b.graph)


def test_rejects_type_error_from_rule():
    b, [x, w, y, z] = _small()
    bad = Node("linear", [y, w], {}, [TensorType(("T", 8), "float32")])    # K = 8 vs weight's 4
    b.graph.nodes.append(bad)
    with pytest.raises(VerifyError, match="disagree on K"):
        verify(b.graph)


def test_rejects_unknown_op():
    b, [x, w, y, z] = _small()
    b.graph.nodes.append(Node("frobnicate", [z], {}, [z.type]))
    with pytest.raises(VerifyError, match="unknown op"):
        verify(b.graph)


def test_rejects_duplicate_input_names():
    b, _ = _small()
    b.input("x", ("T", 4), "float32")
    with pytest.raises(VerifyError, match="duplicate input 'x'"):
        verify(b.graph)


def test_rejects_duplicate_param_names():
    b, [x, w, y, z] = _small()
    b.graph.nodes.append(Node("param", [], {"name": "w"}, [w.type]))
    with pytest.raises(VerifyError, match="duplicate param 'w'"):
        verify(b.graph)


def test_input_and_param_may_share_a_name():
    b, _ = _small()
    b.input("w", (3,), "int32")
    verify(b.graph)


def test_rejects_source_without_name_or_with_inputs():
    b, [x, w, y, z] = _small()
    b.graph.nodes.append(Node("input", [], {}, [x.type]))
    with pytest.raises(VerifyError, match="source"):
        verify(b.graph)
    b, [x, w, y, z] = _small()
    b.graph.nodes.append(Node("param", [x], {"name": "p"}, [x.type]))
    with pytest.raises(VerifyError, match="source"):
        verify(b.graph)


def test_rejects_output_not_in_graph():
    b, _ = _small()
    _, other = _small()
    b.graph.outputs["stray"] = other[3]
    with pytest.raises(VerifyError, match="output 'stray'"):
        verify(b.graph)


def test_rejects_output_of_removed_node():
    b, [x, w, y, z] = _small()
    b.graph.nodes.remove(z.node)
    with pytest.raises(VerifyError, match="output 'z'"):
        verify(b.graph)


def test_rejects_missing_attribute():
    b, [x, w, y, z] = _small()
    b.graph.nodes.append(Node("rms_norm", [y, b.param("n", (8,))], {}, [y.type]))
    with pytest.raises(VerifyError, match="missing attributes"):
        verify(b.graph)


def test_rejects_unknown_attribute():
    b, [x, w, y, z] = _small()
    b.graph.nodes.append(Node("silu", [y], {"alpha": 1.0}, [y.type]))
    with pytest.raises(VerifyError, match="unknown attributes"):
        verify(b.graph)


def test_rejects_wrong_arity():
    b, [x, w, y, z] = _small()
    b.graph.nodes.append(Node("add", [y], {}, [y.type]))
    with pytest.raises(VerifyError, match="inputs"):
        verify(b.graph)


def test_rejects_output_not_pointing_back():
    b, [x, w, y, z] = _small()
    z.node.outputs[0].index = 1
    with pytest.raises(VerifyError, match="point back"):
        verify(b.graph)


def test_builder_rejects_misuse_at_build_time():
    b = GraphBuilder()
    x = b.input("x", ("T", 4), "float32")
    with pytest.raises(TypeError):
        b.linear(x, b.param("w", (8, 5)))
    with pytest.raises(TypeError):
        b.param("p", (2,))
        b.param("p", (3,))
    with pytest.raises(AttributeError):
        b.frobnicate(x)


def test_empty_graph_verifies():
    verify(Graph("empty"))


def test_malformed_attention_is_a_verify_error():
    b = GraphBuilder()
    q = b.input("q", ("T", 2, 4), "float32")
    k = b.input("k", ("T",), "float32")
    pos = b.input("pos", ("T",), "int32")
    b.graph.nodes.append(Node("causal_attention", [q, k, k, pos, pos], {"scale": 1.0}, [q.type]))
    with pytest.raises(VerifyError):
        verify(b.graph)
