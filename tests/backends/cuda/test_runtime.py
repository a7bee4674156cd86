"""The cuda runtime (driver.py, runtime.py).

Without a GPU: the no-driver error line, parameter packing (byte-exact), bindings, step selection,
the graph cache, tensor-map requests and the arguments cuTensorMapEncodeTiled receives, and a whole
CudaExecutable over FakeDriver, whose "device memory" is host memory and whose kernels are numpy
models of the test kernels (so staging, outputs, in-place buffers, workspace, graph capture and
replay are checked on real bytes). With a GPU (marker gpu): the same plan with the test kernels
compiled by NVRTC, a TMA kernel on sm_90a, and the driver wrapper's copies.
"""
from __future__ import annotations

import ctypes
import json
import struct
import types
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cuda.bindings")

from reft.backends.cuda import driver as drvmod  # noqa: E402
from reft.backends.cuda import elementwise as E  # noqa: E402
from reft.backends.cuda import runtime as rt  # noqa: E402
from reft.backends.cuda.driver import CudaError, DeviceMemoryError, NoDeviceError  # noqa: E402
from reft.backends.cuda.kernel import ARG_KINDS, evaluate  # noqa: E402
from reft.errors import PlanError, ReftError, RequestError  # noqa: E402
from reft.frontends.safetensors import write_safetensors  # noqa: E402

H, V, MAX_T = 8, 16, 64
SAMPLERS = (E.argmax_kernel("sm_90a", vocab=H), E.sample_kernel("sm_90a", vocab=H))
A0, A1, A2, A3 = 0, 2048, 4096, 6144
BIG = 1 << 30


# -- the test plan ----------------------------------------------------------------------------------
def kernel_records(tma: bool, swizzle: int = 32) -> dict:
    scale = [["x", "ptr"], ["c", "ptr"], ["kv", "ptr"], ["out", "ptr"], ["n", "i32"], ["H", "i32"], ["s", "f32"],
             ["P", "i64"]]
    res = {"registers": 32, "spill_stores": 0, "spill_loads": 0, "stack": 0, "smem": 0, "barriers": 1}
    k = {
        "t_embed": dict(args=[["ids", "ptr"], ["table", "ptr"], ["out", "ptr"], ["T", "i32"], ["H", "i32"]],
                        block=[32, 1, 1], grid=["T", "1", "1"], smem=0),
        "t_scale_small": dict(args=scale, block=[64, 1, 1], grid=["cdiv(n, 64)", "1", "1"], smem=0),
        "t_scale_large": dict(args=scale, block=[128, 1, 1], grid=["cdiv(n, 128)", "1", "1"], smem=64 * 1024),
        "t_ws": dict(args=[["x", "ptr"], ["workspace", "ptr"], ["out", "ptr"], ["n", "i32"]], block=[256, 1, 1],
                     grid=["1", "1", "1"], smem=0, workspace="n*4"),
    }
    for s in SAMPLERS:   # the real sampling kernels over rows of 8 (compiled for the GPU test)
        k[s.name] = dict(args=[[a.name, a.kind] for a in s.args], block=list(s.block), grid=list(s.grid), smem=s.smem)
    if tma:
        k["t_tma"] = dict(args=[["tm", "tmap"], ["src", "ptr"], ["out", "ptr"], ["rows", "i32"]], block=[32, 1, 1],
                          grid=["cdiv(rows, 4)", "1", "1"], smem=0,
                          tmaps=[["tm", {"tensor": "src", "dtype": "float32", "dims": ["8", "rows"],
                                         "strides": ["32"], "box": [8, 4], "swizzle": swizzle}]])
    for name, r in k.items():
        r.setdefault("workspace", "0")
        r.setdefault("tmaps", [])
        r.update(cubin=f"kernels/{name}.cubin", source=f"kernels/{name}.cu", tile="test", resources=res, nodes=[])
    return k


