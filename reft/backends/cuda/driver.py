"""A thin, checked layer over the CUDA driver API (cuda-python's `cuda.bindings.driver`).

Every call goes through `Driver.call`, which turns a failing CUresult into a `CudaError` naming the
function and the driver's error (`cuMemAlloc: CUDA_ERROR_OUT_OF_MEMORY (out of memory)`); pointers,
sizes and handles cross this layer as Python ints or cuda-python handle objects, never as ctypes.

Notable:
- cuda-python imports on machines without a driver; the first driver call then raises
  cuda.pathfinder's DynamicLibNotFoundError. `open_device` turns that (and a missing package, a
  driver without devices, a driver too old) into one `NoDeviceError` line that says what the
  caller needed the GPU for.
- The primary context of device 0 (what the CUDA runtime and every framework share), made current
  on each thread that calls in; one non-blocking stream carries all work, so graph capture works.
- Kernel parameters are passed as the address of a `void*[]` the caller packed (runtime.Params):
  cuda-python's own tuple packing would cost a Python conversion per argument per launch.
- `module` can be any object with the attributes used here: the tests pass a fake one.
"""
from __future__ import annotations

import ctypes
import threading

from ...errors import PlanError, ReftError

INSTALL = "pip install 'reft[cuda]'"


class CudaError(ReftError):
    """A driver call failed; `code` is the driver's error name (CUDA_ERROR_...)."""

    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code


class NoDeviceError(PlanError):
    """No cuda-python, no driver, no device, or a device the plan was not compiled for."""


class DeviceMemoryError(ReftError):
    """The device has too little free memory for an allocation (sizes in the message)."""


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _missing_library(e: BaseException) -> bool:
    """cuda-python's way of saying libcuda.so could not be loaded (the class moved between versions)."""
    try:
        from cuda.pathfinder import DynamicLibNotFoundError
        if isinstance(e, DynamicLibNotFoundError):
            return True
    except ImportError:
        pass
    text = str(e)
    return isinstance(e, (RuntimeError, OSError)) and any(
        s in text for s in ("libcuda", "driver library", "dlopen", "NVIDIA display driver"))


def import_driver():
    try:
        from cuda.bindings import driver
    except ImportError:
        return None
    return driver


