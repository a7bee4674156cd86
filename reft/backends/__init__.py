"""Backends turn a plan's graph into something that runs.

The runtime talks to a small device interface through `load(plan)`:
  exe.run(feeds) -> outputs       one call per step for the whole forward graph
  exe.zeros(shape, dtype)         device memory for runtime-owned state (KV-cache pages)
"""
from __future__ import annotations

from ..errors import PlanError

AVAILABLE = ("cpu", "reference")


def load(plan, threads: int | None = None):
    name = plan.manifest["backend"]["name"]
    if name == "cpu":
        from .cpu import load as load_cpu

        return load_cpu(plan, threads)
    if name == "reference":
        from .reference import load as load_reference

        return load_reference(plan)
    raise PlanError(f"{plan.path}: backend {name!r} is not available here (available: {', '.join(AVAILABLE)})")
