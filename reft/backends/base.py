"""The Backend interface: what the compiler and the runtime need from any backend.

A backend is one object, registered by name (reft/backends/registry.py):

  name, describe(options)         its name, and the target it compiles for ("numpy", "avx512 ...")
  option_defaults(compile_options) (optional) dtype/kv_dtype it picks when the user sets none
  passes                          passes it wants after the shared pipeline (reft/passes/pipeline.py)
  compile(graphs, kernels_dir, options, memory_plans) -> record
                                  turn a plan's entry graphs into what runs (kernels/ files); the
                                  record goes to the manifest's `backend` field
  weight_layout(record)           the physical layout of each weight it wants: name -> WeightLayout
  available() / runnable()        whether this machine can compile plans / run them (cuda compiles anywhere
                                  NVRTC is installed, runs only where a GPU is)
  load(plan, options) -> Executable

The runtime talks only to the Executable: `run(feeds, entry)` runs one entry point with named
feeds, `zeros` allocates a buffer for runtime-owned state (KV-cache pages), `to_device` /
`to_host` copy host <-> buffer, `synchronize` waits for queued work, `read_weights(names)` copies
weights out in the IR's logical layout (a trainer saving what its entry points updated in place).
For host backends a buffer is a numpy array and the copies are plain copies.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import numpy as np

from ..ir.types import np_dtype


@dataclass(frozen=True)
class BackendOptions:
    """Options a backend reads when it compiles or loads a plan. Backends ignore what they do not use.

    target    instruction set to compile for (cpu: avx512 / avx2 / neon / generic; None = the host's best)
    threads   threads a step runs on (cpu; None = physical cores)
    writable  place weights in writable memory even if no entry point declares writable parameters
    max_batch_tokens  most tokens one step holds (arena and scratch are sized for it)
    dtype     storage dtype of the plan's float weights (cuda: the compute dtype of its kernels)
    progress  show progress bars for long work (kernel compiles)
    deterministic  batch-invariant kernels: a row's results never depend on the rest of its batch
              (cpu: every matmul takes the GEMV/tile path, whatever the token count)
    """
    target: str | None = None
    max_batch_tokens: int = 512
    threads: int | None = None
    writable: bool = False
    dtype: str = "float32"
    progress: bool = False
    deterministic: bool = False


@dataclass(frozen=True)
class WeightLayout:
    """A weight stored in another physical layout than the IR's row-major one."""
    name: str                             # e.g. "rows8x16"
    shape: Callable[[tuple], tuple]       # logical shape -> stored shape
    pack: Callable[[np.ndarray], np.ndarray]


@runtime_checkable
class Executable(Protocol):
    def run(self, feeds: Mapping[str, np.ndarray], entry: str = "forward") -> dict[str, np.ndarray]: ...
    def zeros(self, shape, dtype: str) -> Any: ...
    def to_device(self, array: np.ndarray) -> Any: ...
    def to_host(self, buffer) -> np.ndarray: ...
    def synchronize(self) -> None: ...
    def read_weights(self, names) -> dict[str, np.ndarray]: ...
    def free_memory(self) -> int: ...   # bytes free where zeros() allocates (the KV pool's budget)


@runtime_checkable
class Backend(Protocol):
    name: str
    passes: list

    def available(self) -> bool: ...
    def runnable(self) -> bool: ...
    def describe(self, options: BackendOptions) -> str: ...
    def check_options(self, options: BackendOptions) -> None: ...
    def compile(self, graphs: Mapping, kernels_dir: Path, options: BackendOptions,
                memory_plans: Mapping | None = None) -> dict: ...
    def weight_layout(self, record: dict) -> dict[str, WeightLayout]: ...
    def load(self, plan, options: BackendOptions) -> Executable: ...


class HostBuffers:
    """The buffer half of the Executable interface for backends whose buffers are numpy arrays."""

    @staticmethod
    def zeros(shape, dtype: str) -> np.ndarray:
        return np.zeros(shape, np_dtype(dtype))

    @staticmethod
    def to_device(array: np.ndarray) -> np.ndarray:
        return np.array(array, copy=True)

    @staticmethod
    def to_host(buffer) -> np.ndarray:
        return np.array(buffer, copy=True)

    def synchronize(self) -> None:
        pass

    @staticmethod
    def free_memory() -> int:
        from ..runtime.memory import host_available_memory

        return host_available_memory()

