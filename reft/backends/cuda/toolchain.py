"""NVRTC, ptxas reports, PTX signatures and SASS: everything about CUDA kernels that needs no GPU.

compile_kernels renders each Kernel, compiles it with NVRTC for one real architecture (sm_80,
sm_89, sm_90a: SASS cubins are what plans ship, since the PTX of a newer NVRTC may not load on an
older driver) in parallel worker processes (nvrtc_worker.py), and caches the cubin, PTX and ptxas log by the hash
of source + flags + NVRTC version (REFT_CACHE_DIR/cuda), so compiling an unchanged model again
costs nothing. Headers come from the pip wheels: nvidia-cuda-runtime (cuda_bf16.h, cuda.h),
nvidia-cuda-cccl 13.0 (cuda/std) and nvidia-cutlass (CUTLASS, CuTe).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from ...errors import ReftError
from ... import settings
from . import nvrtc_worker
from .kernel import ARG_KINDS, Kernel, source_hash

INSTALL = "pip install 'reft[cuda]'"
BASE_FLAGS = ["-std=c++17", "-default-device", "-DNDEBUG", "--ptxas-options=-v", "-w"]


class ToolchainError(ReftError):
    pass


class CompileError(ReftError):
    pass


@dataclass(frozen=True)
class Resources:
    """What ptxas reported for one entry function."""
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    smem: int          # static shared memory bytes
    barriers: int

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Compiled:
    name: str
    arch: str
    digest: str        # content hash: the file stem of its .cu and .cubin in a plan
    source: str
    cubin: bytes
    ptx: str
    log: str
    resources: Resources
    seconds: float
    cached: bool


# -- headers and NVRTC ----------------------------------------------------------------------------

def _package_dir(pkg: str) -> Path | None:
    spec = importlib.util.find_spec(pkg)
    if spec is None:
        return None
    locs = list(spec.submodule_search_locations or [])
    return Path(locs[0]) if locs else Path(spec.origin).parent


@lru_cache(maxsize=1)
def include_dirs() -> list[str]:
    """-I directories for NVRTC: the CUDA runtime headers, CCCL 13.0 and CUTLASS/CuTe."""
    dirs = []
    nv = _package_dir("nvidia")
    cu = None
    if nv is not None:
        for cand in (nv / "cu13" / "include", nv / "cuda_runtime" / "include"):
            if (cand / "cuda_bf16.h").exists():
                cu = cand
                break
    if cu is None:
        raise ToolchainError(f"the CUDA runtime headers (cuda_bf16.h) are not installed: {INSTALL}")
    dirs.append(str(cu))
    if (cu / "cccl" / "cuda" / "std").exists():
        dirs.append(str(cu / "cccl"))
    cl = _package_dir("cutlass_library")
    if cl is not None and (cl / "source" / "include" / "cute").exists():
        dirs.append(str(cl / "source" / "include"))
    return dirs


def has_cutlass() -> bool:
    try:
        return any(Path(d, "cute").exists() for d in include_dirs())
    except ToolchainError:
        return False


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        raise ToolchainError(f"NVRTC (cuda-python) is not installed: {INSTALL}") from None
    return nvrtc


@lru_cache(maxsize=1)
def nvrtc_version() -> tuple[int, int]:
    nvrtc = _nvrtc()
    try:
        err, major, minor = nvrtc.nvrtcVersion()
    except Exception as e:   # the library itself is missing (cuda.pathfinder)
        raise ToolchainError(f"libnvrtc could not be loaded ({e}): {INSTALL}") from None
    _check(nvrtc, err, "nvrtcVersion")
    return int(major), int(minor)


def available() -> bool:
    try:
        nvrtc_version()
        include_dirs()
        return True
    except ToolchainError:
        return False


def _check(nvrtc, err, what: str) -> None:
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise CompileError(f"{what} failed: {nvrtc.nvrtcGetErrorString(err)[1].decode()}")


def flags_for(arch: str, defines: tuple[str, ...] = ()) -> list[str]:
    return [f"--gpu-architecture={arch}", *BASE_FLAGS, *[f"-D{d}" for d in defines]]


def nvrtc_compile(source: str, name: str, arch: str, flags: list[str]) -> tuple[bytes, str, str]:
    """(cubin, ptx, log) of one translation unit; a failed compile raises CompileError with NVRTC's log."""
    _nvrtc()
    try:
        return nvrtc_worker.compile_source(source, name, arch, flags, include_dirs())
    except nvrtc_worker.NvrtcError as e:
        raise CompileError(str(e)) from None


