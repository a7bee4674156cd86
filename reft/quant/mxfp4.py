"""MXFP4 (OCP microscaling FP4, GGML type 39): the block format of GPT-OSS's released expert weights,
as llama.cpp stores it. Read only: reft dequantizes it to float32 when a GGUF file is loaded.

  block of 32 values, 17 bytes:  e (uint8, an E8M0 power-of-two exponent), 16 bytes of nibbles
  x = 2^(e - 128) * K[q]         K = 0, 1, 2, 3, 4, 6, 8, 12, -0, -1, -2, -3, -4, -6, -8, -12

K is FP4 E2M1 (0, 0.5, 1, 1.5, 2, 3, 4, 6 with a sign bit) doubled, hence the halved scale 2^(e - 128).
Nibble byte j holds value j (low half) and value j + 16 (high half), as in ggml's other 4-bit
blocks. Exponents 0 and 1 give the subnormal float32 scales 2^-128 and 2^-127.
"""
from __future__ import annotations

import numpy as np

from .formats import BlockFormat, nibbles, register

QK = 32
CODES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.float32)


def half_scale(e: np.ndarray) -> np.ndarray:
    """2^(e - 128) as float32 for uint8 exponents e (exact, subnormals included)."""
    return np.ldexp(np.float32(1), e.astype(np.int32) - 128).astype(np.float32)


def _dq_mxfp4(blocks: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):     # exponent 255 times 12 is inf, as in ggml
        return half_scale(blocks[:, :1]) * CODES[nibbles(blocks[:, 1:])]


MXFP4 = register(BlockFormat("MXFP4", 39, QK, 1 + QK // 2, _dq_mxfp4))


# transformers' own MXFP4 checkpoints (GPT-OSS's `quant_method: mxfp4` safetensors) pack the same values
# differently: `<name>_blocks` uint8[..., N, K / 32, 16] with value 2i in the low nibble of byte i and
# 2i + 1 in the high one, and `<name>_scales` uint8[..., N, K / 32] with x = 2^(scale - 127) * FP4[q]
FP4 = CODES / 2


def dequantize_packed(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32[..., N, K] from a transformers MXFP4 pair (blocks [..., N, K / 32, 16], scales [..., N, K / 32])."""
    blocks, scales = np.asarray(blocks, np.uint8), np.asarray(scales, np.uint8)
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != QK // 2:
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not pair up")
    q = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*scales.shape, QK)      # [..., N, K / 32, 32]
    x = FP4[q] * np.ldexp(np.float32(1), scales.astype(np.int32) - 127).astype(np.float32)[..., None]
    return x.reshape(*scales.shape[:-1], scales.shape[-1] * QK)
