"""Run a CPU plan: load the compiled library and call one entry point's function once per step."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from ...errors import PlanError, RequestError
from ...ir.types import np_dtype, unify
from ..base import HostBuffers
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


class Entry:
    """One exported function of the library: its C signature's arrays and where its outputs land."""

    def __init__(self, lib, graph, rec: dict, weights, threads: int):
        self.fn = getattr(lib, rec["function"])
        self.fn.restype = ctypes.c_int
        self.symbols = rec["symbols"]
        self.inputs = list(graph.inputs())
        names = {n.name for n in graph.params()}
        missing = [p for p in rec["params"] if p not in names]
        if missing:
            raise PlanError(f"kernel parameter {missing[0]} is not a weight of the graph")
        self.P = (ctypes.c_void_p * max(1, len(rec["params"])))(*[weights.address(p) for p in rec["params"]])
        self.arena = anon(max(64, int(rec["arena_bytes"])))
        self.scratch = anon(4 * int(rec["scratch_floats"]) * threads, huge=False)
        self.outputs = rec["outputs"]
        self.dims = (ctypes.c_int64 * max(1, len(self.symbols)))()
        self.ins = (ctypes.c_void_p * max(1, len(self.inputs)))()


class CpuExecutable(HostBuffers):
    """The compiled library of a plan's entry points, its weights, and each entry's arena and scratch."""

    def __init__(self, graphs, record: dict, library: Path, weights, max_tokens: int, threads: int | None = None):
        if not isinstance(graphs, dict):   # one graph: the forward entry
            graphs = {"forward": graphs}
        entries = record.get("entries") or {"forward": {"function": "reft_forward", "init": "reft_init",
                                                        **record["kernel"]}}
        self.graphs = graphs
        self.graph = graphs.get("forward") or next(iter(graphs.values()))
        self.lib = ctypes.CDLL(str(library))
        sgemm = ctypes.c_void_p(_openblas_sgemm())
        for rec in entries.values():
            getattr(self.lib, rec["init"])(sgemm)
        self.threads = threads or physical_cores()
        self.max_tokens = int(max_tokens)
        self.weights = weights
        self.layouts = dict(record.get("layouts", {}))   # weight -> physical layout, where not row-major
        self.entries = {e: Entry(self.lib, graphs[e], rec, weights, self.threads) for e, rec in entries.items()}
        # reproducible mode switches (linear.h g_det), one per entry's source; a plan compiled before
        # they existed has none
        setters = [getattr(self.lib, rec["init"].replace("reft_init", "reft_set_deterministic"), None)
                   for rec in entries.values()]
        self._det_setters = [f for f in setters if f is not None] if all(setters) else []
        self._det = False

    @property
    def supports_reproducible(self) -> bool:
        """Whether set_deterministic works: the plan's library has the switch."""
        return bool(self._det_setters)

    def set_deterministic(self, on: bool) -> None:
        """Run the following calls in reproducible mode (every matmul through the GEMV / tile kernels,
        whose results for a token never depend on the rest of the batch) or back in the fast one."""
        if not self._det_setters:
            raise PlanError("this plan's kernels predate reproducible mode; recompile it with reftc compile")
        if bool(on) != self._det:
            for f in self._det_setters:
                f(ctypes.c_int(int(bool(on))))
            self._det = bool(on)

    def run(self, feeds, entry: str = "forward") -> dict[str, np.ndarray]:
        ep = self.entries[entry]
        keep, sizes = bind_inputs(ep.inputs, feeds, self.max_tokens)
        for i, a in enumerate(keep):
            ep.ins[i] = a.ctypes.data
        for j, s in enumerate(ep.symbols):
            ep.dims[j] = sizes[s]
        ep.fn(ep.dims, ep.ins, ep.P, ctypes.c_void_p(address(ep.arena)),
              ctypes.c_void_p(address(ep.scratch)), ctypes.c_int(self.threads))
        out = {}
        for name, (off, dtype, shape) in ep.outputs.items():
            shp = concrete(shape, sizes)
            if off < 0:  # the output is (a view of) an input the step wrote in place
                out[name] = keep[~off].reshape(shp)
                continue
            count = int(np.prod(shp, dtype=np.int64))
            out[name] = np.frombuffer(ep.arena, dtype=np_dtype(dtype), count=count, offset=off).reshape(shp).copy()
        return out

    def read_weights(self, names) -> dict[str, np.ndarray]:
        """Copies of weights in the IR's layout: those kept row-major (every weight an entry writes is;
        see lower.choose_layouts); a packed weight is refused rather than returned in another layout."""
        params = {n.name: n.out.type for g in self.graphs.values() for n in g.params()}
        out = {}
        for name in names:
            if name in self.layouts:
                raise PlanError(f"weight {name} is stored {self.layouts[name]}, not in the IR's layout")
            t = params[name]
            out[name] = self.weights.array(name, np_dtype(t.dtype), t.shape).copy()
        return out

    @classmethod
    def from_plan(cls, plan, options=None) -> "CpuExecutable":
        """options: a BackendOptions (threads, writable), or a thread count (older callers)."""
        threads = options if isinstance(options, int) or options is None else options.threads
        writable = bool(getattr(options, "writable", False) or plan.writable_params())
        m = plan.manifest
        record = m["backend"]
        check_target(record["target"])
        weights = HostWeights(plan.path / m["weights"]["files"][0], writable=writable)
        graphs = {e: plan.graph(e) for e in plan.entry_points}
        return cls(graphs, record, plan.path / record["kernel"]["library"], weights,
                   int(m["max_batch_tokens"]), threads)
