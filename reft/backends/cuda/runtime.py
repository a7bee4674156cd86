"""Run a cuda plan: weights in device memory, each entry point's steps launched through the driver
API on one stream, decode-sized steps replayed as CUDA graphs.

The plan record (backend.py) gives each entry point a list of steps: a kernel (cubin, argument
kinds, grid and workspace expressions over its integer args, TMA descriptors) and a binding of each
argument (arena offset, input, weight, constant, workspace, integer expression over the symbols,
float). One run(feeds, entry):

  1. the feeds bind the symbols (T, R, S, MP, NP) by their shapes; host arrays are copied into
     per-input staging buffers, device buffers (from zeros / to_device) are used in place;
  2. the launches for these sizes and input pointers are built (steps whose `rows` range excludes
     the size are skipped; grids, workspace and tensor maps evaluated; parameters packed) and cached;
  3. a step of at most REFT_CUDA_GRAPHS tokens is captured into a CUDA graph the second time its
     key is seen and replayed from then on (LRU of GRAPH_CACHE graphs); other steps launch one by one;
  4. outputs in the arena come back as host arrays; an output bound to a device-buffer input (the
     KV pages written in place) returns that buffer.

Notable:
- A launch depends only on the symbol sizes and input pointers (its key) and on buffers that live
  as long as the executable (weights, arena, constants, workspace), so a cached launch list or graph
  is never stale. Growing the workspace, the one buffer that can move, clears every cache.
- Launches are cached per step too, keyed by the sizes and input pointers that step reads: when
  only MP grows (decode crossing a page), just the attention and KV-write launches are rebuilt.
- Weights are re-laid out on upload so that every tensor starts on a 256-byte boundary (the plan's
  safetensors aligns to the dtype only; 16-byte vector loads and TMA need more).
- The workspace's contents are undefined when a kernel starts: one buffer serves every step.
- Expressions (grids, workspace, integer bindings, tensor-map shapes) are parsed once into closures
  (kernel.compile_expr), since a new key evaluates about ten per step.
"""
from __future__ import annotations

import ast
import ctypes
import struct
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ... import settings
from ...errors import PlanError, RequestError
from ...ir.types import dtype_name, np_dtype, unify
from . import arch as archs
from .driver import CudaError, DeviceMemoryError, NoDeviceError, fmt_bytes, open_device
from .kernel import _FUNCS, compile_expr as compiled

ALIGN = 256                 # device placement of weights, constants and staging buffers
GRAPH_CACHE = 64            # instantiated graphs kept (least recently used evicted)
LAUNCH_CACHE = 256          # launch lists kept per executable, and per step
UPLOAD_CHUNK = 64 << 20
DYNAMIC_SMEM_DEFAULT = 48 * 1024

# argument kind -> (struct format, bytes, alignment) in the packed parameter buffer; the sizes are
# kernel.ARG_KINDS' (what the PTX entry declares), tensor maps aligned as CUtensorMap is (64)
LAYOUT = {"ptr": ("<Q", 8, 8), "i32": ("<i", 4, 4), "i64": ("<q", 8, 8), "f32": ("<f", 4, 4),
          "tmap": (None, 128, 64)}
RANGES = {"ptr": (0, 2**64 - 1), "i32": (-2**31, 2**31 - 1), "i64": (-2**63, 2**63 - 1)}
# plan dtype -> (CU_TENSOR_MAP_DATA_TYPE_ suffix, element bytes)
TMA_DTYPES = {"bfloat16": ("BFLOAT16", 2), "float16": ("FLOAT16", 2), "float32": ("FLOAT32", 4),
              "int32": ("INT32", 4), "uint8": ("UINT8", 1)}


# -- expressions ------------------------------------------------------------------------------------
@lru_cache(maxsize=8192)
def names_in(expr: str, where: str) -> set[str]:
    """The symbols an expression reads (a malformed one is a PlanError)."""
    try:
        compiled(expr)
    except ValueError as e:
        raise PlanError(f"{where}: {e}") from None
    return {n.id for n in ast.walk(ast.parse(str(expr), mode="eval")) if isinstance(n, ast.Name)} - set(_FUNCS)


def concrete(shape, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else sizes[d] for d in shape)


def selected(rows, sizes: dict[str, int]) -> bool:
    """A step's `rows: [SYMBOL, lo, hi]` condition (None: always)."""
    if not rows:
        return True
    sym, lo, hi = rows
    n = sizes[sym]
    return lo <= n and (hi is None or n <= hi)