class Driver:
    """The driver module plus the context and stream reft works in."""

    def __init__(self, module):
        self.cu = module
        self.ok = module.CUresult.CUDA_SUCCESS
        self.ctx = None
        self.device = None
        self.stream = None
        self._local = threading.local()

    # -- errors ----------------------------------------------------------------------------------
    def error_name(self, err) -> tuple[str, str]:
        try:
            e1, name = self.cu.cuGetErrorName(err)
            e2, desc = self.cu.cuGetErrorString(err)
            if e1 == self.ok and e2 == self.ok:
                return name.decode(), desc.decode()
        except Exception:   # the driver itself is gone: fall back to the enum's own name
            pass
        return getattr(err, "name", str(err)), ""

    def check(self, err, what: str) -> None:
        if err != self.ok:
            name, desc = self.error_name(err)
            raise CudaError(f"{what}: {name}" + (f" ({desc})" if desc else ""), name)

    def call(self, fn: str, *args):
        """cuda-python returns (CUresult, *results); the results, or None / the single one."""
        res = getattr(self.cu, fn)(*args)
        self.check(res[0], fn)
        if len(res) == 1:
            return None
        return res[1] if len(res) == 2 else res[1:]

    # -- device and context ----------------------------------------------------------------------
    def init(self) -> None:
        self.call("cuInit", 0)

    def device_count(self) -> int:
        return int(self.call("cuDeviceGetCount"))

    def driver_version(self) -> int:
        """e.g. 13000 for CUDA 13.0."""
        return int(self.call("cuDriverGetVersion"))

    def open(self, ordinal: int = 0) -> None:
        """Retain device `ordinal`'s primary context and create the stream."""
        self.device = self.call("cuDeviceGet", ordinal)
        self.ctx = self.call("cuDevicePrimaryCtxRetain", self.device)
        try:
            self.make_current()
            self.stream = self.call("cuStreamCreate", int(self.cu.CUstream_flags.CU_STREAM_NON_BLOCKING))
        except CudaError:
            self.close()
            raise

    def make_current(self) -> None:
        if getattr(self._local, "ctx", None) is not self.ctx:
            self.call("cuCtxSetCurrent", self.ctx)
            self._local.ctx = self.ctx

    def close(self) -> None:
        """Destroy the stream and release the primary context (other users keep it alive)."""
        if self.ctx is None:
            return
        ctx, self.ctx = self.ctx, None
        stream, self.stream = self.stream, None
        try:
            self.call("cuCtxSetCurrent", ctx)
            if stream is not None:
                self.call("cuStreamSynchronize", stream)
        finally:
            try:
                if stream is not None:
                    self.call("cuStreamDestroy", stream)
            finally:
                self.call("cuDevicePrimaryCtxRelease", self.device)

    def name(self) -> str:
        raw = self.call("cuDeviceGetName", 256, self.device)
        return raw.split(b"\0", 1)[0].decode(errors="replace").strip()

    def attribute(self, attr: str) -> int:
        return int(self.call("cuDeviceGetAttribute", getattr(self.cu.CUdevice_attribute, attr), self.device))

    def compute_capability(self) -> tuple[int, int]:
        return (self.attribute("CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR"),
                self.attribute("CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR"))

    def mem_info(self) -> tuple[int, int]:
        free, total = self.call("cuMemGetInfo")
        return int(free), int(total)

    # -- memory ----------------------------------------------------------------------------------
    def alloc(self, nbytes: int) -> int:
        return int(self.call("cuMemAlloc", max(1, int(nbytes))))

    def free(self, ptr: int) -> None:
        self.call("cuMemFree", ptr)

    def memset(self, ptr: int, value: int, nbytes: int) -> None:
        if nbytes:
            self.call("cuMemsetD8Async", ptr, value, nbytes, self.stream)

    def htod(self, dst: int, src_addr: int, nbytes: int) -> None:
        """Host address -> device, queued on the stream (pageable sources are staged before it returns)."""
        if nbytes:
            self.call("cuMemcpyHtoDAsync", dst, src_addr, nbytes, self.stream)

    def dtoh(self, dst_addr: int, src: int, nbytes: int) -> None:
        if nbytes:
            self.call("cuMemcpyDtoHAsync", dst_addr, src, nbytes, self.stream)

    def dtod(self, dst: int, src: int, nbytes: int) -> None:
        if nbytes:
            self.call("cuMemcpyDtoDAsync", dst, src, nbytes, self.stream)

    def synchronize(self) -> None:
        self.call("cuStreamSynchronize", self.stream)

    # -- modules and launches --------------------------------------------------------------------
    def load_module(self, image: bytes):
        return self.call("cuModuleLoadData", image)

    def unload_module(self, module) -> None:
        self.call("cuModuleUnload", module)

    def function(self, module, name: str):
        return self.call("cuModuleGetFunction", module, name.encode())

    def set_dynamic_smem(self, func, nbytes: int) -> None:
        """Opt a kernel into more than 48 KiB of dynamic shared memory."""
        attr = self.cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        self.call("cuFuncSetAttribute", func, attr, int(nbytes))

    def launch(self, func, grid, block, smem: int, params_addr: int, name: str = "kernel") -> None:
        """params_addr: the address of a void*[] holding one pointer per kernel parameter."""
        err = self.cu.cuLaunchKernel(func, grid[0], grid[1], grid[2], block[0], block[1], block[2], smem,
                                     self.stream, params_addr, 0)[0]
        if err != self.ok:
            self.check(err, f"launching {name} (grid {tuple(grid)}, block {tuple(block)}, {smem} B smem)")

    def encode_tiled(self, req) -> bytes:
        """The 128-byte CUtensorMap of a runtime.TmaRequest (cuTensorMapEncodeTiled)."""
        cu = self.cu
        swz = {0: "NONE", 32: "32B", 64: "64B", 128: "128B"}[req.swizzle]
        tmap = self.call(
            "cuTensorMapEncodeTiled", getattr(cu.CUtensorMapDataType, f"CU_TENSOR_MAP_DATA_TYPE_{req.dtype}"),
            len(req.dims), req.address, [cu.cuuint64_t(d) for d in req.dims],
            [cu.cuuint64_t(s) for s in req.strides], [cu.cuuint32_t(b) for b in req.box],
            [cu.cuuint32_t(1) for _ in req.box], cu.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
            getattr(cu.CUtensorMapSwizzle, f"CU_TENSOR_MAP_SWIZZLE_{swz}"),
            cu.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            cu.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
        return ctypes.string_at(tmap.getPtr(), 128)

    # -- graphs ----------------------------------------------------------------------------------
    def begin_capture(self) -> None:
        self.call("cuStreamBeginCapture", self.stream, self.cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)

    def end_capture(self):
        return self.call("cuStreamEndCapture", self.stream)

    def abort_capture(self) -> None:
        """End a capture that failed part-way, leaving the stream usable; errors are the caller's."""
        res = self.cu.cuStreamEndCapture(self.stream)
        if res[0] == self.ok and res[1] is not None:
            self.cu.cuGraphDestroy(res[1])

    def instantiate(self, graph):
        """An executable graph; the captured graph itself is destroyed."""
        try:
            return self.call("cuGraphInstantiate", graph, 0)
        finally:
            self.call("cuGraphDestroy", graph)

    def graph_launch(self, exe) -> None:
        self.call("cuGraphLaunch", exe, self.stream)

    def graph_destroy(self, exe) -> None:
        self.call("cuGraphExecDestroy", exe)

    # -- timing (tools/gpu_check.py) -------------------------------------------------------------
    def event(self):
        return self.call("cuEventCreate", 0)

    def record(self, ev) -> None:
        self.call("cuEventRecord", ev, self.stream)

    def elapsed_ms(self, start, end) -> float:
        self.call("cuEventSynchronize", end)
        return float(self.call("cuEventElapsedTime", start, end))


def open_device(needs: str, module=None, ordinal: int = 0) -> Driver:
    """Initialise the driver and open device `ordinal`; every way of failing is one NoDeviceError line
    ending in `needs` (e.g. "plan P was compiled for sm_90a and needs an NVIDIA GPU")."""
    cu = module if module is not None else import_driver()
    if cu is None:
        raise NoDeviceError(f"cuda-python is not installed ({INSTALL}): {needs}")
    drv = Driver(cu)
    try:
        err = cu.cuInit(0)[0]
    except Exception as e:
        if _missing_library(e):
            raise NoDeviceError(f"no NVIDIA driver found (libcuda.so.1 could not be loaded): {needs}") from None
        raise
    if err != drv.ok:
        name, desc = drv.error_name(err)
        what = {"CUDA_ERROR_NO_DEVICE": "no NVIDIA GPU found",
                "CUDA_ERROR_INSUFFICIENT_DRIVER": "the NVIDIA driver is older than cuda-python needs",
                "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE": "the NVIDIA driver does not support this GPU"}.get(
            name, "the NVIDIA driver could not be initialised")
        raise NoDeviceError(f"{what} (cuInit: {name}" + (f", {desc}" if desc else "") + f"): {needs}")
    count = drv.device_count()
    if ordinal >= count:
        raise NoDeviceError(f"no NVIDIA GPU found (the driver sees {count}): {needs}")
    drv.open(ordinal)
    return drv
