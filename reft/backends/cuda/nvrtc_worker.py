"""Compile one CUDA translation unit with NVRTC: a module, and a script the toolchain runs in
worker processes.

  python nvrtc_worker.py JOB_DIR     JOB_DIR/job.json {name, arch, flags, includes} + JOB_DIR/kernel.cu
                                     -> kernel.cubin, kernel.ptx, ptxas.log (exit 0), or
                                        error.log (exit 3)

It imports nothing of reft (a worker starts in a fraction of a second, and never re-imports the
caller's __main__ as multiprocessing's spawn and forkserver do, which breaks scripts without a main
guard). cuda-python's NVRTC calls hold the GIL, so parallel compiles need processes, not threads.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class NvrtcError(Exception):
    pass


def compile_source(source: str, name: str, arch: str, flags: list[str], includes: list[str]
                   ) -> tuple[bytes, str, str]:
    """(cubin, ptx, ptxas/NVRTC log); a failed compile raises NvrtcError with NVRTC's log."""
    from cuda.bindings import nvrtc

    def check(err, what):
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise NvrtcError(f"{what} failed: {nvrtc.nvrtcGetErrorString(err)[1].decode()}")

    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), f"{name}.cu".encode(), 0, [], [])
    check(err, "nvrtcCreateProgram")
    try:
        opts = [f.encode() for f in flags] + [f"-I{d}".encode() for d in includes]
        (res,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        err, n = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * n
        nvrtc.nvrtcGetProgramLog(prog, log)
        log = log.rstrip(b"\0 ").decode(errors="replace")
        if res != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise NvrtcError(f"NVRTC could not compile kernel {name} for {arch}:\n{log}")
        err, n = nvrtc.nvrtcGetCUBINSize(prog)
        check(err, "nvrtcGetCUBINSize")
        cubin = b" " * n
        check(nvrtc.nvrtcGetCUBIN(prog, cubin)[0], "nvrtcGetCUBIN")
        err, n = nvrtc.nvrtcGetPTXSize(prog)
        check(err, "nvrtcGetPTXSize")
        ptx = b" " * n
        check(nvrtc.nvrtcGetPTX(prog, ptx)[0], "nvrtcGetPTX")
        return cubin, ptx.rstrip(b"\0 ").decode(), log
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def run_job(job_dir: Path) -> float:
    """Compile the job in job_dir, writing its outputs there; returns the seconds NVRTC took."""
    job = json.loads((job_dir / "job.json").read_text())
    t = time.perf_counter()
    cubin, ptx, log = compile_source((job_dir / "kernel.cu").read_text(), job["name"], job["arch"], job["flags"],
                                     job["includes"])
    seconds = time.perf_counter() - t
    (job_dir / "kernel.cubin").write_bytes(cubin)
    (job_dir / "kernel.ptx").write_text(ptx)
    (job_dir / "ptxas.log").write_text(log)
    (job_dir / "seconds").write_text(f"{seconds:.3f}")
    return seconds


if __name__ == "__main__":
    d = Path(sys.argv[1])
    try:
        run_job(d)
    except Exception as e:   # the parent reads error.log and raises it as one CompileError
        (d / "error.log").write_text(f"{e}")
        sys.exit(3)