# -- kernel parameters ------------------------------------------------------------------------------
class Params:
    """One launch's parameters as cuLaunchKernel reads them: the values packed in one buffer, each at
    its natural alignment, and the void*[] of their addresses (`address` is what the driver gets)."""
    __slots__ = ("raw", "ptrs", "address", "offsets")

    def __init__(self, kinds: list[str], values: list, kernel: str = "kernel", names: list[str] | None = None):
        offsets, at = [], 0
        for k in kinds:
            _, size, align = LAYOUT[k]
            at = -(-at // align) * align
            offsets.append(at)
            at += size
        self.raw = (ctypes.c_char * (at + 64))()
        base = ctypes.addressof(self.raw)
        pad = -base % 64
        self.offsets = [pad + o for o in offsets]
        for i, (k, off, v) in enumerate(zip(kinds, self.offsets, values)):
            fmt = LAYOUT[k][0]
            what = f"kernel {kernel}: argument {names[i] if names else i} ({k})"
            if fmt is None:
                if not isinstance(v, (bytes, bytearray)) or len(v) != 128:
                    raise PlanError(f"{what} needs a 128-byte tensor map")
                ctypes.memmove(base + off, bytes(v), 128)
                continue
            if k in RANGES:
                lo, hi = RANGES[k]
                if not lo <= int(v) <= hi:
                    raise PlanError(f"{what} = {v} is out of range")
                v = int(v)
            struct.pack_into(fmt, self.raw, off, v)
        self.ptrs = (ctypes.c_void_p * max(1, len(kinds)))(*[base + o for o in self.offsets])
        self.address = ctypes.addressof(self.ptrs)


@dataclass(frozen=True)
class TmaRequest:
    """The arguments of one cuTensorMapEncodeTiled call (innermost dimension first)."""
    dtype: str                  # CU_TENSOR_MAP_DATA_TYPE_ suffix
    address: int
    dims: tuple[int, ...]       # elements
    strides: tuple[int, ...]    # bytes, of dims 1..
    box: tuple[int, ...]        # elements
    swizzle: int                # bytes: 0, 32, 64, 128


def tma_request(kernel: str, arg: str, spec: dict, address: int, ints: dict[str, int]) -> TmaRequest:
    """A TmaSpec record evaluated on a launch's integer args and tensor pointer, checked against the
    driver's rules so that a bad descriptor is a clear error, not CUDA_ERROR_INVALID_VALUE."""
    what = f"kernel {kernel}: tensor map {arg}"
    if spec["dtype"] not in TMA_DTYPES:
        raise PlanError(f"{what}: dtype {spec['dtype']} has no tensor-map type")
    code, esize = TMA_DTYPES[spec["dtype"]]
    dims = tuple(compiled(e)(ints) for e in spec["dims"])
    strides = tuple(compiled(e)(ints) for e in spec["strides"])
    box = tuple(int(b) for b in spec["box"])
    swizzle = int(spec.get("swizzle", 0))
    rank = len(dims)
    if not 1 <= rank <= 5 or len(box) != rank or len(strides) != rank - 1:
        raise PlanError(f"{what}: rank {rank} with {len(strides)} strides and a {len(box)}-d box")
    if address % 16:
        raise PlanError(f"{what}: tensor address {address:#x} is not 16-byte aligned")
    if any(not 0 < d <= 2**32 for d in dims):
        raise PlanError(f"{what}: dims {dims} out of range")
    if any(s % 16 or not 0 < s < 2**40 for s in strides):
        raise PlanError(f"{what}: strides {strides} must be positive multiples of 16 bytes")
    if any(not 0 < b <= 256 for b in box) or box[0] * esize % 16:
        raise PlanError(f"{what}: box {box} must be 1..256 per dim, its inner row a multiple of 16 bytes")
    if swizzle not in (0, 32, 64, 128) or (swizzle and box[0] * esize > swizzle):
        raise PlanError(f"{what}: swizzle {swizzle} does not fit an inner box row of {box[0] * esize} bytes")
    return TmaRequest(code, int(address), dims, strides, box, swizzle)


# -- bindings ---------------------------------------------------------------------------------------
@dataclass
class Bases:
    """Where the buffers a binding names live on the device."""
    arena: int
    workspace: int
    inputs: dict        # input name -> pointer (its staging buffer or the fed DeviceBuffer)
    params: dict        # weight name -> pointer
    consts: dict        # constant name -> pointer


def pointer(b: dict, bases: Bases) -> int:
    if "arena" in b:
        return bases.arena + int(b["arena"])
    if "input" in b:
        return bases.inputs[b["input"]] + int(b.get("offset", 0))
    if "param" in b:
        return bases.params[b["param"]] + int(b.get("offset", 0))
    if "const" in b:
        return bases.consts[b["const"]]
    if b.get("workspace"):
        return bases.workspace
    raise PlanError(f"unknown buffer binding {b}")


POINTER_KEYS = ("arena", "input", "param", "const", "workspace")


@dataclass
class KernelInfo:
    name: str
    func: object                    # CUfunction
    args: list                      # [(name, kind)]
    block: tuple
    grid: tuple                     # expressions over the int args
    smem: int
    workspace: str
    tmaps: dict                     # arg name -> TmaSpec record
    registers: int
    static_smem: int

    @classmethod
    def from_record(cls, name: str, r: dict, func) -> "KernelInfo":
        res = r.get("resources") or {}
        return cls(name, func, [tuple(a) for a in r["args"]], tuple(r["block"]), tuple(str(g) for g in r["grid"]),
                   int(r.get("smem", 0)), str(r.get("workspace", "0")), {n: s for n, s in r.get("tmaps", [])},
                   int(res.get("registers", 0)), int(res.get("smem", 0)))


class Launch:
    __slots__ = ("name", "func", "grid", "block", "smem", "params", "workspace")

    def __init__(self, name, func, grid, block, smem, params, workspace):
        self.name, self.func, self.grid, self.block, self.smem = name, func, grid, block, smem
        self.params, self.workspace = params, workspace


class Step:
    """One step of an entry: its kernel, its argument bindings, and its launches cached by the sizes
    and input pointers it reads."""

    def __init__(self, kernel: KernelInfo, rec: dict, entry: str, index: int):
        self.kernel, self.args, self.rows = kernel, rec.get("args", {}), rec.get("rows")
        where = f"entry {entry} step {index} ({kernel.name})"
        syms, inputs = set(), set()
        for name, kind in kernel.args:
            if kind == "tmap":
                spec = kernel.tmaps.get(name)
                if spec is None or (spec["tensor"], "ptr") not in kernel.args:
                    raise PlanError(f"{where}: tensor map {name} has no spec over a pointer argument")
                continue
            b = self.args.get(name)
            if b is None:
                raise PlanError(f"{where}: argument {name} is not bound")
            ptr = any(k in b for k in POINTER_KEYS)
            scalar = {"i32": "int", "i64": "int", "f32": "f32"}.get(kind)
            if (kind == "ptr") != ptr or (scalar and scalar not in b):
                raise PlanError(f"{where}: argument {name} ({kind}) is bound to {b}")
            if "int" in b:
                syms |= names_in(b["int"], where)
            if "input" in b:
                inputs.add(b["input"])
        if self.rows:
            syms.add(self.rows[0])
        self.syms, self.inputs = tuple(sorted(syms)), tuple(sorted(inputs))
        self.cache: dict = {}

    def ints(self, sizes: dict[str, int]) -> dict[str, int]:
        return {name: compiled(self.args[name]["int"])(sizes) for name, kind in self.kernel.args
                if kind in ("i32", "i64")}

    def build(self, sizes: dict[str, int], bases: Bases, encode) -> Launch:
        """The launch for these sizes and buffers; `encode(TmaRequest) -> bytes` makes tensor maps."""
        k = self.kernel
        ints = self.ints(sizes)
        values = {}
        for name, kind in k.args:
            if kind == "ptr":
                values[name] = pointer(self.args[name], bases)
            elif kind == "f32":
                values[name] = float(self.args[name]["f32"])
            elif kind != "tmap":
                values[name] = ints[name]
        for name, spec in k.tmaps.items():
            values[name] = encode(tma_request(k.name, name, spec, values[spec["tensor"]], ints))
        grid = tuple(compiled(e)(ints) for e in k.grid)
        ws = compiled(k.workspace)(ints)
        params = Params([kind for _, kind in k.args], [values[n] for n, _ in k.args], k.name, [n for n, _ in k.args])
        return Launch(k.name, k.func, grid, k.block, k.smem, params, ws)

    def launch(self, sizes: dict[str, int], bases: Bases, encode) -> Launch | None:
        """The cached launch, or None when the step's rows range excludes these sizes."""
        if self.rows and not selected(self.rows, sizes):
            return None
        key = (tuple(sizes[s] for s in self.syms), tuple(bases.inputs[n] for n in self.inputs))
        got = self.cache.get(key)
        if got is None:
            if len(self.cache) >= LAUNCH_CACHE:
                self.cache.clear()
            got = self.cache[key] = self.build(sizes, bases, encode)
        return got


class Entry:
    """One entry point: its inputs (name, dtype, symbolic shape), steps, outputs and constants."""

    def __init__(self, name: str, rec: dict, signature: dict, kernels: dict[str, KernelInfo]):
        self.name = name
        ins = signature.get("inputs", {})
        self.inputs = []
        for n in rec["inputs"]:
            if n not in ins:
                raise PlanError(f"entry {name}: input {n} is not in the entry point's signature")
            self.inputs.append((n, ins[n]["dtype"], tuple(ins[n]["shape"])))
        self.names = tuple(n for n, _, _ in self.inputs)
        self.specs = [(n, d, s, np_dtype(d)) for n, d, s in self.inputs]
        self.symbols = tuple(sorted({d for _, _, s in self.inputs for d in s if isinstance(d, str)}))
        self.params = list(rec.get("params", []))
        self.constants = rec.get("constants", {})
        self.arena_bytes = int(rec.get("arena_bytes", 0))
        self.outputs = rec["outputs"]
        self.consts: dict[str, int] = {}     # constant name -> pointer, once uploaded
        self.steps = []
        for i, s in enumerate(rec["steps"]):
            if s["kernel"] not in kernels:
                raise PlanError(f"entry {name} step {i}: kernel {s['kernel']} is not in the plan")
            step = Step(kernels[s["kernel"]], s, name, i)
            unknown = [x for x in step.syms if x not in self.symbols]
            missing = [x for x in step.inputs if x not in self.names]
            if unknown or missing:
                raise PlanError(f"entry {name} step {i}: binds unknown symbols {unknown} or inputs {missing}")
            self.steps.append(step)

    def bind(self, feeds, max_tokens: int):
        """(sizes, host arrays, device buffers) of the feeds; host arrays C-contiguous in the input's
        dtype. The shape check is unify's, inlined: this runs once per step for every KV buffer."""
        sizes: dict[str, int] = {}
        host, device = {}, {}
        for name, dtype, shape, dt in self.specs:
            a = feeds.get(name)
            if a is None:
                raise ValueError(f"missing graph input {name!r}")
            if a.__class__ is DeviceBuffer:
                if a.dtype != dtype:
                    raise ValueError(f"input {name}: a {a.dtype} device buffer where the plan takes {dtype}")
                device[name] = a
            else:
                if a.__class__ is not np.ndarray or a.dtype != dt or not a.flags.c_contiguous:
                    a = np.ascontiguousarray(a, dtype=dt)
                host[name] = a
            got = a.shape
            if len(got) != len(shape):
                unify(shape, got, sizes, f"input {name}")
            for d, c in zip(shape, got):
                if d.__class__ is int:
                    if d != c:
                        unify(shape, got, sizes, f"input {name}")
                elif sizes.setdefault(d, c) != c:
                    unify(shape, got, sizes, f"input {name}")
        if sizes.get("T", 0) > max_tokens or sizes.get("R", 0) > max_tokens:
            raise RequestError(f"a step of {sizes.get('T')} tokens exceeds the plan's max_batch_tokens {max_tokens}")
        return sizes, host, device

    def staging_hint(self, name: str, sizes: dict[str, int], max_tokens: int) -> int:
        """Bytes input `name` can take: T, R and S at max_batch_tokens, other symbols as now."""
        _, dtype, shape = self.inputs[self.names.index(name)]
        big = {**sizes, "T": max_tokens, "R": max_tokens, "S": max_tokens}
        return int(np.prod(concrete(shape, big), dtype=np.int64)) * np_dtype(dtype).itemsize

    def launches(self, sizes: dict[str, int], bases: Bases, encode) -> list[Launch]:
        out = []
        for s in self.steps:
            got = s.launch(sizes, bases, encode)
            if got is not None and min(got.grid) > 0:   # no work (e.g. no logit rows this step)
                out.append(got)
        return out


# -- caches -----------------------------------------------------------------------------------------
class Lru:
    def __init__(self, capacity: int, drop=None):
        self.capacity, self.drop = capacity, drop
        self.items: OrderedDict = OrderedDict()

    def get(self, key):
        got = self.items.get(key)
        if got is not None:
            self.items.move_to_end(key)
        return got

    def put(self, key, value) -> None:
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.capacity:
            _, old = self.items.popitem(last=False)
            if self.drop:
                self.drop(old)

    def clear(self) -> None:
        items, self.items = self.items, OrderedDict()
        if self.drop:
            for v in items.values():
                self.drop(v)

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, key) -> bool:
        return key in self.items


