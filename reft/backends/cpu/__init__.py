"""The CPU backend: fused C++ kernels from templates, compiled by the host compiler, called
once per step through one exported function per entry point (backend.py is its Backend object)."""
from __future__ import annotations

from pathlib import Path

from ...ir import Graph
from ..base import BackendOptions
from .backend import BACKEND, CpuBackend
from .lower import lower, pack, packed_shape  # noqa: F401
from .runtime import CpuExecutable, physical_cores


def compile_plan(graph: Graph, kernels_dir: Path, *, max_tokens: int, target: str | None = None) -> dict:
    """Lower, render and compile a forward graph; returns the manifest's backend record."""
    return BACKEND.compile({"forward": graph}, Path(kernels_dir),
                           BackendOptions(target=target, max_batch_tokens=max_tokens))


def load(plan, options: BackendOptions | int | None = None) -> CpuExecutable:
    return CpuExecutable.from_plan(plan, options)


def compile_graph(graph: Graph | dict, weights: dict, workdir: Path, *, max_tokens: int = 64,
                  threads: int | None = None, target: str | None = None) -> CpuExecutable:
    """Compile and load any graph, or {entry: graph} (tests, tools): weights are given as arrays."""
    from .memory import HostWeights

    graphs = graph if isinstance(graph, dict) else {"forward": graph}
    record = BACKEND.compile(graphs, Path(workdir), BackendOptions(target=target, max_batch_tokens=max_tokens))
    lib = Path(workdir) / Path(record["kernel"]["library"]).name
    weights = {k: pack(v) if k in record["layouts"] else v for k, v in weights.items()}
    return CpuExecutable(graphs, record, lib, HostWeights.from_arrays(weights), max_tokens, threads)


__all__ = ["BACKEND", "CpuBackend", "compile_plan", "compile_graph", "pack", "packed_shape", "load", "CpuExecutable",
           "physical_cores"]
