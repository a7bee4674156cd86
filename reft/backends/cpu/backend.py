"""The cpu backend object (the Backend interface of reft/backends/base.py).

compile: each entry graph is lowered (reusing the plan_memory pass's arena plan) and rendered into
one C++ source exporting `reft_<entry>`; all of them link into one shared library over one set of
weights. load: the library through ctypes, the weights mapped read-only, or copied into writable
memory when an entry point declares writable parameters (training) or `BackendOptions.writable`.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Mapping

from ...errors import ReftError
from ..base import BackendOptions, WeightLayout
from ..registry import register
from .compile import build_library, render, rename_exports
from .lower import PACKED, choose_layouts, lower, pack, packed_shape
from .targets import get as get_target, host_target, tuning


def entry_record(low, entry: str, source: str, first: bool) -> dict:
    """What the runtime needs to call one entry point of the library."""
    return {"function": f"reft_{entry}", "init": "reft_init" if first else f"reft_init_{entry}",
            "source": source, "symbols": low.symbols, "params": low.params, "arena_bytes": low.arena_bytes,
            "scratch_floats": low.scratch_floats,
            "outputs": {k: [o, d, list(s)] for k, (o, d, s) in low.outputs.items()}}


class CpuBackend:
    name = "cpu"

    @property
    def passes(self) -> list:
        from ...passes.pipeline import CODEGEN

        return CODEGEN

    def available(self) -> bool:
        return bool(shutil.which("g++") or shutil.which("c++"))

    def runnable(self) -> bool:
        return self.available()

    def target(self, options: BackendOptions) -> str:
        return options.target or host_target()

    def describe(self, options: BackendOptions) -> str:
        return get_target(self.target(options)).describe()

    def check_options(self, options: BackendOptions) -> None:
        if options.target is not None:
            get_target(options.target)   # an unknown name is an error before any work

    def compile(self, graphs: Mapping, kernels_dir: Path, options: BackendOptions, memory_plans=None) -> dict:
        """Lower, render and compile every entry graph into one library; returns the manifest record."""
        target = self.target(options)
        plans = memory_plans or {}
        shared = choose_layouts(list(graphs.values()))   # one layout per weight for every entry
        tune = tuning(target, options.deterministic, options.max_batch_tokens)
        lows = {e: lower(g, options.max_batch_tokens, target, plans.get(e), shared, tune) for e, g in graphs.items()}
        sources = [render(low, e, target, tune) if i == 0 else rename_exports(render(low, e, target, tune), e)
                   for i, (e, low) in enumerate(lows.items())]
        srcs, lib = build_library(sources, target, kernels_dir)
        layouts: dict[str, str] = {}
        for e, low in lows.items():
            for name, layout in low.layouts.items():
                if layouts.setdefault(name, layout) != layout:
                    raise ReftError(f"cpu backend: entry {e} wants weight {name} in another layout")
        first = next(iter(lows))
        kernels = [{"kernel": c.kernel, "node": c.comment, **({} if e == first else {"entry": e})}
                   for e, low in lows.items() for c in low.calls]
        entries = {e: entry_record(low, e, f"kernels/{src.name}", e == first)
                   for (e, low), src in zip(lows.items(), srcs)}
        return {"name": self.name, "target": target, "tuning": tune, "deterministic": options.deterministic,
                "layouts": layouts,
                "kernel": {"source": f"kernels/{srcs[0].name}", "library": f"kernels/{lib.name}"},
                "entries": entries, "kernels": kernels}

    def weight_layout(self, record: dict) -> dict[str, WeightLayout]:
        packed = WeightLayout(PACKED, packed_shape, pack)
        return {name: packed for name, layout in record.get("layouts", {}).items() if layout == PACKED}

    def load(self, plan, options: BackendOptions):
        from .runtime import CpuExecutable

        return CpuExecutable.from_plan(plan, options)


BACKEND = register(CpuBackend())