class GraphCache(Lru):
    """Instantiated CUDA graphs by step key. A key is captured the second time it is seen (`after`
    earlier sightings): a shape that comes once is not worth a capture."""

    def __init__(self, capacity: int, destroy, after: int = 1):
        super().__init__(capacity, destroy)
        self.after = after
        self.seen: OrderedDict = OrderedDict()

    def wants(self, key) -> bool:
        n = self.seen.pop(key, 0) + 1
        if n > self.after:
            return True
        self.seen[key] = n
        if len(self.seen) > 4 * self.capacity:
            self.seen.popitem(last=False)
        return False

    def clear(self) -> None:
        super().clear()
        self.seen.clear()


# -- device memory ----------------------------------------------------------------------------------
class DeviceMemory:
    """Every allocation of one executable (freed by close); out of memory is one line with the sizes.
    Frees asked for while a graph is being captured wait until it ends (cuMemFree would break it)."""

    def __init__(self, drv, device: str):
        self.drv, self.device = drv, device
        self.live: dict[int, int] = {}
        self.capturing = False
        self.deferred: list[int] = []

    def alloc(self, nbytes: int, what: str) -> int:
        try:
            ptr = self.drv.alloc(nbytes)
        except CudaError as e:
            if e.code != "CUDA_ERROR_OUT_OF_MEMORY":
                raise
            free, total = self.drv.mem_info()
            raise DeviceMemoryError(f"out of device memory for {what}: needs {fmt_bytes(nbytes)}, "
                                    f"{fmt_bytes(free)} free of {fmt_bytes(total)} on {self.device}") from None
        self.live[ptr] = int(nbytes)
        return ptr

    def free(self, ptr: int) -> None:
        if self.capturing:
            self.deferred.append(ptr)
        elif self.live.pop(ptr, None) is not None:
            self.drv.make_current()
            self.drv.free(ptr)

    def flush(self) -> None:
        pending, self.deferred = self.deferred, []
        for p in pending:
            self.free(p)

    @property
    def used(self) -> int:
        return sum(self.live.values())

    def close(self) -> None:
        """Free everything; a failing free (a broken context) does not keep the others."""
        self.capturing = False
        self.deferred.clear()
        failed = None
        for p in list(self.live):
            try:
                self.free(p)
            except CudaError as e:
                failed = e
        if failed is not None:
            raise failed


