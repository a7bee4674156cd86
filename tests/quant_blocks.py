"""Random but valid raw blocks of a GGML type: any codes, finite float16 scales."""
from __future__ import annotations

import numpy as np

from reft.quant import get_format

# byte offsets of the float16 scales inside a block (kept finite; everything else is random)
F16_SCALES = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
              "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def finite_f16_bits(rng, n) -> np.ndarray:
    """uint8[n, 2]: any finite float16 (subnormals, zeros of both signs included)."""
    bits = rng.integers(0, 0x7C00, n, dtype=np.uint16) | (rng.integers(0, 2, n, dtype=np.uint16) << 15)
    return bits.view(np.uint8).reshape(n, 2)


def random_blocks(name: str, n: int, rng) -> np.ndarray:
    """uint8[n, block_bytes]."""
    fmt = get_format(name)
    raw = rng.integers(0, 256, (n, fmt.block_bytes), dtype=np.uint8)
    for off in F16_SCALES.get(name, ()):
        raw[:, off:off + 2] = finite_f16_bits(rng, n)
    return raw
