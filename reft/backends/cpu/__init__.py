"""The CPU backend: fused C++ kernels from templates, compiled by the host compiler, called
once per step through one exported function per entry point."""
from __future__ import annotations

from pathlib import Path

from ...ir import Graph
from .compile import build, render
from .targets import get as get_target, host_target
from .lower import lower, pack, packed_shape
from .runtime import CpuExecutable, physical_cores


def compile_plan(graph: Graph, kernels_dir: Path, *, max_tokens: int, target: str | None = None) -> dict:
    """Lower, render and compile the forward entry; returns the manifest's backend record."""
    target = target or host_target()
    low = lower(graph, max_tokens, target)
    src, lib = build(render(low, "forward", target), target, kernels_dir)
    kernels = [{"kernel": c.kernel, "node": c.comment} for c in low.calls]
    return {"name": "cpu", "target": target, "tuning": dict(get_target(target).tuning), "layouts": low.layouts,
            "kernel": {"source": f"kernels/{src.name}", "library": f"kernels/{lib.name}", "symbols": low.symbols,
                       "params": low.params, "arena_bytes": low.arena_bytes, "scratch_floats": low.scratch_floats,
                       "outputs": {k: [o, d, list(s)] for k, (o, d, s) in low.outputs.items()}},
            "kernels": kernels}


def load(plan, threads: int | None = None) -> CpuExecutable:
    return CpuExecutable.from_plan(plan, threads)


def compile_graph(graph: Graph, weights: dict, workdir: Path, *, max_tokens: int = 64,
                  threads: int | None = None, target: str | None = None) -> CpuExecutable:
    """Compile and load any graph (tests, tools): weights are given as arrays."""
    from .memory import HostWeights

    record = compile_plan(graph, Path(workdir), max_tokens=max_tokens, target=target)
    lib = Path(workdir) / Path(record["kernel"]["library"]).name
    weights = {k: pack(v) if k in record["layouts"] else v for k, v in weights.items()}
    return CpuExecutable(graph, record, lib, HostWeights.from_arrays(weights), max_tokens, threads)


__all__ = ["compile_plan", "compile_graph", "pack", "packed_shape", "load", "CpuExecutable", "physical_cores"]
