"""Per-architecture limits the launcher sizes kernels against, and the checks it applies.

Numbers from NVIDIA's CUDA C++ Programming Guide (compute capability tables): the shared memory a
block may opt into, registers, threads and blocks per SM.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import ReftError


@dataclass(frozen=True)
class Arch:
    name: str                  # NVRTC --gpu-architecture value
    cc: tuple[int, int]        # compute capability
    smem_per_block: int        # dynamic + static bytes a block may use (opt-in maximum)
    smem_per_sm: int
    regs_per_sm: int = 65536
    regs_per_thread: int = 255
    threads_per_block: int = 1024
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32
    static_smem: int = 48 * 1024    # without the opt-in attribute
    wgmma: bool = False             # warpgroup MMA + TMA (sm_90a)
    sms: int = 132                  # SMs of the part the arch is sized for (split-K / decode split targets)
    label: str = ""


ARCHS = {
    "sm_80": Arch("sm_80", (8, 0), smem_per_block=163 * 1024, smem_per_sm=164 * 1024, sms=108, label="A100"),
    "sm_89": Arch("sm_89", (8, 9), smem_per_block=99 * 1024, smem_per_sm=100 * 1024, threads_per_sm=1536,
                  blocks_per_sm=24, sms=142, label="L4/L40/RTX 40"),
    "sm_90a": Arch("sm_90a", (9, 0), smem_per_block=227 * 1024, smem_per_sm=228 * 1024, wgmma=True,
                   sms=132, label="H100/H200"),
}
DEFAULT = "sm_90a"
MAX_GRID = (2**31 - 1, 65535, 65535)
MAX_BLOCK = (1024, 1024, 64)


def get(name: str) -> Arch:
    try:
        return ARCHS[name]
    except KeyError:
        raise ReftError(f"unknown CUDA architecture {name!r}; choose one of {', '.join(ARCHS)}") from None


def from_cc(major: int, minor: int) -> str | None:
    """The plan arch that runs on a device of this compute capability (SASS is forward compatible only
    within a major version; sm_90a only on 9.0)."""
    if (major, minor) == (9, 0):
        return "sm_90a"
    if major == 8:
        return "sm_89" if minor >= 9 else "sm_80"
    return None


def check_launch(arch: Arch, name: str, block: tuple[int, int, int], grid: tuple[int, int, int],
                 dynamic_smem: int, registers: int = 0, static_smem: int = 0) -> None:
    """A launch the device would refuse is an error here, before any driver call."""
    threads = block[0] * block[1] * block[2]
    if threads < 1 or threads > arch.threads_per_block or any(b > m for b, m in zip(block, MAX_BLOCK)):
        raise ReftError(f"kernel {name}: block {block} exceeds {arch.name}'s limits")
    if any(g < 1 or g > m for g, m in zip(grid, MAX_GRID)):
        raise ReftError(f"kernel {name}: grid {grid} exceeds {arch.name}'s limits")
    if dynamic_smem + static_smem > arch.smem_per_block:
        raise ReftError(f"kernel {name}: {dynamic_smem + static_smem} bytes of shared memory exceed "
                        f"{arch.name}'s {arch.smem_per_block} per block")
    if static_smem > arch.static_smem:
        raise ReftError(f"kernel {name}: {static_smem} bytes of static shared memory exceed 48 KiB")
    if registers > arch.regs_per_thread or registers * _round_warps(threads) > arch.regs_per_sm:
        raise ReftError(f"kernel {name}: {registers} registers x {threads} threads do not fit one {arch.name} SM")


def _round_warps(threads: int) -> int:
    return -(-threads // 32) * 32


def blocks_per_sm(arch: Arch, threads: int, registers: int, smem: int) -> int:
    """Occupancy: resident blocks per SM (0: the block cannot run at all)."""
    by_threads = arch.threads_per_sm // _round_warps(threads)
    # registers are allocated per warp in units of 256
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = arch.regs_per_sm // (per_warp * (_round_warps(threads) // 32))
    by_smem = arch.smem_per_sm // smem if smem else arch.blocks_per_sm
    return max(0, min(by_threads, by_regs, by_smem, arch.blocks_per_sm))
