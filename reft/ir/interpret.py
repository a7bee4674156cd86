"""The numpy interpreter of the IR: runs each node's registered reference semantics in order.

It is the IR's own meaning: the oracle every other backend, pass and model is tested against.
Passes (scale_activations) run it directly; the reference backend (reft/backends/reference)
wraps it as an Executable.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from . import Graph, ops
from .quantized import QTensor
from .types import np_dtype, unify


class ReferenceExecutor:
    """Runs `graph`, reading weights from `weights` (name -> array, e.g. a lazy plan store)."""

    def __init__(self, graph: Graph, weights: Mapping[str, np.ndarray]):
        self.graph = graph
        self.weights = weights
        self._quantized: dict[str, QTensor] = {}   # dequantized once, on first use

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        env: dict[int, np.ndarray] = {}
        sizes: dict[str, int] = {}
        for n in self.graph.nodes:
            if n.op == "input":
                env[id(n.out)] = check_feed(n.name, n.out.type, feeds, sizes)
                continue
            if n.op == "param" and n.out.type.quantized:
                if n.name not in self._quantized:
                    self._quantized[n.name] = QTensor(np.asarray(self.weights[n.name]), n.out.type)
                env[id(n.out)] = self._quantized[n.name]
                continue
            if n.op == "param":
                w = self.weights[n.name]
                if tuple(w.shape) != n.out.shape or w.dtype != np_dtype(n.out.dtype):
                    raise ValueError(f"weight {n.name}: stored {w.dtype}{list(w.shape)}, graph wants {n.out.type}")
                env[id(n.out)] = w
                continue
            outs = ops.get(n.op).ref([env[id(v)] for v in n.inputs], ops.get(n.op).full_attrs(n.attrs))
            for v, a in zip(n.outputs, outs):
                env[id(v)] = a
        return {k: env[id(v)] for k, v in self.graph.outputs.items()}


def check_feed(name, t, feeds, sizes) -> np.ndarray:
    if name not in feeds:
        raise ValueError(f"missing graph input {name!r}")
    a = np.asarray(feeds[name])
    if a.dtype != np_dtype(t.dtype):
        raise ValueError(f"input {name}: expected {t.dtype}, got {a.dtype}")
    unify(t.shape, a.shape, sizes, f"input {name}")
    return a
