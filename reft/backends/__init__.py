"""Backends turn a plan's entry graphs into something that runs (reft/backends/base.py has the
interface, registry.py the names). The runtime loads a plan through `load(plan, options)` and
then talks only to the Executable it returns."""
from __future__ import annotations

from .base import Backend, BackendOptions, Executable, WeightLayout
from .registry import default, for_plan, get, names, register


def load(plan, options: BackendOptions | None = None, *, threads: int | None = None) -> Executable:
    """The plan's backend loads it. `threads` is shorthand for BackendOptions(threads=...)."""
    options = options or BackendOptions(threads=threads)
    return for_plan(plan).load(plan, options)


__all__ = ["Backend", "BackendOptions", "Executable", "WeightLayout", "default", "for_plan", "get", "load",
           "names", "register"]