def write_plan(root: Path, cubins: dict[str, bytes], *, arch="sm_90a", tma=True, swizzle=32, weights=None):
    """A plan directory the runtime can load: y = ((table[ids] * 0.5 + bias) * 2 + 1) (* 3 with TMA),
    and kv[t % NP, :] += 1 for every token t (in place)."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((V, H)).astype(np.float32) if weights is None else weights
    bias = rng.standard_normal(H).astype(np.float32)
    (root / "kernels").mkdir(parents=True, exist_ok=True)
    (root / "weights").mkdir(exist_ok=True)
    kernels = kernel_records(tma, swizzle)
    for name in kernels:
        (root / "kernels" / f"{name}.cubin").write_bytes(cubins.get(name, b"fake cubin " + name.encode()))
    write_safetensors(root / "weights" / "model.safetensors",
                      [("table", "float32", (V, H), lambda: table), ("odd", "float16", (3,),
                                                                       lambda: np.arange(3, dtype=np.float16))])
    scale = {"x": {"arena": A0}, "c": {"const": "bias"}, "kv": {"input": "kv", "offset": 0}, "out": {"arena": A1},
             "n": {"int": "T*8"}, "H": {"int": "8"}, "s": {"f32": 0.5}, "P": {"int": "NP"}}
    steps = [
        {"kernel": "t_embed", "rows": None, "args": {"ids": {"input": "ids", "offset": 0},
                                                     "table": {"param": "table", "offset": 0},
                                                     "out": {"arena": A0}, "T": {"int": "T"}, "H": {"int": "8"}}},
        {"kernel": "t_scale_small", "rows": ["T", 1, 4], "args": scale},
        {"kernel": "t_scale_large", "rows": ["T", 5, BIG], "args": scale},
        {"kernel": "t_ws", "rows": None, "args": {"x": {"arena": A1}, "workspace": {"workspace": True},
                                                  "out": {"arena": A2}, "n": {"int": "T*8"}}},
    ]
    if tma:
        steps.append({"kernel": "t_tma", "rows": None,
                      "args": {"src": {"arena": A2}, "out": {"arena": A3}, "rows": {"int": "T"}}})
    entry = {"inputs": ["ids", "kv"], "params": ["table"], "symbols": ["T", "NP"], "arena_bytes": 8192,
             "constants": {"bias": {"dtype": "float32", "data": bias.tolist()}}, "steps": steps,
             "outputs": {"y": {"bind": {"arena": A3 if tma else A2}, "dtype": "float32", "shape": ["T", 8]},
                         "kv": {"bind": {"input": "kv", "offset": 0}, "dtype": "float32", "shape": ["NP", 8]}}}
    manifest = {"format": "reft-plan", "format_version": 1, "max_batch_tokens": MAX_T,
                "backend": {"name": "cuda", "target": arch, "arch": arch, "dtype": "bfloat16", "nvrtc": "13.5",
                            "kernels": kernels, "entries": {"forward": entry},
                            "sampling": {"entry": "forward", "output": "y", "rows": "T", "vocab": 8,
                                         "argmax": SAMPLERS[0].name, "sample": SAMPLERS[1].name}},
                "entry_points": {"forward": {"graph": "graphs/forward.ir",
                                             "inputs": {"ids": {"dtype": "int32", "shape": ["T"]},
                                                        "kv": {"dtype": "float32", "shape": ["NP", 8]}},
                                             "outputs": {}}},
                "weights": {"files": ["weights/model.safetensors"], "bytes": table.nbytes + 6, "tensors": 2}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    expect = lambda ids: ((table[ids] * np.float32(0.5) + bias) * 2 + 1) * (3 if tma else 1)  # noqa: E731
    return types.SimpleNamespace(path=root, manifest=manifest), expect, table


# -- a driver whose device is host memory ----------------------------------------------------------
def view(ptr: int, count: int, dtype) -> np.ndarray:
    dt = np.dtype(dtype)
    return np.frombuffer((ctypes.c_char * (count * dt.itemsize)).from_address(ptr), dt, count)


def k_embed(a, fake):
    T, Hh = a["T"], a["H"]
    ids = view(fake.at(a["ids"], T * 4), T, np.int32)
    table = view(fake.at(a["table"], V * Hh * 4), V * Hh, np.float32).reshape(V, Hh)
    view(fake.at(a["out"], T * Hh * 4), T * Hh, np.float32)[:] = table[ids].reshape(-1)


def k_scale(a, fake):
    n, Hh, P = a["n"], a["H"], a["P"]
    i = np.arange(n)
    x, c = view(fake.at(a["x"], 4 * n), n, np.float32), view(fake.at(a["c"], 4 * Hh), Hh, np.float32)
    view(fake.at(a["out"], 4 * n), n, np.float32)[:] = x * np.float32(a["s"]) + c[i % Hh]
    np.add.at(view(fake.at(a["kv"], 4 * P * Hh), P * Hh, np.float32), (i // Hh % P) * Hh + i % Hh, 1.0)


def k_ws(a, fake):
    n = a["n"]
    ws = view(fake.at(a["workspace"], 4 * n), n, np.float32)
    ws[:] = view(fake.at(a["x"], 4 * n), n, np.float32) * 2
    view(fake.at(a["out"], 4 * n), n, np.float32)[:] = ws + 1


def k_tma(a, fake):
    assert isinstance(a["tm"], bytes) and len(a["tm"]) == 128
    n = a["rows"] * 8
    view(fake.at(a["out"], 4 * n), n, np.float32)[:] = view(fake.at(a["src"], 4 * n), n, np.float32) * 3


def k_argmax(a, fake):
    R = a["R"]
    x = view(fake.at(a["logits"], R * 32), R * 8, np.float32).reshape(R, 8)
    view(fake.at(a["ids"], R * 4), R, np.int32)[:] = x.argmax(axis=1)


def k_sample(a, fake):
    """The host sampler's rule on each row, with the row's parameters read where the launcher put them
    (so a wrong offset or order of the staged parameters changes the tokens)."""
    from reft.runtime.sampler import Sampler, SamplingParams

    R = a["R"]
    x = view(fake.at(a["logits"], R * 32), R * 8, np.float32).reshape(R, 8)
    col = {n: view(fake.at(a[n], R * 4), R, np.int32 if n == "top_k" else np.float32)
           for n in ("temperature", "top_k", "top_p", "u")}
    out = view(fake.at(a["ids"], R * 4), R, np.int32)
    for r in range(R):
        s = Sampler(SamplingParams(temperature=float(col["temperature"][r]), top_k=int(col["top_k"][r]),
                                   top_p=float(col["top_p"][r]), min_p=0.0))
        s.rng = types.SimpleNamespace(random=lambda r=r: float(col["u"][r]))
        out[r] = s(x[r])


MODELS = {"t_embed": k_embed, "t_scale_small": k_scale, "t_scale_large": k_scale, "t_ws": k_ws, "t_tma": k_tma,
          SAMPLERS[0].name: k_argmax, SAMPLERS[1].name: k_sample}


class FakeDriver:
    """The Driver interface over host memory; launches run MODELS on the decoded parameters."""

    def __init__(self, kinds: dict, cc=(9, 0), limit=1 << 30):
        self.kinds, self.cc, self.limit = kinds, cc, limit
        self.blocks: dict[int, tuple[object, int]] = {}
        self.log: list = []
        self.capture = None
        self.closed = False

    def at(self, ptr: int, nbytes: int) -> int:
        """ptr, after checking that [ptr, ptr + nbytes) lies inside one live allocation."""
        for base, (_, size) in self.blocks.items():
            if base <= ptr and ptr + nbytes <= base + size:
                return ptr
        raise AssertionError(f"access of {nbytes} bytes at {ptr:#x} outside every allocation")

    def name(self):
        return "Fake GPU"

    def compute_capability(self):
        return self.cc

    def mem_info(self):
        return self.limit - sum(s for _, s in self.blocks.values()), self.limit

    def make_current(self):
        pass

    def alloc(self, n):
        if sum(s for _, s in self.blocks.values()) + n > self.limit:
            raise CudaError("cuMemAlloc: CUDA_ERROR_OUT_OF_MEMORY (out of memory)", "CUDA_ERROR_OUT_OF_MEMORY")
        buf = ctypes.create_string_buffer(max(1, n) + 256)
        ptr = -(-ctypes.addressof(buf) // 256) * 256
        ctypes.memset(ptr, 0xAB, max(1, n))   # device memory starts as garbage
        self.blocks[ptr] = (buf, max(1, n))
        return ptr

    def free(self, ptr):
        del self.blocks[ptr]

    def memset(self, ptr, value, n):
        ctypes.memset(self.at(ptr, n), value, n)

    def htod(self, dst, src, n):
        self.log.append(("htod", dst, n))
        ctypes.memmove(self.at(dst, n), src, n)

    def dtoh(self, dst, src, n):
        ctypes.memmove(dst, self.at(src, n), n)

    def synchronize(self):
        self.log.append(("sync",))

    def load_module(self, image):
        self.log.append(("module", image))
        return ("module", image)

    def unload_module(self, module):
        self.log.append(("unload", module))

    def function(self, module, name):
        return ("func", name)

    def set_dynamic_smem(self, func, n):
        self.log.append(("smem", func[1], n))

    def decode(self, name: str, address: int) -> dict:
        args = self.kinds[name]
        ptrs = (ctypes.c_void_p * len(args)).from_address(address)
        out = {}
        for (arg, kind), p in zip(args, ptrs):
            fmt, size, _ = rt.LAYOUT[kind]
            raw = ctypes.string_at(p, size)
            out[arg] = raw if fmt is None else struct.unpack(fmt, raw)[0]
        return out

    def launch(self, func, grid, block, smem, address, name="kernel"):
        call = (func[1], tuple(grid), tuple(block), smem, self.decode(func[1], address))
        if self.capture is not None:
            self.capture.append(call)
            return
        self.log.append(("launch", call[0], call[1]))
        MODELS[call[0]](call[4], self)

    def encode_tiled(self, req):
        self.log.append(("encode", req))
        return bytes(range(128))

    def begin_capture(self):
        self.log.append(("capture",))
        self.capture = []

    def end_capture(self):
        graph, self.capture = self.capture, None
        return graph

    def abort_capture(self):
        self.capture = None

    def instantiate(self, graph):
        return ("graph", tuple(graph))

    def graph_launch(self, exe):
        self.log.append(("graph", len(exe[1])))
        for name, grid, block, smem, values in exe[1]:
            MODELS[name](values, self)

    def graph_destroy(self, exe):
        self.log.append(("destroy",))

    def close(self):
        self.closed = True


def fake_exe(tmp_path, monkeypatch=None, graphs=None, **kw):
    plan, expect, table = write_plan(tmp_path / "plan", {}, **kw)
    if monkeypatch is not None and graphs is not None:
        monkeypatch.setenv("REFT_CUDA_GRAPHS", str(graphs))
    kinds = {n: [tuple(a) for a in r["args"]] for n, r in plan.manifest["backend"]["kernels"].items()}
    fake = FakeDriver(kinds, cc=(9, 0) if plan.manifest["backend"]["arch"] == "sm_90a" else (8, 0))
    return rt.CudaExecutable(fake, plan), fake, expect, table


def ops(fake, kind):
    return [e for e in fake.log if e[0] == kind]


# -- errors without a driver -----------------------------------------------------------------------
def has_driver() -> bool:
    try:
        drvmod.open_device("probe").close()
        return True
    except ReftError:
        return False


no_driver = pytest.mark.skipif(has_driver(), reason="this machine has an NVIDIA driver")


@no_driver
def test_no_driver_is_one_line(tmp_path):
    plan = types.SimpleNamespace(path=tmp_path / "p", manifest={"backend": {"name": "cuda", "arch": "sm_90a"}})
    with pytest.raises(NoDeviceError) as e:
        rt.CudaExecutable.from_plan(plan)
    assert str(e.value) == (f"no NVIDIA driver found (libcuda.so.1 could not be loaded): plan {tmp_path / 'p'} "
                            "was compiled for sm_90a and needs an NVIDIA GPU")
    assert isinstance(e.value, PlanError) and e.value.__suppress_context__


@no_driver
def test_reft_bench_without_a_driver_prints_one_line(tmp_path):
    import subprocess
    import sys

    plan, _, _ = write_plan(tmp_path / "plan", {})
    r = subprocess.run([sys.executable, "-m", "reft.cli.reft", "bench", str(plan.path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (f"error: no NVIDIA driver found (libcuda.so.1 could not be loaded): plan {plan.path} was "
                        "compiled for sm_90a and needs an NVIDIA GPU\n")


def test_no_cuda_python_is_one_line(monkeypatch):
    monkeypatch.setattr(drvmod, "import_driver", lambda: None)
    with pytest.raises(NoDeviceError, match=r"^cuda-python is not installed \(pip install 'reft\[cuda\]'\): needs X$"):
        drvmod.open_device("needs X")


class MockCu:
    """The real cuda.bindings.driver's types and enums, with chosen functions replaced."""

    def __init__(self, **fns):
        from cuda.bindings import driver

        self._real, self._fns, self.calls = driver, fns, []

    def __getattr__(self, name):
        if name in self._fns:
            def call(*a):
                self.calls.append((name, a))
                return self._fns[name](*a)
            return call
        return getattr(self._real, name)