# -- ptxas report, PTX signature, SASS ------------------------------------------------------------

_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes smem)?")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(log: str, name: str) -> Resources:
    """The resources ptxas reported for entry function `name` (from `--ptxas-options=-v` output)."""
    lines = log.splitlines()
    start = next((i for i, l in enumerate(lines) if re.search(rf"Compiling entry function '{re.escape(name)}'", l)),
                 None)
    if start is None:
        raise CompileError(f"no ptxas report for entry function {name}")
    frame = used = None
    for l in lines[start + 1:]:
        if "Compiling entry function" in l:
            break
        if frame is None and (m := _FRAME.search(l)):
            frame = m
        if used is None and (m := _USED.search(l)):
            used = m
    if used is None or frame is None:
        raise CompileError(f"incomplete ptxas report for {name}")
    smem = re.search(r"(\d+) bytes smem", used.string)
    return Resources(registers=int(used.group(1)), barriers=int(used.group(2) or 0),
                     smem=int(smem.group(1)) if smem else 0, stack=int(frame.group(1)),
                     spill_stores=int(frame.group(2)), spill_loads=int(frame.group(3)))


_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\((.*?)\)", re.S)
_PARAM = re.compile(r"\.param\s+(?:\.align\s+(\d+)\s+)?(\.\w+)\s+\w+(\[(\d+)\])?")


def ptx_params(ptx: str, name: str) -> list[str]:
    """The .param types of entry `name` in PTX, normalised to the ARG_KINDS spelling
    ('.u64', '.u32', '.f32', '.b8[128]')."""
    for m in _ENTRY.finditer(ptx):
        if m.group(1) != name:
            continue
        out = []
        for p in _PARAM.finditer(m.group(2)):
            t, count = p.group(2), p.group(4)
            t = {".s32": ".u32", ".b32": ".u32", ".s64": ".u64", ".b64": ".u64"}.get(t, t)
            out.append(f"{t}[{count}]" if count else t)
        return out
    raise CompileError(f"PTX has no entry {name}")


def check_signature(kernel: Kernel, ptx: str) -> None:
    """The launcher packs kernel.args; the compiled entry must take exactly those, in order."""
    want = [ARG_KINDS[a.kind][1] for a in kernel.args]
    got = ptx_params(ptx, kernel.name)
    if want != got:
        raise CompileError(f"kernel {kernel.name}: the launcher packs {want} but the compiled entry takes {got}")


