"""The cuda tests compile kernels with NVRTC and need no GPU. Without cuda-python and the CUDA
header wheels (pip install 'reft[cuda]') they skip, unless REFT_REQUIRE_NVRTC=1 (CI sets it, so CI
cannot skip them silently)."""
import os


def _toolchain_ok() -> tuple[bool, str]:
    try:
        from reft.backends.cuda import toolchain

        toolchain.nvrtc_version()
        toolchain.include_dirs()
        toolchain.cuobjdump()
        return toolchain.has_cutlass(), "CUTLASS headers (nvidia-cutlass) are missing"
    except Exception as e:   # ImportError, ToolchainError
        return False, str(e)


ok, why = _toolchain_ok()
if os.environ.get("REFT_REQUIRE_NVRTC") == "1" and not ok:
    raise RuntimeError(f"REFT_REQUIRE_NVRTC=1 but the CUDA toolchain is not usable: {why}")