def test_cuinit_errors_name_the_driver_error():
    from cuda.bindings import driver as cu

    mock = MockCu(cuInit=lambda flags: (cu.CUresult.CUDA_ERROR_NO_DEVICE,),
                  cuGetErrorName=lambda e: (cu.CUresult.CUDA_SUCCESS, b"CUDA_ERROR_NO_DEVICE"),
                  cuGetErrorString=lambda e: (cu.CUresult.CUDA_SUCCESS, b"no CUDA-capable device is detected"))
    with pytest.raises(NoDeviceError) as e:
        drvmod.open_device("plan P needs a GPU", module=mock)
    assert str(e.value) == ("no NVIDIA GPU found (cuInit: CUDA_ERROR_NO_DEVICE, no CUDA-capable device is "
                            "detected): plan P needs a GPU")


def test_failed_call_raises_cuda_error_with_the_name():
    from cuda.bindings import driver as cu

    mock = MockCu(cuMemAlloc=lambda n: (cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY, None),
                  cuGetErrorName=lambda e: (cu.CUresult.CUDA_SUCCESS, b"CUDA_ERROR_OUT_OF_MEMORY"),
                  cuGetErrorString=lambda e: (cu.CUresult.CUDA_SUCCESS, b"out of memory"))
    with pytest.raises(CudaError) as e:
        drvmod.Driver(mock).alloc(1 << 40)
    assert str(e.value) == "cuMemAlloc: CUDA_ERROR_OUT_OF_MEMORY (out of memory)"
    assert e.value.code == "CUDA_ERROR_OUT_OF_MEMORY" and isinstance(e.value, ReftError)


@no_driver
def test_every_driver_call_passes_cuda_pythons_argument_conversion():
    """cuda-python converts arguments before it loads libcuda: without a driver, a call whose
    arguments it accepts fails with the missing-library error, one it rejects with TypeError."""
    from cuda.bindings import driver as cu
    from cuda.pathfinder import DynamicLibNotFoundError

    d = drvmod.Driver(cu)
    d.device, d.ctx, d.stream = cu.CUdevice(0), cu.CUcontext(0), cu.CUstream(0)
    params = rt.Params(["ptr", "i32"], [4096, 3])
    req = rt.TmaRequest("BFLOAT16", 4096, (64, 32), (128,), (64, 16), 128)
    calls = [lambda: d.init(), d.device_count, d.driver_version, d.name, d.compute_capability, d.mem_info,
             lambda: d.alloc(16), lambda: d.free(4096), lambda: d.memset(4096, 0, 16),
             lambda: d.htod(4096, params.address, 8), lambda: d.dtoh(params.address, 4096, 8),
             lambda: d.dtod(4096, 8192, 8), d.synchronize, lambda: d.load_module(b"\x7fELF"),
             lambda: d.unload_module(cu.CUmodule(0)), lambda: d.function(cu.CUmodule(0), "k"),
             lambda: d.set_dynamic_smem(cu.CUfunction(0), 100 * 1024),
             lambda: d.launch(cu.CUfunction(0), (1, 2, 3), (32, 1, 1), 0, params.address),
             lambda: d.encode_tiled(req), d.begin_capture, d.end_capture, lambda: d.graph_launch(cu.CUgraphExec(0)),
             lambda: d.graph_destroy(cu.CUgraphExec(0)), d.event, lambda: d.record(cu.CUevent(0)),
             lambda: d.elapsed_ms(cu.CUevent(0), cu.CUevent(0)), lambda: d.open(0)]
    for c in calls:
        with pytest.raises(DynamicLibNotFoundError):
            c()


