"""The reference backend: the IR interpreter (reft/ir/interpret.py) runs the plan's graphs directly.

It is also the smallest complete backend, the worked example of docs/adding-a-backend.md: no
passes of its own, nothing to compile, weights in the IR's layout, and an Executable that runs
each entry point's graph with numpy.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from ...ir.interpret import ReferenceExecutor
from ..base import BackendOptions, HostBuffers
from ..registry import register


class ReferenceExecutable(HostBuffers):
    def __init__(self, graphs: Mapping, weights):
        self.weights = weights
        self.executors = {e: ReferenceExecutor(g, weights) for e, g in graphs.items()}

    @property
    def executor(self) -> ReferenceExecutor:
        return self.executors["forward"]

    def run(self, feeds, entry: str = "forward"):
        return self.executors[entry].run(feeds)

    def read_weights(self, names) -> dict[str, np.ndarray]:
        return {n: np.array(self.weights[n]) for n in names}


class ReferenceBackend:
    name = "reference"
    passes: list = []

    def available(self) -> bool:
        return True

    def runnable(self) -> bool:
        return True

    def describe(self, options: BackendOptions) -> str:
        return "numpy"

    def check_options(self, options: BackendOptions) -> None:
        from ...errors import ReftError

        if options.target is not None:
            raise ReftError(f"--target selects a cpu instruction set; the {self.name} backend takes none")

    def compile(self, graphs, kernels_dir: Path, options: BackendOptions, memory_plans=None) -> dict:
        return {"name": self.name, "target": self.describe(options)}

    def weight_layout(self, record: dict) -> dict:
        return {}

    def load(self, plan, options: BackendOptions) -> ReferenceExecutable:
        weights = plan.weights
        if options.writable or plan.writable_params():   # training updates them in place: private copies
            weights = {name: np.array(weights[name]) for name in weights}
        return ReferenceExecutable({e: plan.graph(e) for e in plan.entry_points}, weights)


BACKEND = register(ReferenceBackend())


def load(plan, options: BackendOptions | None = None) -> ReferenceExecutable:
    return BACKEND.load(plan, options or BackendOptions())


__all__ = ["ReferenceExecutor", "ReferenceExecutable", "ReferenceBackend", "BACKEND", "load"]
