"""Run a CPU plan: load the compiled forward function and call it once per step."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from ...errors import PlanError, RequestError
from ...ir.types import np_dtype, unify
from .targets import check_target
from .memory import HostWeights, address, anon


def physical_cores() -> int:
    """Physical cores available to this process (llama.cpp's default thread count)."""
    try:
        avail = os.sched_getaffinity(0)
        cores = set()
        cpu = None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("processor"):
                cpu = int(line.split(":")[1])
            elif line.startswith("core id") and cpu in avail:
                cores.add(line.split(":")[1].strip())
        return max(1, min(len(avail), len(cores) or len(avail)))
    except (OSError, ValueError):
        return os.cpu_count() or 1


def _openblas_sgemm() -> int:
    """Address of OpenBLAS's cblas_sgemm, or 0 (then a plain loop stands in).

    reft's own OpenMP threads split every GEMM into row blocks, so OpenBLAS runs single-threaded
    and never starts a pool of its own to compete with them (OPENBLAS_NUM_THREADS is read when
    the library loads, unless the user set it).
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        import scipy_openblas32 as sob
    except ImportError:
        return 0
    lib = ctypes.CDLL(str(next(Path(sob.get_lib_dir()).glob("libscipy_openblas*.so*"))), mode=ctypes.RTLD_GLOBAL)
    lib.scipy_openblas_set_num_threads(1)
    return ctypes.cast(lib.scipy_cblas_sgemm, ctypes.c_void_p).value or 0


def bind_inputs(inputs, feeds, max_tokens: int) -> tuple[list[np.ndarray], dict[str, int]]:
    """The graph inputs' arrays from `feeds` (C-contiguous, of the input's dtype: the caller's own
    array when it already is) and the symbol sizes they bind."""
    sizes: dict[str, int] = {}
    arrays = []
    for n in inputs:
        a = feeds.get(n.name)
        if a is None:
            raise ValueError(f"missing graph input {n.name!r}")
        if a.dtype != np_dtype(n.out.dtype) or not a.flags.c_contiguous:
            a = np.ascontiguousarray(a, dtype=np_dtype(n.out.dtype))
        unify(n.out.shape, a.shape, sizes, f"input {n.name}")
        arrays.append(a)
    if sizes.get("T", 0) > max_tokens or sizes.get("R", 0) > max_tokens:
        raise RequestError(f"a step of {sizes.get('T')} tokens exceeds the plan's max_batch_tokens {max_tokens}")
    return arrays, sizes


def concrete(shape, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else sizes[d] for d in shape)


class CpuExecutable:
    """The compiled forward function of a graph, its weights, arena and scratch memory."""

    def __init__(self, graph, record: dict, library: Path, weights, max_tokens: int, threads: int | None = None):
        k = record["kernel"]
        self.graph = graph
        self.lib = ctypes.CDLL(str(library))
        self.lib.reft_init(ctypes.c_void_p(_openblas_sgemm()))
        self.fn = getattr(self.lib, "reft_forward")
        self.fn.restype = ctypes.c_int
        self.threads = threads or physical_cores()
        self.symbols = k["symbols"]
        self.max_tokens = int(max_tokens)
        self.inputs = [n for n in self.graph.inputs()]
        names = {n.name for n in self.graph.params()}
        missing = [p for p in k["params"] if p not in names]
        if missing:
            raise PlanError(f"kernel parameter {missing[0]} is not a weight of the graph")
        self.weights = weights
        self.P = (ctypes.c_void_p * max(1, len(k["params"])))(*[weights.address(p) for p in k["params"]])
        self.arena = anon(max(64, int(k["arena_bytes"])))
        self.scratch = anon(4 * int(k["scratch_floats"]) * self.threads, huge=False)
        self.outputs = k["outputs"]
        self.dims = (ctypes.c_int64 * max(1, len(self.symbols)))()
        self.ins = (ctypes.c_void_p * max(1, len(self.inputs)))()
        self._keep: list = []

    def run(self, feeds) -> dict[str, np.ndarray]:
        keep, sizes = bind_inputs(self.inputs, feeds, self.max_tokens)
        for i, a in enumerate(keep):
            self.ins[i] = a.ctypes.data
        for j, s in enumerate(self.symbols):
            self.dims[j] = sizes[s]
        self.fn(self.dims, self.ins, self.P, ctypes.c_void_p(address(self.arena)),
                ctypes.c_void_p(address(self.scratch)), ctypes.c_int(self.threads))
        out = {}
        for name, (off, dtype, shape) in self.outputs.items():
            shp = concrete(shape, sizes)
            if off < 0:  # the output is (a view of) an input the step wrote in place
                out[name] = keep[~off].reshape(shp)
                continue
            count = int(np.prod(shp, dtype=np.int64))
            out[name] = np.frombuffer(self.arena, dtype=np_dtype(dtype), count=count, offset=off).reshape(shp).copy()
        return out

    @staticmethod
    def zeros(shape, dtype: str):
        return np.zeros(shape, np_dtype(dtype))

    @classmethod
    def from_plan(cls, plan, threads: int | None = None) -> "CpuExecutable":
        m = plan.manifest
        record = m["backend"]
        check_target(record["target"])
        weights = HostWeights(plan.path / m["weights"]["files"][0])
        return cls(plan.graph("forward"), record, plan.path / record["kernel"]["library"], weights,
                   int(m["max_batch_tokens"]), threads)