# -- packing, expressions, bindings ----------------------------------------------------------------
def test_layout_matches_the_kernel_arg_kinds():
    assert {k: v[1] for k, v in rt.LAYOUT.items()} == {k: v[2] for k, v in ARG_KINDS.items()}


def test_params_pack_every_kind_byte_exact():
    tmap = bytes((7 * i) % 256 for i in range(128))
    kinds = ["i32", "ptr", "f32", "i64", "tmap", "i32", "ptr"]
    values = [-5, 0xDEADBEEF000, 1.5, -(2**40), tmap, 2**31 - 1, 2**64 - 1]
    p = rt.Params(kinds, values)
    base = ctypes.addressof(p.raw)
    ptrs = (ctypes.c_void_p * len(kinds)).from_address(p.address)
    for kind, v, off, ptr in zip(kinds, values, p.offsets, ptrs):
        assert ptr == base + off
        fmt, size, align = rt.LAYOUT[kind]
        assert ptr % align == 0
        raw = ctypes.string_at(ptr, size)
        assert raw == (v if fmt is None else struct.pack(fmt, v))
    # offsets are in order, non-overlapping, at the natural alignment
    rel = [o - p.offsets[0] for o in p.offsets]
    assert rel == [0, 8, 16, 24, 64, 192, 200]


def test_params_reject_out_of_range_and_bad_tmaps():
    with pytest.raises(PlanError, match="argument n \\(i32\\) = 2147483648 is out of range"):
        rt.Params(["i32"], [2**31], "k", ["n"])
    with pytest.raises(PlanError, match="out of range"):
        rt.Params(["ptr"], [-1])
    with pytest.raises(PlanError, match="128-byte tensor map"):
        rt.Params(["tmap"], [b"short"])


def test_empty_params_still_give_an_array():
    p = rt.Params([], [])
    assert p.address == ctypes.addressof(p.ptrs)