def cuobjdump() -> str:
    nv = _package_dir("nvidia")
    for cand in ([nv / "cu13" / "bin" / "cuobjdump"] if nv else []) + [Path(p) for p in filter(None, [
            shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"])]:
        if cand.exists():
            return str(cand)
    raise ToolchainError(f"cuobjdump is not installed: {INSTALL}")


def sass(cubin: bytes) -> str:
    """The SASS disassembly of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        tool = cuobjdump()
        env = dict(os.environ)   # cuobjdump runs nvdisasm, which the same wheel set ships beside it
        env["PATH"] = str(Path(tool).parent) + os.pathsep + env.get("PATH", "")
        r = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise CompileError(f"cuobjdump failed: {r.stderr.strip()}")
    return r.stdout


def sass_opcodes(text: str) -> set[str]:
    """The distinct instruction mnemonics (without modifiers) in a SASS listing."""
    ops = set()
    for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", text):
        ops.add(m.group(1))
    return ops


# -- compile many, in parallel, cached ------------------------------------------------------------

def cache_root() -> Path:
    return settings.cache_dir() / "cuda"


def _ensure(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _cached(d: Path) -> dict | None:
    if all((d / f).exists() for f in ("kernel.cubin", "kernel.ptx", "ptxas.log")):
        return {"cubin": (d / "kernel.cubin").read_bytes(), "ptx": (d / "kernel.ptx").read_text(),
                "log": (d / "ptxas.log").read_text()}
    return None


def _job_dir(root: Path, name: str, source: str, arch: str, flags: list[str]) -> Path:
    d = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    (d / "kernel.cu").write_text(source)
    (d / "job.json").write_text(json.dumps({"name": name, "arch": arch, "flags": flags,
                                            "includes": include_dirs()}))
    return d


def _run_jobs(dirs: list[Path], workers: int, progress) -> None:
    """Run nvrtc_worker.py on each job folder, `workers` processes at a time, in order."""
    pending, running = list(dirs), []
    failed = None
    while (pending and failed is None) or running:
        while pending and failed is None and len(running) < workers:
            d = pending.pop(0)
            running.append((d, subprocess.Popen([sys.executable, nvrtc_worker.__file__, str(d)],
                                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
        d, p = running.pop(0)
        _, err = p.communicate()
        if p.returncode != 0:
            log = (d / "error.log").read_text() if (d / "error.log").exists() else err.decode(errors="replace")
            failed = failed or CompileError(log.strip() or f"the NVRTC worker exited with {p.returncode}")
        elif progress:
            progress(json.loads((d / "job.json").read_text())["name"])
    if failed is not None:
        raise failed


def compile_kernels(kernels: list[Kernel], arch: str, jobs: int | None = None, cache: bool = True,
                    progress=None) -> dict[str, Compiled]:
    """Compile every kernel for `arch`; name -> Compiled. Identical sources compile once. `progress`
    (optional) is called with each finished kernel's name."""
    version = nvrtc_version()
    uniq: dict[str, Kernel] = {}
    for k in kernels:
        if uniq.setdefault(k.name, k) != k:
            raise ValueError(f"two different kernels are named {k.name}")
    flags = flags_for(arch)
    ordered = sorted(uniq.values(), key=lambda k: not k.heavy)   # slow instantiations first
    # rendered without the IR-node comments: one cache entry per instantiation, whichever nodes use it
    sources = {k.name: dataclasses.replace(k, nodes=()).render() for k in ordered}
    digests = {n: source_hash(src, flags, version) for n, src in sources.items()}
    root = _ensure(cache_root() if cache else Path(tempfile.mkdtemp(prefix="reft-nvrtc-")))
    results: dict[str, dict] = {}
    todo = []
    for k in ordered:
        got = _cached(root / digests[k.name]) if cache else None
        if got is not None:
            results[k.name] = {**got, "seconds": 0.0, "cached": True}
            if progress:
                progress(k.name)
        else:
            todo.append(k.name)
    dirs = {n: _job_dir(root, n, sources[n], arch, flags) for n in todo}
    try:
        workers = max(1, min(jobs or os.cpu_count() or 1, len(todo)))
        if workers == 1:
            for n in todo:
                try:
                    nvrtc_worker.run_job(dirs[n])
                except nvrtc_worker.NvrtcError as e:
                    raise CompileError(str(e)) from None
                if progress:
                    progress(n)
        else:
            _run_jobs([dirs[n] for n in todo], workers, progress)
        for n in todo:
            d = dirs[n]
            results[n] = {**_cached(d), "seconds": float((d / "seconds").read_text()), "cached": False}
            if cache:
                for f in ("job.json", "kernel.cu", "seconds"):
                    (d / f).unlink()
                try:
                    os.replace(d, root / digests[n])   # atomic: a concurrent writer of the same digest wins
                except OSError:
                    pass
    finally:
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)
        if not cache:
            shutil.rmtree(root, ignore_errors=True)
    out = {}
    for k in ordered:
        r = results[k.name]
        out[k.name] = Compiled(name=k.name, arch=arch, digest=digests[k.name], source=sources[k.name],
                               cubin=r["cubin"], ptx=r["ptx"], log=r["log"], resources=parse_ptxas(r["log"], k.name),
                               seconds=r["seconds"], cached=r["cached"])
        check_signature(k, r["ptx"])
    return out
