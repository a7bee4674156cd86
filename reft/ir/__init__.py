"""The tensor-graph IR: types, graph, op registry, builder, text form, verifier."""
from . import ops
from .builder import GraphBuilder
from .graph import Graph, Node, Value
from .text import ParseError, parse_graph, parse_module, print_graph, print_module
from .types import TensorType
from .verify import VerifyError, verify

__all__ = ["ops", "GraphBuilder", "Graph", "Node", "Value", "TensorType", "verify", "VerifyError",
           "print_graph", "print_module", "parse_graph", "parse_module", "ParseError"]