@pytest.mark.parametrize("expr,want", [
    ("T", lambda T, n: T), ("T*64", lambda T, n: T * 64), ("cdiv(n, 128)", lambda T, n: -(-n // 128)),
    ("max(1, min(T, 4))", lambda T, n: max(1, min(T, 4))), ("(T + 7) // 8 % 3", lambda T, n: (T + 7) // 8 % 3),
    ("12", lambda T, n: 12), ("cdiv(T*8, 64) - 1", lambda T, n: -(-T * 8 // 64) - 1), ("n*4 + T", lambda T, n: n * 4 + T)])
def test_grid_expressions_evaluate_like_python(expr, want):
    for T in (1, 7, 64, 513):
        env = {"T": T, "n": T * 8}
        assert evaluate(expr, env) == want(T, T * 8)


def test_unsafe_or_unknown_expressions_are_rejected():
    for bad in ("T ** 2", "__import__('os')", "T if T else 1", "1.5", "T +", "True"):
        with pytest.raises(ValueError, match="unsupported grid expression"):
            evaluate(bad, {"T": 1})


def test_rows_select_steps():
    assert rt.selected(None, {"T": 9})
    assert rt.selected(["T", 1, 8], {"T": 8}) and not rt.selected(["T", 1, 8], {"T": 9})
    assert rt.selected(["R", 9, BIG], {"R": 9}) and not rt.selected(["R", 9, BIG], {"R": 0})
    assert rt.selected(["T", 5, None], {"T": 10**9})


def test_bindings_resolve_to_pointers_and_ints():
    bases = rt.Bases(arena=0x10000, workspace=0x20000, inputs={"ids": 0x30000}, params={"w": 0x40000},
                     consts={"c": 0x50000})
    assert rt.pointer({"arena": 512}, bases) == 0x10200
    assert rt.pointer({"input": "ids", "offset": 16}, bases) == 0x30010
    assert rt.pointer({"param": "w", "offset": 4096}, bases) == 0x41000
    assert rt.pointer({"const": "c"}, bases) == 0x50000
    assert rt.pointer({"workspace": True}, bases) == 0x20000
    kernels = kernel_records(tma=False)
    k = rt.KernelInfo.from_record("t_scale_small", kernels["t_scale_small"], "f")
    args = {"x": {"arena": 0}, "c": {"const": "c"}, "kv": {"input": "ids", "offset": 0},
            "out": {"param": "w", "offset": 8}, "n": {"int": "T*8"}, "H": {"int": "8"}, "s": {"f32": 0.25},
            "P": {"int": "NP"}}
    step = rt.Step(k, {"kernel": "t_scale_small", "rows": ["T", 1, 4], "args": args}, "forward", 1)
    assert step.syms == ("NP", "T") and step.inputs == ("ids",)
    L = step.build({"T": 3, "NP": 5}, bases, encode=None)
    assert L.grid == (1, 1, 1) and L.block == (64, 1, 1)
    got = FakeDriver({"t_scale_small": k.args}).decode("t_scale_small", L.params.address)
    assert got == {"x": 0x10000, "c": 0x50000, "kv": 0x30000, "out": 0x40008, "n": 24, "H": 8, "s": 0.25, "P": 5}
    assert step.launch({"T": 9, "NP": 5}, bases, None) is None    # rows exclude T = 9


def test_step_launches_are_cached_by_what_the_step_reads():
    kernels = kernel_records(tma=False)
    k = rt.KernelInfo.from_record("t_embed", kernels["t_embed"], "f")
    args = {"ids": {"input": "ids", "offset": 0}, "table": {"param": "t", "offset": 0}, "out": {"arena": 0},
            "T": {"int": "T"}, "H": {"int": "8"}}
    step = rt.Step(k, {"kernel": "t_embed", "args": args}, "e", 0)
    bases = rt.Bases(0, 0, {"ids": 256, "kv": 512}, {"t": 1024}, {})
    a = step.launch({"T": 3, "NP": 4}, bases, None)
    assert step.launch({"T": 3, "NP": 99}, bases, None) is a            # NP is not read by this step
    assert step.launch({"T": 4, "NP": 4}, bases, None) is not a
    bases.inputs["ids"] = 4096
    assert step.launch({"T": 3, "NP": 4}, bases, None) is not a


def test_bad_bindings_fail_at_load():
    kernels = kernel_records(tma=True)
    k = rt.KernelInfo.from_record("t_embed", kernels["t_embed"], "f")
    with pytest.raises(PlanError, match="argument T is not bound"):
        rt.Step(k, {"kernel": "t_embed", "args": {"ids": {"arena": 0}, "table": {"arena": 0}, "out": {"arena": 0},
                                                  "H": {"int": "8"}}}, "e", 0)
    with pytest.raises(PlanError, match=r"argument ids \(ptr\) is bound to \{'int': 'T'\}"):
        rt.Step(k, {"kernel": "t_embed", "args": {"ids": {"int": "T"}, "table": {"arena": 0}, "out": {"arena": 0},
                                                  "T": {"int": "T"}, "H": {"int": "8"}}}, "e", 0)
    with pytest.raises(PlanError, match=r"step 0 \(t_embed\): unsupported grid expression 'T \*\* 2'"):
        rt.Step(k, {"kernel": "t_embed", "args": {"ids": {"arena": 0}, "table": {"arena": 0}, "out": {"arena": 0},
                                                  "T": {"int": "T ** 2"}, "H": {"int": "8"}}}, "e", 0)
    bad = dict(kernels["t_tma"], tmaps=[["tm", {"tensor": "rows", "dtype": "float32", "dims": ["8"], "strides": [],
                                                "box": [8], "swizzle": 0}]])
    with pytest.raises(PlanError, match="tensor map tm has no spec over a pointer argument"):
        rt.Step(rt.KernelInfo.from_record("t_tma", bad, "f"), {"kernel": "t_tma", "args": {
            "src": {"arena": 0}, "out": {"arena": 0}, "rows": {"int": "T"}}}, "e", 0)


# -- tensor maps -----------------------------------------------------------------------------------
SPEC = {"tensor": "a", "dtype": "bfloat16", "dims": ["K", "M"], "strides": ["K*2"], "box": [64, 128], "swizzle": 128}


def test_tma_request_evaluates_the_spec():
    r = rt.tma_request("k", "ta", SPEC, 0x7F0000001000, {"K": 2048, "M": 77})
    assert r == rt.TmaRequest("BFLOAT16", 0x7F0000001000, (2048, 77), (4096,), (64, 128), 128)


@pytest.mark.parametrize("change, message", [
    (dict(address=0x1008), "not 16-byte aligned"),
    (dict(K=2049), "multiples of 16 bytes"),
    (dict(M=0), "dims .* out of range"),
    (dict(box=[64, 512]), "box .* must be 1..256"),
    (dict(box=[4, 128]), "inner row a multiple of 16 bytes"),
    (dict(swizzle=64), "swizzle 64 does not fit an inner box row of 128 bytes"),
    (dict(dtype="float64"), "no tensor-map type"),
    (dict(strides=[]), "rank 2 with 0 strides"),
])
def test_tma_request_checks_the_driver_rules(change, message):
    spec = {**SPEC, **{k: v for k, v in change.items() if k in SPEC}}
    ints = {"K": change.get("K", 2048), "M": change.get("M", 77)}
    with pytest.raises(PlanError, match=f"kernel k: tensor map ta: .*{message}"):
        rt.tma_request("k", "ta", spec, change.get("address", 0x1000), ints)


def test_encode_tiled_passes_the_request_to_the_driver():
    from cuda.bindings import driver as cu

    tm = cu.CUtensorMap()
    ctypes.memmove(tm.getPtr(), bytes(range(128)), 128)
    mock = MockCu(cuTensorMapEncodeTiled=lambda *a: (cu.CUresult.CUDA_SUCCESS, tm))
    d = drvmod.Driver(mock)
    req = rt.TmaRequest("BFLOAT16", 0x7F0000001000, (2048, 77), (4096,), (64, 128), 128)
    assert d.encode_tiled(req) == bytes(range(128))
    (name, a), = mock.calls
    dtype, rank, address, dims, strides, box, estrides, inter, swizzle, l2, oob = a
    assert dtype == cu.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 and rank == 2
    assert address == 0x7F0000001000
    assert [int(x) for x in dims] == [2048, 77] and all(isinstance(x, cu.cuuint64_t) for x in dims)
    assert [int(x) for x in strides] == [4096] and all(isinstance(x, cu.cuuint64_t) for x in strides)
    assert [int(x) for x in box] == [64, 128] and all(isinstance(x, cu.cuuint32_t) for x in box)
    assert [int(x) for x in estrides] == [1, 1]
    assert inter == cu.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE
    assert swizzle == cu.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B
    assert l2 == cu.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B
    assert oob == cu.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE


# -- caches and arch -------------------------------------------------------------------------------
def test_graph_cache_captures_on_the_second_sighting_and_evicts_lru():
    dropped = []
    g = rt.GraphCache(2, dropped.append)
    assert not g.wants("a") and g.wants("a")
    g.put("a", "ga")
    assert not g.wants("b") and g.wants("b")
    g.put("b", "gb")
    assert g.get("a") == "ga"          # a is now the most recent
    g.put("c", "gc")
    assert dropped == ["gb"] and "b" not in g and g.get("b") is None
    assert len(g) == 2
    g.clear()
    assert sorted(dropped) == ["ga", "gb", "gc"] and len(g) == 0 and not g.wants("a")


def test_seen_keys_are_bounded():
    g = rt.GraphCache(2, lambda x: None)
    for i in range(100):
        g.wants(i)
    assert len(g.seen) <= 8


def test_runs_on():
    assert rt.runs_on("sm_90a", (9, 0)) and not rt.runs_on("sm_90a", (10, 0))
    assert rt.runs_on("sm_80", (8, 6)) and rt.runs_on("sm_80", (8, 9)) and not rt.runs_on("sm_80", (9, 0))
    assert rt.runs_on("sm_89", (8, 9)) and not rt.runs_on("sm_89", (8, 6))


# -- the executable over FakeDriver ----------------------------------------------------------------
def test_load_uploads_weights_aligned_and_constants(tmp_path):
    from reft.backends.base import Executable

    exe, fake, _, table = fake_exe(tmp_path)
    assert isinstance(exe, Executable)
    assert all(p % 256 == 0 for p in exe.params.values())
    got = exe.read_weights(["table", "odd"])
    np.testing.assert_array_equal(got["table"], table)
    np.testing.assert_array_equal(got["odd"], np.arange(3, dtype=np.float16))
    bias = np.asarray(exe.entries["forward"].constants["bias"]["data"], np.float32)
    np.testing.assert_array_equal(view(exe.entries["forward"].consts["bias"], H, np.float32), bias)
    assert ops(fake, "smem") == [("smem", "t_scale_large", 64 * 1024)]
    assert len(ops(fake, "module")) == 7
    with pytest.raises(PlanError, match="no weight 'nope'"):
        exe.read_weights(["nope"])


def test_free_memory_is_the_devices_after_the_weights(tmp_path):
    """The KV pool's budget (--kv-cache-memory 0.5, runtime/memory.py) is a fraction of what the
    device has free once the weights and arena are allocated, not of host memory."""
    from reft.runtime.memory import KvBudget

    exe, fake, _, _ = fake_exe(tmp_path)
    held = sum(size for _, size in fake.blocks.values())
    assert held > V * H * 4 and exe.free_memory() == fake.limit - held
    pages = exe.zeros((1000, 8), "float32")   # noqa: F841 - held: a dropped buffer is freed
    assert exe.free_memory() == fake.limit - held - 32000
    assert KvBudget("0.5").pages(1 << 20, 16, 4096, exe.free_memory()) == (fake.limit - held - 32000) // 2 >> 20


def host_draws(rows: np.ndarray, temperature, top_k, top_p, u) -> list[int]:
    """What runtime/sampler.py's Sampler draws for each row with the given uniform number."""
    from reft.runtime.sampler import Sampler, SamplingParams

    out = []
    for r, row in enumerate(rows):
        s = Sampler(SamplingParams(temperature=float(temperature[r]), top_k=int(top_k[r]), top_p=float(top_p[r]),
                                   min_p=0.0))
        s.rng = types.SimpleNamespace(random=lambda r=r: float(np.float32(u[r])))
        out.append(s(row))
    return out


def test_run_sampled_draws_on_the_device_and_copies_back_only_the_ids(tmp_path):
    exe, fake, expect, _ = fake_exe(tmp_path)
    assert exe.samples_on_device
    kv = exe.zeros((80, H), "float32")
    ids = np.array([3, 1, 4, 1, 5, 9, 2], np.int32)
    rows = expect(ids)
    R = len(ids)
    fake.log.clear()
    got = exe.run_sampled({"ids": ids, "kv": kv}, np.zeros(R), np.zeros(R), np.ones(R), np.zeros(R))
    np.testing.assert_array_equal(got, rows.argmax(axis=1))
    launched = [e[1] for e in ops(fake, "launch") + ops(fake, "graph")]
    assert SAMPLERS[0].name in launched and SAMPLERS[1].name not in launched   # all greedy: argmax alone
    # parameters per row, a greedy row among them; each is read where the launcher staged it
    t = np.array([0.7, 0, 1.3, 0.5, 2.0, 1.0, 0.9], np.float32)
    k = np.array([0, 0, 3, 2, 0, 5, 1], np.int32)
    p = np.array([1, 1, 0.9, 1, 0.6, 0.8, 1], np.float32)
    for seed in range(5):
        u = np.random.default_rng(seed).random(R).astype(np.float32)
        fake.log.clear()
        got = exe.run_sampled({"ids": ids, "kv": kv}, t, k, p, u)
        assert got.dtype == np.int32 and got.tolist() == host_draws(rows, t, k, p, u)
        assert SAMPLERS[1].name in [e[1] for e in ops(fake, "launch")]
        # nothing of R x vocab size comes back: ids alone
        assert not [e for e in fake.log if e[0] == "dtoh"]
    with pytest.raises(ValueError, match="7 logit rows"):
        exe.run_sampled({"ids": ids, "kv": kv}, t[:3], k[:3], p[:3], u[:3])


def test_a_plan_without_sampling_kernels_cannot_sample(tmp_path):
    plan, _, _ = write_plan(tmp_path / "plan", {})
    del plan.manifest["backend"]["sampling"]
    kinds = {n: [tuple(a) for a in r["args"]] for n, r in plan.manifest["backend"]["kernels"].items()}
    exe = rt.CudaExecutable(FakeDriver(kinds), plan)
    assert not exe.samples_on_device
    with pytest.raises(PlanError, match="no sampling kernels"):
        exe.run_sampled({"ids": np.array([1], np.int32)}, [0], [0], [1], [0])
    plan.manifest["backend"]["sampling"] = {"entry": "forward", "output": "y", "rows": "T", "vocab": 8,
                                            "argmax": "nope", "sample": SAMPLERS[1].name}
    with pytest.raises(PlanError, match="sampling kernels nope"):
        rt.CudaExecutable(FakeDriver(kinds), plan)


def test_decode_steps_run_eagerly_then_capture_then_replay(tmp_path):
    exe, fake, expect, _ = fake_exe(tmp_path)
    kv = exe.zeros((6, H), "float32")
    ids = np.array([3, 1, 4], np.int32)
    for i in range(3):
        fake.log.clear()
        out = exe.run({"ids": ids, "kv": kv})
        np.testing.assert_allclose(out["y"], expect(ids), rtol=1e-6)
        assert out["kv"] is kv
        kinds = [e[0] for e in fake.log if e[0] in ("launch", "capture", "graph")]
        want = [["launch"] * 4, ["capture", "graph"], ["graph"]][i]
        assert kinds == want, i
    kv_host = exe.to_host(kv)
    np.testing.assert_array_equal(kv_host[:3], 3.0)      # three runs, each token once per run
    np.testing.assert_array_equal(kv_host[3:], 0.0)


def test_prompt_steps_launch_one_by_one_with_the_large_kernel(tmp_path, monkeypatch):
    exe, fake, expect, _ = fake_exe(tmp_path, monkeypatch, graphs=4)
    kv = exe.zeros((40, H), "float32")
    ids = np.arange(30, dtype=np.int32) % V
    for _ in range(3):
        out = exe.run({"ids": ids, "kv": kv})
    np.testing.assert_allclose(out["y"], expect(ids), rtol=1e-6)
    assert not ops(fake, "capture") and not ops(fake, "graph")
    assert [e[1] for e in ops(fake, "launch")][:5] == ["t_embed", "t_scale_large", "t_ws", "t_tma", "t_embed"]
    large = next(e for e in ops(fake, "launch") if e[1] == "t_scale_large")
    assert large[2] == (2, 1, 1)        # cdiv(30*8, 128)


def test_graphs_can_be_turned_off(tmp_path, monkeypatch):
    exe, fake, expect, _ = fake_exe(tmp_path, monkeypatch, graphs=0)
    kv = exe.zeros((4, H), "float32")
    for _ in range(3):
        exe.run({"ids": np.array([1], np.int32), "kv": kv})
    assert not ops(fake, "capture") and len(ops(fake, "launch")) == 12


def test_host_feeds_are_staged_once_and_in_place_outputs_update_the_callers_array(tmp_path):
    exe, fake, expect, _ = fake_exe(tmp_path, tma=False)
    kv = np.zeros((4, H), np.float32)
    out = exe.run({"ids": np.array([2, 2], np.int32), "kv": kv})
    assert out["kv"] is kv and (kv[:2] == 1).all() and (kv[2:] == 0).all()
    staged = dict(exe._staging)
    exe.run({"ids": np.arange(20, dtype=np.int32) % V, "kv": kv})
    assert exe._staging["ids"] == staged["ids"]           # sized for max_batch_tokens on first use
    big = np.zeros((400, H), np.float32)
    exe.run({"ids": np.array([5], np.int32), "kv": big})
    assert exe._staging["kv"][1] >= big.nbytes and exe._staging["kv"] != staged["kv"]
    assert (big[0] == 1).all() and big[1:].sum() == 0      # token 0 writes row 0


def test_workspace_grows_and_clears_every_cache(tmp_path):
    exe, fake, expect, _ = fake_exe(tmp_path)
    kv = exe.zeros((64, H), "float32")
    small = np.array([1, 2], np.int32)
    for _ in range(2):
        exe.run({"ids": small, "kv": kv})
    assert len(exe.graphs) == 1 and exe.workspace_bytes == 256
    ws = exe.workspace
    ids = np.arange(60, dtype=np.int32) % V
    out = exe.run({"ids": ids, "kv": kv})
    np.testing.assert_allclose(out["y"], expect(ids), rtol=1e-6)
    assert exe.workspace_bytes >= 60 * 8 * 4 and exe.workspace != ws and ws not in fake.blocks
    assert len(exe.graphs) == 0 and ops(fake, "destroy")
    np.testing.assert_allclose(exe.run({"ids": small, "kv": kv})["y"], expect(small), rtol=1e-6)


def test_tensor_maps_are_encoded_once_per_pointer_and_size(tmp_path):
    exe, fake, _, _ = fake_exe(tmp_path, swizzle=32)
    kv = exe.zeros((8, H), "float32")
    for _ in range(3):
        exe.run({"ids": np.array([1, 2, 3], np.int32), "kv": kv})
    exe.run({"ids": np.array([1, 2], np.int32), "kv": kv})
    reqs = [e[1] for e in ops(fake, "encode")]
    assert reqs == [rt.TmaRequest("FLOAT32", exe.arena + A2, (8, 3), (32,), (8, 4), 32),
                    rt.TmaRequest("FLOAT32", exe.arena + A2, (8, 2), (32,), (8, 4), 32)]


def test_bad_feeds_are_clear_errors(tmp_path):
    exe, fake, _, _ = fake_exe(tmp_path)
    kv = exe.zeros((8, H), "float32")
    with pytest.raises(RequestError, match="a step of 65 tokens exceeds the plan's max_batch_tokens 64"):
        exe.run({"ids": np.zeros(65, np.int32), "kv": kv})
    with pytest.raises(ValueError, match="missing graph input 'kv'"):
        exe.run({"ids": np.zeros(1, np.int32)})
    with pytest.raises(ValueError, match="float16 device buffer where the plan takes float32"):
        exe.run({"ids": np.zeros(1, np.int32), "kv": exe.zeros((8, H), "float16")})
    with pytest.raises(ValueError, match="input kv"):
        exe.run({"ids": np.zeros(1, np.int32), "kv": exe.zeros((8, 4), "float32")})
    with pytest.raises(PlanError, match="no entry point 'embed'"):
        exe.run({}, "embed")


def test_buffers_round_trip_and_are_freed(tmp_path):
    import gc

    exe, fake, _, _ = fake_exe(tmp_path)
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    buf = exe.to_device(a)
    assert buf.shape == (3, 4) and buf.dtype == "float32" and buf.nbytes == 48
    np.testing.assert_array_equal(exe.to_host(buf), a)
    z = exe.zeros((5, 7), "bfloat16")
    assert (exe.to_host(z).astype(np.float32) == 0).all() and z.nbytes == 70
    live = len(exe.memory.live)
    del buf, z
    gc.collect()
    assert len(exe.memory.live) == live - 2
    exe.synchronize()


def test_out_of_device_memory_names_the_sizes(tmp_path):
    exe, fake, _, _ = fake_exe(tmp_path)
    fake.limit = sum(s for _, s in fake.blocks.values()) + (1 << 20)
    with pytest.raises(DeviceMemoryError, match=r"out of device memory for a bfloat16\[4096, 16, 8, 64\] buffer "
                                                r"\(KV-cache pages or other runtime state\): needs 64.00 MiB, "
                                                r"1.00 MiB free of .* on Fake GPU"):
        exe.zeros((4096, 16, 8, 64), "bfloat16")


def test_weights_that_do_not_fit_fail_at_load(tmp_path):
    plan, _, _ = write_plan(tmp_path / "plan", {})
    kinds = {n: [tuple(a) for a in r["args"]] for n, r in plan.manifest["backend"]["kernels"].items()}
    fake = FakeDriver(kinds, limit=256)
    with pytest.raises(DeviceMemoryError, match="out of device memory for the plan's weights: needs 518 B, 256 B free"):
        rt.CudaExecutable(fake, plan)
    assert fake.closed and not fake.blocks


def test_a_plan_for_another_arch_names_both(tmp_path):
    plan, _, _ = write_plan(tmp_path / "plan", {})
    fake = FakeDriver({}, cc=(8, 0))
    with pytest.raises(NoDeviceError) as e:
        rt.CudaExecutable(fake, plan)
    assert str(e.value) == (f"plan {plan.path} was compiled for sm_90a (H100/H200) but GPU 0 is an Fake GPU (compute"
                            " capability 8.0): recompile it with `reftc compile --backend cuda --arch sm_80`")
    assert fake.closed


def test_missing_cubin_and_weight_are_plan_errors(tmp_path):
    plan, _, _ = write_plan(tmp_path / "plan", {})
    (plan.path / "kernels" / "t_ws.cubin").unlink()
    with pytest.raises(PlanError, match="cannot read the cubin of kernel t_ws"):
        rt.CudaExecutable(FakeDriver({}), plan)
    plan, _, _ = write_plan(tmp_path / "plan2", {})
    plan.manifest["backend"]["entries"]["forward"]["params"].append("lm_head.weight")
    with pytest.raises(PlanError, match="weight lm_head.weight is not in the plan's weights"):
        rt.CudaExecutable(FakeDriver({}), plan)


def test_close_frees_everything_once(tmp_path):
    exe, fake, _, _ = fake_exe(tmp_path)
    kv = exe.zeros((4, H), "float32")
    for _ in range(2):
        exe.run({"ids": np.array([1], np.int32), "kv": kv})
    exe.close()
    assert not fake.blocks and fake.closed and ops(fake, "destroy") and len(ops(fake, "unload")) == 7
    exe.close()
    with pytest.raises(PlanError, match="is closed"):
        exe.run({"ids": np.array([1], np.int32), "kv": kv})
    del kv   # its finalizer finds nothing left to free


# -- on a GPU --------------------------------------------------------------------------------------
SOURCES = r"""
extern "C" __global__ void t_embed(void* ids_, void* table_, void* out_, int T, int H) {
    const int* ids = (const int*)ids_;
    const float* table = (const float*)table_;
    float* out = (float*)out_;
    const int t = blockIdx.x;
    if (t >= T) return;
    for (int h = threadIdx.x; h < H; h += blockDim.x) out[(long long)t * H + h] = table[(long long)ids[t] * H + h];
}
// x * s + c[h] for i < n (t = i / H, h = i % H), and kv[t % P][h] += 1
__device__ void scale(const float* x, const float* c, float* kv, float* out, int i, int n, int H, float s,
                      long long P, float zero) {
    if (i >= n) return;
    const int t = i / H, h = i % H;
    out[i] = x[i] * s + c[h] + zero;
    atomicAdd(kv + (t % P) * H + h, 1.0f);
}
extern "C" __global__ void t_scale_small(void* x, void* c, void* kv, void* out, int n, int H, float s,
                                         long long P) {
    scale((const float*)x, (const float*)c, (float*)kv, (float*)out, blockIdx.x * blockDim.x + threadIdx.x, n, H, s,
          P, 0.0f);
}
// the same through the far end of 64 KiB of dynamic shared memory (the > 48 KiB opt-in)
extern "C" __global__ void t_scale_large(void* x, void* c, void* kv, void* out, int n, int H, float s,
                                         long long P) {
    extern __shared__ float scratch[];
    const int slot = 16384 - blockDim.x + threadIdx.x;
    scratch[slot] = 0.0f;
    __syncthreads();
    scale((const float*)x, (const float*)c, (float*)kv, (float*)out, blockIdx.x * blockDim.x + threadIdx.x, n, H, s,
          P, scratch[slot]);
}
extern "C" __global__ void t_ws(void* x_, void* workspace, void* out_, int n) {
    float* ws = (float*)workspace;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        ws[i] = ((const float*)x_)[i] * 2.0f;
        ((float*)out_)[i] = ws[i] + 1.0f;
    }
}
"""

TMA_SOURCE = r"""
struct alignas(64) CUtensorMap { unsigned long long opaque[16]; };   // cuda.h does not compile under NVRTC
// Loads a box of 4 rows x 8 floats with the tensor copy engine, then writes it back times 3.
extern "C" __global__ void t_tma(const __grid_constant__ CUtensorMap tm, void* src, void* out_, int rows) {
    __shared__ alignas(128) float tile[4][8];
    __shared__ alignas(8) unsigned long long bar;
    const int r0 = blockIdx.x * 4;
    const unsigned b = (unsigned)__cvta_generic_to_shared(&bar);
    const unsigned dst = (unsigned)__cvta_generic_to_shared(&tile[0][0]);
    if (threadIdx.x == 0) {
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(b) : "memory");
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(b), "r"(4 * 8 * 4) : "memory");
        asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
                     " [%0], [%1, {%2, %3}], [%4];"
                     :: "r"(dst), "l"(reinterpret_cast<unsigned long long>(&tm)), "r"(0), "r"(r0), "r"(b) : "memory");
    }
    asm volatile("{\n .reg .pred p;\n WAIT:\n mbarrier.try_wait.parity.shared::cta.b64 p, [%0], 0;\n @!p bra WAIT;\n}"
                 :: "r"(b) : "memory");
    const int r = threadIdx.x / 8, c = threadIdx.x % 8;
    if (r0 + r < rows) ((float*)out_)[(r0 + r) * 8 + c] = tile[r][c] * 3.0f;
}
"""


def gpu_arch():
    from reft.backends.cuda.backend import local_arch

    return local_arch()


needs_gpu = pytest.mark.skipif(gpu_arch() is None, reason="needs an NVIDIA GPU")


def compile_cubins(arch: str) -> dict[str, bytes]:
    from reft.backends.cuda import toolchain

    out = {}
    for name in ("t_embed", "t_scale_small", "t_scale_large", "t_ws"):
        out[name] = toolchain.nvrtc_compile(SOURCES, name, arch, toolchain.flags_for(arch))[0]
    if arch == "sm_90a":
        out["t_tma"] = toolchain.nvrtc_compile(TMA_SOURCE, "t_tma", arch, toolchain.flags_for(arch))[0]
    for name, c in toolchain.compile_kernels(list(SAMPLERS), arch).items():
        out[name] = c.cubin
    return out


@pytest.fixture(scope="module")
def gpu_plan(tmp_path_factory):
    arch = gpu_arch()
    return write_plan(tmp_path_factory.mktemp("gpu") / "plan", compile_cubins(arch), arch=arch,
                      tma=arch == "sm_90a", swizzle=0)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("graphs", ["64", "0"])
def test_gpu_runs_the_plan(gpu_plan, monkeypatch, graphs):
    monkeypatch.setenv("REFT_CUDA_GRAPHS", graphs)
    plan, expect, table = gpu_plan
    exe = rt.CudaExecutable.from_plan(plan)
    try:
        kv = exe.zeros((80, H), "float32")
        counts = np.zeros((80, H), np.float32)
        for n in (3, 3, 3, 1, 17, 64, 3):
            ids = np.random.default_rng(n).integers(0, V, n).astype(np.int32)
            out = exe.run({"ids": ids, "kv": kv})
            np.testing.assert_allclose(out["y"], expect(ids), rtol=1e-6, atol=1e-6)
            counts[np.arange(n) % 80] += 1
        np.testing.assert_array_equal(exe.to_host(kv), counts)
        np.testing.assert_array_equal(exe.read_weights(["table"])["table"], table)
        host_kv = np.zeros((8, H), np.float32)
        out = exe.run({"ids": np.array([1, 2], np.int32), "kv": host_kv})
        assert out["kv"] is host_kv and (host_kv[:2] == 1).all() and (host_kv[2:] == 0).all()
        if graphs != "0":
            assert len(exe.graphs) >= 1
    finally:
        exe.close()


@pytest.mark.gpu
@needs_gpu
def test_gpu_samples_like_the_host_sampler(gpu_plan):
    """The plan's real argmax and sample kernels (rows of 8 logits) against runtime/sampler.py, given
    the same uniform numbers."""
    plan, expect, _ = gpu_plan
    exe = rt.CudaExecutable.from_plan(plan)
    try:
        kv = exe.zeros((80, H), "float32")
        ids = np.arange(V, dtype=np.int32)
        rows = expect(ids)
        R = len(ids)
        got = exe.run_sampled({"ids": ids, "kv": kv}, np.zeros(R), np.zeros(R), np.ones(R), np.zeros(R))
        np.testing.assert_array_equal(got, rows.argmax(axis=1))
        rng = np.random.default_rng(0)
        for _ in range(20):
            t = rng.choice([0.0, 0.5, 1.0, 1.7], R).astype(np.float32)
            k = rng.choice([0, 1, 3, 8], R).astype(np.int32)
            p = rng.choice([1.0, 0.9, 0.5], R).astype(np.float32)
            u = rng.random(R).astype(np.float32)
            assert exe.run_sampled({"ids": ids, "kv": kv}, t, k, p, u).tolist() == host_draws(rows, t, k, p, u)
    finally:
        exe.close()


@pytest.mark.gpu
@needs_gpu
def test_gpu_driver_copies_and_errors():
    d = drvmod.open_device("the test needs a GPU")
    try:
        a = np.arange(1 << 20, dtype=np.float32)
        p, q = d.alloc(a.nbytes), d.alloc(a.nbytes)
        d.htod(p, a.ctypes.data, a.nbytes)
        d.dtod(q, p, a.nbytes)
        b = np.empty_like(a)
        d.dtoh(b.ctypes.data, q, b.nbytes)
        d.synchronize()
        np.testing.assert_array_equal(a, b)
        d.memset(q, 0, 64)
        d.dtoh(b.ctypes.data, q, 64)
        d.synchronize()
        assert (b[:16] == 0).all() and b[16] == 16
        free, total = d.mem_info()
        assert 0 < free <= total
        with pytest.raises(CudaError, match="CUDA_ERROR_OUT_OF_MEMORY"):
            d.alloc(total * 2)
        with pytest.raises(CudaError, match="cuModuleLoadData: CUDA_ERROR_"):
            d.load_module(b"\x7fELF not a cubin")
        d.free(p)
        d.free(q)
    finally:
        d.close()
