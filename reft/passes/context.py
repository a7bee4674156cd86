"""What passes share besides the graph: options, counters and the weight store.

Weight transforms are lazy: a pass that fuses or converts weights registers how to produce
the new tensor; nothing is read until the plan writer (or an executor) asks for it, one
tensor at a time, so compiling never holds the whole checkpoint in memory.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np


class WeightStore(Mapping):
    """name -> array, backed by a checkpoint mapping plus lazily derived tensors."""

    def __init__(self, source: Mapping[str, np.ndarray] | None = None):
        self._source = source if source is not None else {}
        self._derived: dict[str, Callable[[], np.ndarray]] = {}

    def define(self, name: str, produce: Callable[[], np.ndarray]) -> None:
        """Register (or replace) `name` as produce()."""
        self._derived[name] = produce

    def transform(self, name: str, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        """Replace `name` by fn(current value of name)."""
        prev = self._producer(name)
        self._derived[name] = lambda: fn(prev())

    def _producer(self, name: str) -> Callable[[], np.ndarray]:
        if name in self._derived:
            return self._derived[name]
        if name in self._source:
            return lambda: self._source[name]
        raise KeyError(name)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._producer(name)()

    def __contains__(self, name) -> bool:
        return name in self._derived or name in self._source

    def __iter__(self):
        yield from self._derived
        yield from (k for k in self._source if k not in self._derived)

    def __len__(self) -> int:
        return len(set(self._derived) | set(self._source))


@dataclass
class PassContext:
    weights: WeightStore = field(default_factory=WeightStore)
    options: dict = field(default_factory=dict)
    counters: dict[str, Counter] = field(default_factory=dict)
    artifacts: dict = field(default_factory=dict)   # analyses for the plan (e.g. the memory plan)
    current: str = ""

    def count(self, what: str, n: int = 1) -> None:
        """Bump a counter of the running pass (tests assert that a rewrite fired)."""
        self.counters.setdefault(self.current, Counter())[what] += n

    def fused(self, node, replaced, what: str = "fused") -> None:
        """Record a fusion (for the --dump fusion report) and count it."""
        self.count(what)
        weights = [v.node.name for v in node.inputs if v.node is not None and v.node.op == "param"]
        line = f"{self.current}: {node.op} [{', '.join(weights)}] <- {' + '.join(n.op for n in replaced)}"
        self.artifacts.setdefault("fusion", []).append(line)
