"""ggml's K-quants: super-blocks of 256 values in sub-blocks with their own small-integer scales.

  Q4_K  (144 B)  d f16, dmin f16, 12 bytes of 6-bit (scale, min) for 8 sub-blocks of 32,
                 128 bytes of nibbles.                        x = d*sc * q - dmin*mn
  Q5_K  (176 B)  as Q4_K plus 32 bytes holding each value's 5th bit.
  Q6_K  (210 B)  128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 int8 scales
                 (one per 16 values), d f16 last.             x = d*sc * (q - 32)

Layouts, as ggml defines them:
- Q4_K/Q5_K codes come in four chunks of 32 bytes; chunk c gives sub-block 2c (low nibbles)
  and 2c+1 (high nibbles). In Q5_K, bit 2c / 2c+1 of byte l of the 5th-bit array is the top
  bit of value l of those sub-blocks.
- The 12 scale bytes s[0..11] pack eight 6-bit scales and eight 6-bit mins: sub-blocks 0-3
  keep theirs in the low 6 bits of s[j] (scale) and s[j+4] (min); sub-blocks 4-7 take the low
  (scale) / high (min) nibble of s[j+4] and borrow their top two bits from the spare top bits
  of s[j-4] (scale) and s[j] (min).
- Q6_K is two halves of 128 values. In a half, byte l (< 32) of the high parts holds 2-bit
  pieces for values l, l+32, l+64, l+96 (bits 0-1, 2-3, 4-5, 6-7); low nibbles of bytes l and
  l+32 of that half's 64 code bytes give values l and l+32, their high nibbles l+64 and l+96.
  Scale k of a half covers its values 16k..16k+15.

Only dequantization: the `gguf` package has no reference quantizer for K-quants to match.
The products are formed as ggml forms them (sub-block scale d*sc first), so results are
bit-identical to llama.cpp's.
"""
from __future__ import annotations

import numpy as np

from .formats import BlockFormat, f16_at, register

QK_K = 256


def scales_and_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8[n, 12] -> (scales, mins), each uint8[n, 8], per the packing in the module docstring."""
    s = packed
    lo_sc, lo_mn = s[:, 0:4] & 63, s[:, 4:8] & 63
    hi_sc = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    hi_mn = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return np.concatenate([lo_sc, hi_sc], axis=1), np.concatenate([lo_mn, hi_mn], axis=1)


def _chunk_nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8[n, 128] codes -> uint8[n, 8, 32]: sub-block 2c = low nibbles of chunk c, 2c+1 = high."""
    chunks = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([chunks & 0x0F, chunks >> 4], axis=2).reshape(-1, 8, 32)


def _affine(blocks: np.ndarray, q: np.ndarray) -> np.ndarray:
    """x = (d*sc) * q - (dmin*mn) for uint8 codes q[n, 8, 32] of a Q4_K/Q5_K block."""
    sc, mn = scales_and_mins(blocks[:, 4:16])
    d = f16_at(blocks, 0) * sc.astype(np.float32)        # (n, 8)
    m = f16_at(blocks, 2) * mn.astype(np.float32)
    return (d[:, :, None] * q.astype(np.float32) - m[:, :, None]).reshape(-1, QK_K)


def _dq_q4_k(blocks):
    return _affine(blocks, _chunk_nibbles(blocks[:, 16:144]))


def _dq_q5_k(blocks):
    qh = blocks[:, 16:48]                                  # (n, 32): byte l, bit s -> sub-block s
    top = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1   # (n, 8, 32)
    return _affine(blocks, _chunk_nibbles(blocks[:, 48:176]) | (top << 4))


def _dq_q6_k(blocks):
    ql = blocks[:, 0:128].reshape(-1, 2, 2, 32)            # (n, half, which 32 bytes, l)
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 32)          # (n, half, 1, l)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)     # (n, half, 4, l): values l, l+32, l+64, l+96
    high = (qh >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3
    q = ((low | (high << 4)).astype(np.int8) - 32).astype(np.float32).reshape(-1, 16, 16)
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32)  # (n, 16)
    d = f16_at(blocks, 208) * sc
    return (d[:, :, None] * q).reshape(-1, QK_K)


Q4_K = register(BlockFormat("Q4_K", 12, QK_K, 4 + 12 + QK_K // 2, _dq_q4_k))
Q5_K = register(BlockFormat("Q5_K", 13, QK_K, 4 + 12 + QK_K // 8 + QK_K // 2, _dq_q5_k))
Q6_K = register(BlockFormat("Q6_K", 14, QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2, _dq_q6_k))
