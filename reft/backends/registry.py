"""Backends by name. The compiler, the CLIs, the runtime and `reftc inspect` ask here; no code
outside reft/backends/ compares backend names.

A backend module registers its object when imported; `get` imports the built-in ones lazily so
that a machine without a C++ compiler can still run reference plans.
"""
from __future__ import annotations

import importlib

from ..errors import PlanError, ReftError
from .base import Backend

BUILTIN = {"cpu": "reft.backends.cpu.backend", "reference": "reft.backends.reference",
           "cuda": "reft.backends.cuda.backend"}
_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def names() -> list[str]:
    """Every backend name reft knows (the CLI's --backend choices), best first."""
    return list(dict.fromkeys([*BUILTIN, *_REGISTRY]))


def get(name: str, error=ReftError) -> Backend:
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in _REGISTRY:
        raise error(f"unknown backend {name!r}; available: {', '.join(names())}")
    return _REGISTRY[name]


def default() -> Backend:
    """The best backend this machine can compile for (cpu wherever a C++ compiler exists)."""
    for name in names():
        b = get(name)
        if b.available():
            return b
    return get("reference")


def for_plan(plan) -> Backend:
    return get(plan.manifest["backend"]["name"], PlanError)
