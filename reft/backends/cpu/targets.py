"""CPU targets: the compiler flags, host requirements and tuning constants of each SIMD width.

Every kernel is written once over the portable SIMD layer of templates/simd.h (GCC/Clang vector
extensions); a target only picks the instruction set the compiler may use and the tuning
constants the kernels are compiled with. The constants are emitted as `#define`s at the top of
the generated source (templates/forward.cpp.j2), recorded in the plan's manifest and shown by
`reftc inspect`; lower.py sizes scratch memory from the same numbers, so Python is their one
source.

| name      | ISA                            | float lanes | where                                  |
|-----------|--------------------------------|-------------|----------------------------------------|
| avx512    | x86-64-v4 (AVX-512 F/BW/VL/DQ) | 16          | Zen 4/5, Intel Xeon since Skylake-SP    |
| avx2      | x86-64-v3 (AVX2, FMA, F16C)    | 8           | Zen 1-3, Intel client chips since Haswell |
| neon      | armv8-a (AdvSIMD)              | 4           | every aarch64 CPU (Apple, Graviton, Ampere) |
| generic   | the architecture's baseline    | 4           | anything else; SSE2 on x86-64           |
"""
from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import ReftError


@dataclass(frozen=True)
class Target:
    name: str
    arch: str                      # "x86_64", "aarch64", or "" for any
    flags: tuple[str, ...]         # compiler flags selecting the instruction set
    needs: tuple[str, ...]         # CPU feature flags the host must report (/proc/cpuinfo)
    lanes: int                     # float32 lanes of a SIMD register (simd.h's VW)
    tuning: dict = field(default_factory=dict)   # name -> value, emitted as #define NAME value

    def describe(self) -> str:
        return f"{self.name} ({self.arch or 'any'}, {self.lanes} x float32)"


# Tuning constants (templates/linear.h, quant.h):
#   GEMV_MAX_T     up to this many tokens, dense matmuls stream the packed weights (GEMV and tiles);
#                  above it they convert row chunks to float32 for the BLAS sgemm
#   GEMV_BLOCK_T   up to this many tokens (1 or 2), a pass takes a whole 8-row block (the plain GEMV)
#   TILE_T, TILE_R tokens x rows of one dense tile (accumulators = TILE_T * TILE_R registers)
#   GEMM_CHUNK     weight rows converted per sgemm call
#   GEMV_PREFETCH  bytes ahead of the packed weight stream that the GEMV prefetches (0: none)
#   QGEMV_MAX_T    up to this many tokens, quantized matmuls decode blocks in the GEMV
_X86_AVX512 = dict(GEMV_MAX_T=64, GEMV_BLOCK_T=2, TILE_T=4, TILE_R=4, GEMM_CHUNK=256, GEMV_PREFETCH=4096, QGEMV_MAX_T=16)
_X86_AVX2 = dict(GEMV_MAX_T=32, GEMV_BLOCK_T=1, TILE_T=3, TILE_R=4, GEMM_CHUNK=256, GEMV_PREFETCH=4096, QGEMV_MAX_T=16)
_NEON = dict(GEMV_MAX_T=32, GEMV_BLOCK_T=1, TILE_T=4, TILE_R=4, GEMM_CHUNK=256, GEMV_PREFETCH=0, QGEMV_MAX_T=16)
_GENERIC = dict(GEMV_MAX_T=16, GEMV_BLOCK_T=1, TILE_T=2, TILE_R=4, GEMM_CHUNK=256, GEMV_PREFETCH=0, QGEMV_MAX_T=16)

TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("avx512", "x86_64", ("-march=x86-64-v4", "-mtune=generic"),
           ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"), 16, _X86_AVX512),
    Target("avx2", "x86_64", ("-march=x86-64-v3", "-mtune=generic"), ("avx2", "fma", "f16c"), 8, _X86_AVX2),
    Target("neon", "aarch64", ("-march=armv8-a",), ("asimd",), 4, _NEON),
    Target("generic", "", (), (), 4, _GENERIC),
)}
# the order host detection tries them in
PREFERENCE = ("avx512", "avx2", "neon")


def machine() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def cpu_flags() -> set[str]:
    """The host CPU's feature flags (x86 'flags', aarch64 'Features' in /proc/cpuinfo)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    if machine() == "aarch64":   # NEON is part of every AArch64 CPU
        return {"asimd"}
    return set()


def get(name: str) -> Target:
    if name not in TARGETS:
        raise ReftError(f"unknown cpu target {name!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]


def runs_here(name: str) -> bool:
    t = get(name)
    return (not t.arch or t.arch == machine()) and set(t.needs) <= cpu_flags()


def host_target() -> str:
    for name in PREFERENCE:
        if runs_here(name):
            return name
    return "generic"


def check_target(name: str) -> None:
    """Refuse to load a plan whose kernels this CPU cannot run."""
    t = get(name)
    if t.arch and t.arch != machine():
        raise ReftError(f"this plan's kernels are for {t.arch} (cpu target {name}) but this machine is {machine()};"
                        f" recompile the plan here (reftc compile ... --target {host_target()})")
    missing = sorted(set(t.needs) - cpu_flags())
    if missing:
        raise ReftError(f"this plan targets cpu {name} but this CPU lacks {', '.join(missing)}; recompile the plan"
                        f" here (reftc compile ... --target {host_target()})")


def compile_flags(name: str) -> list[str]:
    """Instruction-set flags for `name` (a generic build on x86-64 names the baseline explicitly)."""
    t = get(name)
    if name == "generic" and machine() == "x86_64":
        return ["-march=x86-64", "-mtune=generic"]
    return list(t.flags)


def compiler_prefix(name: str) -> str:
    """'' for the host's own compiler, else the GNU cross prefix (aarch64-linux-gnu-) of the target."""
    t = get(name)
    if not t.arch or t.arch == machine():
        return ""
    return f"{t.arch}-linux-gnu-"


def tuning(target: str, deterministic: bool = False, max_batch_tokens: int = 512) -> dict:
    """The target's tuning constants; `deterministic` (reftc compile --deterministic) raises
    GEMV_MAX_T and QGEMV_MAX_T to the plan's max_batch_tokens, so every matmul of any batch runs
    the GEMV / tile kernels, whose sum over K for a row is the same whatever the token count (the
    BLAS sgemm path that larger batches take otherwise sums in another order)."""
    t = dict(get(target).tuning)
    if deterministic:
        t["GEMV_MAX_T"] = max(t["GEMV_MAX_T"], max_batch_tokens)
        t["QGEMV_MAX_T"] = max(t["QGEMV_MAX_T"], max_batch_tokens)
    return t
