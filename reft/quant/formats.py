"""The registry of block formats: what a tensor's raw bytes mean.

A quantized tensor is a run of fixed-size blocks along its last (innermost) dimension; each
block holds `block_values` numbers in `block_bytes` bytes (scales first, then packed codes).
Unquantized types are blocks of one value. The GGML type ids are those llama.cpp writes in
GGUF tensor records, so a reader can go from a file's type id straight to a format.

Kernels (numpy here, C++ later) take the raw uint8 bytes and a format; nothing is unpacked
into structs, so the same bytes can be memory-mapped from a GGUF file into a plan unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import ModelError

# blocks: uint8[n, block_bytes] -> float32[n, block_values]
Dequant = Callable[[np.ndarray], np.ndarray]
# values: float32[n, block_values] -> uint8[n, block_bytes]
Quant = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class BlockFormat:
    name: str            # llama.cpp's name: "Q4_K", "F16", ...
    ggml_type: int       # the type id in GGUF tensor records
    block_values: int    # numbers per block
    block_bytes: int     # bytes per block
    dequant: Dequant
    quant: Quant | None = None   # None where there is no reference quantizer to match

    @property
    def bits_per_value(self) -> float:
        return 8 * self.block_bytes / self.block_values

    def row_bytes(self, n_values: int) -> int:
        """Bytes of one row of `n_values` numbers (a whole number of blocks)."""
        if n_values % self.block_values:
            raise ModelError(f"{self.name} needs rows of a multiple of {self.block_values} values, got {n_values}")
        return n_values // self.block_values * self.block_bytes

    def nbytes(self, shape) -> int:
        """Bytes of a tensor of numpy `shape` (last dim innermost) in this format."""
        shape = tuple(int(d) for d in shape)
        rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        return rows * self.row_bytes(shape[-1] if shape else 1)


FORMATS: dict[str, BlockFormat] = {}
_BY_ID: dict[int, BlockFormat] = {}

# GGML type ids reft knows by name but cannot read, so errors can say which type a file used.
GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
    11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
    19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
    27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}


def register(fmt: BlockFormat) -> BlockFormat:
    if fmt.name in FORMATS or fmt.ggml_type in _BY_ID:
        raise ValueError(f"block format {fmt.name} (type {fmt.ggml_type}) registered twice")
    FORMATS[fmt.name] = _BY_ID[fmt.ggml_type] = fmt
    return fmt


def type_name(ggml_type: int) -> str:
    return GGML_TYPE_NAMES.get(ggml_type, f"unknown type {ggml_type}")


def get_format(qtype: str | int | BlockFormat) -> BlockFormat:
    """A format by name ("Q4_K", case-insensitive) or GGML type id; a ModelError naming an
    unsupported one."""
    if isinstance(qtype, BlockFormat):
        return qtype
    if isinstance(qtype, str):
        fmt = FORMATS.get(qtype.upper())
        shown = qtype
    else:
        fmt = _BY_ID.get(int(qtype))
        shown = type_name(int(qtype))
    if fmt is None:
        raise ModelError(f"unsupported tensor type {shown}; reft reads {', '.join(FORMATS)}")
    return fmt


# --- shared unpacking helpers -------------------------------------------------------------------------
def f16_at(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The float16 at byte `offset` of every block, as float32[n, 1]."""
    return blocks[:, offset:offset + 2].copy().view(np.float16).astype(np.float32)


def nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8[..., k] -> uint8[..., 2k]: the k low nibbles, then the k high nibbles (ggml's order:
    byte j holds value j in its low half and value j + k in its high half)."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Inverse of `nibbles`: uint8[..., 2k] with values < 16 -> uint8[..., k]."""
    k = q.shape[-1] // 2
    return (q[..., :k] & 0x0F) | (q[..., k:] << 4)


def f16_bytes(x: np.ndarray) -> np.ndarray:
    """float32[n, 1] -> the float16 bytes, uint8[n, 2] (round to nearest even, as ggml)."""
    return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8)
