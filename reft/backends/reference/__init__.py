"""The reference backend: the numpy interpreter runs the plan's graph directly."""
from __future__ import annotations

import numpy as np

from ...ir.types import np_dtype
from .executor import ReferenceExecutor


class ReferenceExecutable:
    def __init__(self, graph, weights):
        self.executor = ReferenceExecutor(graph, weights)

    def run(self, feeds):
        return self.executor.run(feeds)

    @staticmethod
    def zeros(shape, dtype: str):
        return np.zeros(shape, np_dtype(dtype))


def load(plan) -> ReferenceExecutable:
    return ReferenceExecutable(plan.graph("forward"), plan.weights)


__all__ = ["ReferenceExecutor", "ReferenceExecutable", "load"]