class DeviceBuffer:
    """Device memory the runtime owns (the KV-cache pages): run() takes it as a feed and uses it in
    place. Freed when it is garbage-collected or when its executable closes."""
    __slots__ = ("ptr", "shape", "dtype", "nbytes", "_finalizer", "__weakref__")

    def __init__(self, ptr: int, shape: tuple, dtype: str, nbytes: int, release=None):
        self.ptr, self.shape, self.dtype, self.nbytes = ptr, tuple(shape), dtype, nbytes
        self._finalizer = None
        if release is not None:
            self._finalizer = weakref.finalize(self, release, ptr)
            self._finalizer.atexit = False   # process exit frees device memory anyway

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"DeviceBuffer({self.dtype}{list(self.shape)} at {self.ptr:#x})"


def upload_weights(drv, memory: DeviceMemory, path: Path, progress: bool) -> tuple[dict, dict]:
    """The plan's safetensors in one device allocation, each tensor 256-byte aligned:
    (name -> pointer, name -> (dtype, shape))."""
    from ...errors import ModelError
    from ...frontends.safetensors import SafetensorsFile
    from ...progress import progress_bar

    try:
        f = SafetensorsFile(path)
    except ModelError as e:
        raise PlanError(f"plan weights: {e}") from None
    with f:
        info, offsets, at = {}, {}, 0
        for n in f.names():
            dtype, shape = f.info(n)
            info[n] = (dtype, shape)
            at = -(-at // ALIGN) * ALIGN
            offsets[n] = at
            at += int(np.prod(shape, dtype=np.int64)) * np_dtype(dtype).itemsize
        base = memory.alloc(max(at, ALIGN), "the plan's weights")
        with progress_bar(at, "uploading weights", enabled=progress) as bar:
            for n in f.names():
                a = f.get(n)
                for o in range(0, a.nbytes, UPLOAD_CHUNK):
                    k = min(UPLOAD_CHUNK, a.nbytes - o)
                    drv.htod(base + offsets[n] + o, a.ctypes.data + o, k)
                    bar.update(k)
                del a
        drv.synchronize()   # the mapped file closes next
    return {n: base + o for n, o in offsets.items()}, info


def upload_constants(drv, memory: DeviceMemory, constants: dict, entry: str) -> dict[str, int]:
    arrays = {}
    for n, c in constants.items():
        if c.get("dtype") not in ("float32", "int32"):
            raise PlanError(f"entry {entry}: constant {n} has dtype {c.get('dtype')}")
        arrays[n] = np.ascontiguousarray(c["data"], dtype=np_dtype(c["dtype"]))
    if not arrays:
        return {}
    offsets, at = {}, 0
    for n, a in arrays.items():
        offsets[n] = at
        at += -(-a.nbytes // ALIGN) * ALIGN
    base = memory.alloc(max(at, ALIGN), f"the constants of entry {entry}")
    for n, a in arrays.items():
        drv.htod(base + offsets[n], a.ctypes.data, a.nbytes)
    drv.synchronize()
    return {n: base + o for n, o in offsets.items()}


def runs_on(plan_arch: str, cc: tuple[int, int]) -> bool:
    """SASS runs on its own major version from its minor up; an `a` (arch-specific) target only on its own."""
    a = archs.get(plan_arch)
    if plan_arch.endswith("a"):
        return tuple(cc) == a.cc
    return cc[0] == a.cc[0] and cc[1] >= a.cc[1]


# -- the executable ---------------------------------------------------------------------------------
class CudaExecutable:
    """A plan's kernels, weights and buffers on one GPU (the Executable of reft/backends/base.py)."""

    def __init__(self, drv, plan, options=None):
        self.drv = drv
        self.path = Path(plan.path)
        self._closed = False
        self._lock = threading.RLock()
        self._modules: list = []
        self._staging: dict[str, tuple[int, int]] = {}
        self._tmaps: dict = {}
        self._checked: set = set()
        self.workspace, self.workspace_bytes = 0, 0
        self.sampling, self._sample_buf = None, 0
        self.launch_lists = Lru(LAUNCH_CACHE)
        self.graphs = GraphCache(GRAPH_CACHE, self._destroy_graph)
        self.sync = settings.cuda_sync()
        self.graph_tokens = 0 if self.sync else settings.cuda_graphs()
        self.memory = DeviceMemory(drv, "GPU 0")
        try:
            self._load(plan.manifest, options)
        except BaseException:
            self.close()
            raise

    def _load(self, m: dict, options) -> None:
        rec = m["backend"]
        self.arch = archs.get(rec["arch"])
        self.device = self.memory.device = self.drv.name()
        cc = self.drv.compute_capability()
        if not runs_on(self.arch.name, cc):
            want = archs.from_cc(*cc)
            fix = (f"recompile it with `reftc compile --backend cuda --arch {want}`" if want else
                   "the cuda backend supports " + ", ".join(f"{a.name} ({a.label})" for a in archs.ARCHS.values()))
            raise NoDeviceError(f"plan {self.path} was compiled for {self.arch.name} ({self.arch.label}) but GPU 0 is"
                                f" an {self.device} (compute capability {cc[0]}.{cc[1]}): {fix}")
        self.max_tokens = int(m.get("max_batch_tokens") or getattr(options, "max_batch_tokens", 512))
        self.kernels = self._load_kernels(rec["kernels"])
        self.sampling = rec.get("sampling")   # backend.py _sampling_kernels: generate plans
        if self.sampling and any(self.sampling[r] not in self.kernels for r in ("argmax", "sample")):
            raise PlanError(f"{self.path}: the sampling kernels {self.sampling['argmax']}, {self.sampling['sample']}"
                            " are not among the plan's kernels")
        self.entries = {e: Entry(e, r, m.get("entry_points", {}).get(e, {}), self.kernels)
                        for e, r in rec["entries"].items()}
        self.params, self.weight_info = upload_weights(self.drv, self.memory, self.path / m["weights"]["files"][0],
                                                       _show_progress())
        for ep in self.entries.values():
            missing = [p for p in ep.params if p not in self.params]
            if missing:
                raise PlanError(f"entry {ep.name}: weight {missing[0]} is not in the plan's weights")
            ep.consts = upload_constants(self.drv, self.memory, ep.constants, ep.name)
        self.arena = self.memory.alloc(max([ALIGN] + [ep.arena_bytes for ep in self.entries.values()]),
                                       "the activation arena")

    @classmethod
    def from_plan(cls, plan, options=None) -> "CudaExecutable":
        arch = plan.manifest["backend"].get("arch", "?")
        drv = open_device(f"plan {plan.path} was compiled for {arch} and needs an NVIDIA GPU")
        return cls(drv, plan, options)

    def _load_kernels(self, records: dict) -> dict[str, KernelInfo]:
        out = {}
        for name, r in records.items():
            path = self.path / r["cubin"]
            try:
                image = path.read_bytes()
            except OSError as e:
                raise PlanError(f"{path}: cannot read the cubin of kernel {name} ({e.strerror or e})") from None
            try:
                module = self.drv.load_module(image)
            except CudaError as e:
                raise PlanError(f"kernel {name} ({path.name}) does not load on {self.device}: {e}") from None
            self._modules.append(module)
            func = self.drv.function(module, name)
            k = KernelInfo.from_record(name, r, func)
            if k.smem + k.static_smem > DYNAMIC_SMEM_DEFAULT:
                self.drv.set_dynamic_smem(func, k.smem)
            out[name] = k
        return out

    # -- running --------------------------------------------------------------------------------
    def run(self, feeds, entry: str = "forward") -> dict:
        ep = self._entry(entry)
        with self._lock:
            sizes, ptrs, host, device = self._forward(ep, feeds)
            return self._outputs(ep, sizes, ptrs, host, device)

    @property
    def samples_on_device(self) -> bool:
        """Whether run_sampled works: the plan has the sampling kernels (a generate plan)."""
        return self.sampling is not None

    def run_sampled(self, feeds, temperature, top_k, top_p, u) -> np.ndarray:
        """Run the forward entry and draw one token per row of its logits on the device: int32 ids
        [R] come back instead of R x vocab float32 logits. Per row: temperature (<= 0: argmax),
        top_k (0: off), top_p (1: off) and the uniform number u that the row's Sampler drew
        (runtime/sampler.py, Sampler.device_draw); the kernel's rule is in templates/sample.cu.j2.
        Every temperature 0 takes the argmax kernel and reads none of the other three."""
        s = self.sampling
        if s is None:
            raise PlanError(f"{self.path}: the plan has no sampling kernels (recompile it with this reftc)")
        ep = self._entry(s["entry"])
        cols = [np.ascontiguousarray(temperature, np.float32), np.ascontiguousarray(top_k, np.int32),
                np.ascontiguousarray(top_p, np.float32), np.ascontiguousarray(u, np.float32)]
        with self._lock:
            sizes, ptrs, _, _ = self._forward(ep, feeds)
            R = sizes[s["rows"]]
            if any(c.shape != (R,) for c in cols):
                raise ValueError(f"run_sampled: {R} logit rows, but sampling parameters of shapes"
                                 f" {[c.shape for c in cols]}")
            if R == 0:
                return np.zeros(0, np.int32)
            logits = pointer(ep.outputs[s["output"]]["bind"], self._bases(ep, ptrs))
            buf = self._sampling_buffer()
            greedy = not bool((cols[0] > 0).any())
            k = self.kernels[s["argmax" if greedy else "sample"]]
            values = {"logits": logits, "ids": buf, "R": R}
            if not greedy:   # buf: ids [max_tokens], then temperature, top_k, top_p, u [R] each, in one copy
                packed = np.concatenate([c.view(np.uint32) for c in cols])
                self.drv.htod(buf + 4 * self.max_tokens, packed.ctypes.data, packed.nbytes)
                for i, name in enumerate(("temperature", "top_k", "top_p", "u")):
                    values[name] = buf + 4 * self.max_tokens + 4 * R * i
            grid = tuple(compiled(e)({"R": R}) for e in k.grid)
            if (k.name, grid) not in self._checked:
                archs.check_launch(self.arch, k.name, k.block, grid, k.smem, k.registers, k.static_smem)
                self._checked.add((k.name, grid))
            params = Params([kind for _, kind in k.args], [values[n] for n, _ in k.args], k.name, [n for n, _ in k.args])
            self._launch(Launch(k.name, k.func, grid, k.block, k.smem, params, 0))
            ids = np.empty(R, np.int32)
            self.drv.dtoh(ids.ctypes.data, buf, ids.nbytes)
            self.drv.synchronize()
            return ids

    def _entry(self, entry: str) -> Entry:
        ep = self.entries.get(entry)
        if ep is None:
            raise PlanError(f"{self.path}: no entry point {entry!r}")
        return ep

    def _forward(self, ep: Entry, feeds) -> tuple:
        """Stage the host feeds and launch (or replay) the entry's steps; its outputs stay on the device."""
        self._check_open()
        self.drv.make_current()
        sizes, host, device = ep.bind(feeds, self.max_tokens)
        ptrs = {n: b.ptr for n, b in device.items()}
        for n, a in host.items():
            ptrs[n] = p = self._stage(ep, n, a.nbytes, sizes)
            self.drv.htod(p, a.ctypes.data, a.nbytes)
        key = (ep.name, tuple(map(sizes.__getitem__, ep.symbols)), tuple(map(ptrs.__getitem__, ep.names)))
        launches = self._launches(ep, key, sizes, ptrs)
        if self.graph_tokens and 0 < sizes.get("T", 0) <= self.graph_tokens:
            self._replay(key, launches)
        else:
            for L in launches:
                self._launch(L)
        return sizes, ptrs, host, device

    def _sampling_buffer(self) -> int:
        """Device memory for run_sampled: room for max_tokens ids and 4 x max_tokens parameters."""
        if not self._sample_buf:
            self._sample_buf = self.memory.alloc(5 * 4 * self.max_tokens, "the sampling parameters and token ids")
        return self._sample_buf

    def _bases(self, ep: Entry, ptrs: dict) -> Bases:
        return Bases(self.arena, self.workspace, ptrs, self.params, ep.consts)

    def _launches(self, ep: Entry, key, sizes, ptrs) -> list[Launch]:
        got = self.launch_lists.get(key)
        if got is not None:
            return got
        launches = ep.launches(sizes, self._bases(ep, ptrs), self._encode)
        need = max((L.workspace for L in launches), default=0)
        if need > self.workspace_bytes:
            self._grow_workspace(need)
            launches = ep.launches(sizes, self._bases(ep, ptrs), self._encode)
        for L in launches:
            if (L.name, L.grid) not in self._checked:
                k = self.kernels[L.name]
                archs.check_launch(self.arch, k.name, k.block, L.grid, k.smem, k.registers, k.static_smem)
                self._checked.add((L.name, L.grid))
        self.launch_lists.put(key, launches)
        return launches

    def _launch(self, L: Launch) -> None:
        self.drv.launch(L.func, L.grid, L.block, L.smem, L.params.address, L.name)
        if self.sync:
            try:
                self.drv.synchronize()
            except CudaError as e:
                raise CudaError(f"kernel {L.name} failed: {e}", e.code) from None

    def _replay(self, key, launches: list[Launch]) -> None:
        exe = self.graphs.get(key)
        if exe is None:
            if not self.graphs.wants(key):
                for L in launches:
                    self._launch(L)
                return
            exe = self._capture(launches)
            self.graphs.put(key, exe)
        self.drv.graph_launch(exe)

    def _capture(self, launches: list[Launch]):
        self.memory.capturing = True
        try:
            self.drv.begin_capture()
            try:
                for L in launches:
                    self.drv.launch(L.func, L.grid, L.block, L.smem, L.params.address, L.name)
            except BaseException:
                self.drv.abort_capture()
                raise
            return self.drv.instantiate(self.drv.end_capture())
        finally:
            self.memory.capturing = False
            self.memory.flush()

    def _destroy_graph(self, exe) -> None:
        self.drv.graph_destroy(exe)

    def _encode(self, req: TmaRequest) -> bytes:
        got = self._tmaps.get(req)
        if got is None:
            if len(self._tmaps) >= 4096:
                self._tmaps.clear()
            got = self._tmaps[req] = self.drv.encode_tiled(req)
        return got

    def _stage(self, ep: Entry, name: str, nbytes: int, sizes) -> int:
        """The staging buffer of host input `name`, grown (never shrunk) to hold nbytes."""
        ptr, cap = self._staging.get(name, (0, 0))
        if ptr and nbytes <= cap:
            return ptr
        if ptr:
            self.drv.synchronize()
            self.memory.free(ptr)
        cap = max(nbytes, 2 * cap, ep.staging_hint(name, sizes, self.max_tokens), ALIGN)
        cap = -(-cap // ALIGN) * ALIGN
        ptr = self.memory.alloc(cap, f"the staging buffer of input {name}")
        self._staging[name] = (ptr, cap)
        return ptr

    def _grow_workspace(self, need: int) -> None:
        if self.workspace:
            self.drv.synchronize()
            self.memory.free(self.workspace)
        size = -(-max(need, 2 * self.workspace_bytes) // ALIGN) * ALIGN
        self.workspace, self.workspace_bytes = 0, 0
        self.workspace = self.memory.alloc(size, "kernel workspace")
        self.workspace_bytes = size
        self.launch_lists.clear()
        self.graphs.clear()
        for ep in self.entries.values():
            for s in ep.steps:
                s.cache.clear()

    def _outputs(self, ep: Entry, sizes, ptrs, host, device) -> dict:
        out, copied = {}, False
        bases = self._bases(ep, ptrs)
        for name, o in ep.outputs.items():
            b = o["bind"]
            shape = concrete(o["shape"], sizes)
            if "input" in b and b["input"] in device:
                out[name] = device[b["input"]]
                continue
            arr = host.get(b["input"]) if "input" in b else None
            if arr is None or not arr.flags.writeable or arr.shape != shape or arr.dtype != np_dtype(o["dtype"]):
                arr = np.empty(shape, np_dtype(o["dtype"]))
            self.drv.dtoh(arr.ctypes.data, pointer(b, bases), arr.nbytes)
            out[name] = arr
            copied = True
        if copied:
            self.drv.synchronize()
        return out

    # -- buffers --------------------------------------------------------------------------------
    def zeros(self, shape, dtype: str) -> DeviceBuffer:
        shape = tuple(int(d) for d in shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np_dtype(dtype).itemsize
        with self._lock:
            self._check_open()
            self.drv.make_current()
            ptr = self.memory.alloc(nbytes, f"a {dtype}{list(shape)} buffer (KV-cache pages or other runtime state)")
            self.drv.memset(ptr, 0, nbytes)
        return DeviceBuffer(ptr, shape, dtype, nbytes, self.memory.free)

    def to_device(self, array: np.ndarray) -> DeviceBuffer:
        a = np.ascontiguousarray(array)
        dtype = dtype_name(a.dtype)
        with self._lock:
            self._check_open()
            self.drv.make_current()
            ptr = self.memory.alloc(a.nbytes, f"a {dtype}{list(a.shape)} buffer")
            self.drv.htod(ptr, a.ctypes.data, a.nbytes)
            self.drv.synchronize()
        return DeviceBuffer(ptr, a.shape, dtype, a.nbytes, self.memory.free)

    def to_host(self, buffer) -> np.ndarray:
        if not isinstance(buffer, DeviceBuffer):
            return np.array(buffer, copy=True)
        out = np.empty(buffer.shape, np_dtype(buffer.dtype))
        with self._lock:
            self._check_open()
            self.drv.make_current()
            self.drv.dtoh(out.ctypes.data, buffer.ptr, buffer.nbytes)
            self.drv.synchronize()
        return out

    def synchronize(self) -> None:
        with self._lock:
            self._check_open()
            self.drv.make_current()
            self.drv.synchronize()

    def read_weights(self, names) -> dict[str, np.ndarray]:
        """Copies of weights (the cuda backend keeps the IR's row-major layout)."""
        out = {}
        with self._lock:
            self._check_open()
            self.drv.make_current()
            for n in names:
                if n not in self.params:
                    raise PlanError(f"{self.path}: no weight {n!r}")
                dtype, shape = self.weight_info[n]
                a = out[n] = np.empty(shape, np_dtype(dtype))
                self.drv.dtoh(a.ctypes.data, self.params[n], a.nbytes)
            self.drv.synchronize()
        return out

    def free_memory(self) -> int:
        """Bytes of device memory free now (after the weights, arena and any buffers so far)."""
        with self._lock:
            self._check_open()
            self.drv.make_current()
            return int(self.drv.mem_info()[0])

    @property
    def memory_used(self) -> int:
        """Bytes of device memory this executable holds."""
        return self.memory.used

    def _check_open(self) -> None:
        if self._closed:
            raise PlanError(f"the executable of {self.path} is closed")

    def close(self) -> None:
        """Free every allocation, graph and module (best effort: a failed kernel may have broken the
        context, and closing must still release what it can)."""
        if self._closed:
            return
        self._closed = True
        steps = [lambda: self.drv.make_current(), lambda: self.drv.synchronize(), self.graphs.clear,
                 *[(lambda m=m: self.drv.unload_module(m)) for m in self._modules], self.memory.close, self.drv.close]
        for fn in steps:
            try:
                fn()
            except CudaError:
                pass

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _show_progress() -> bool:
    from ...cli.common import show_progress

    return show_progress()
