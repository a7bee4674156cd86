"""ggml's first block formats: 32 values per block, one float16 scale (and a float16 offset in
the `_1` variants).

  Q8_0  d, 32 x int8                      x = d * q
  Q4_0  d, 16 bytes of nibbles            x = d * (q - 8)
  Q4_1  d, m, 16 bytes of nibbles         x = d * q + m
  Q5_0  d, 4 bytes of 5th bits, nibbles   x = d * (q - 16)
  Q5_1  d, m, 4 bytes of 5th bits, nib.   x = d * q + m

Nibble byte j holds value j (low half) and value j + 16 (high half); bit j of the little-endian
32-bit word holds the 5th bit of value j.

The quantizers follow ggml's reference (round-to-nearest, no search), in the same float32
operation order, so their bytes equal what llama.cpp and the `gguf` package write:
  _0 variants: d = (the value of largest magnitude, sign kept) / -2^(bits-1); codes are
               truncate(x / d + 2^(bits-1) + 0.5), capped at the top code.
  _1 variants: d = (max - min) / (2^bits - 1), m = min; codes truncate((x - m) / d + 0.5).
  Q8_0:        d = max|x| / 127; codes round-half-away(x / d).
Division is multiplication by the float32 reciprocal (0 for an all-zero block), as in ggml.
"""
from __future__ import annotations

import numpy as np

from .formats import BlockFormat, f16_at, f16_bytes, nibbles, pack_nibbles, register

QK = 32


# --- unpacking --------------------------------------------------------------------------------------
def _fifth_bits(blocks: np.ndarray, offset: int) -> np.ndarray:
    """uint8[n, 32]: bit j of the little-endian uint32 at `offset`, shifted to 16 (the 5th bit)."""
    return np.unpackbits(blocks[:, offset:offset + 4], axis=1, bitorder="little") << 4


def _dq_q8_0(blocks):
    return f16_at(blocks, 0) * blocks[:, 2:].view(np.int8).astype(np.float32)


def _dq_q4_0(blocks):
    q = nibbles(blocks[:, 2:]).astype(np.int8) - 8
    return f16_at(blocks, 0) * q.astype(np.float32)


def _dq_q4_1(blocks):
    return f16_at(blocks, 0) * nibbles(blocks[:, 4:]).astype(np.float32) + f16_at(blocks, 2)


def _dq_q5_0(blocks):
    q = (nibbles(blocks[:, 6:]) | _fifth_bits(blocks, 2)).astype(np.int8) - 16
    return f16_at(blocks, 0) * q.astype(np.float32)


def _dq_q5_1(blocks):
    q = nibbles(blocks[:, 8:]) | _fifth_bits(blocks, 4)
    return f16_at(blocks, 0) * q.astype(np.float32) + f16_at(blocks, 2)


# --- reference quantizers ---------------------------------------------------------------------------
def _reciprocal(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf: halves go away from zero (np.round goes to even). Exact: the fraction of a
    float is representable."""
    a = np.abs(x)
    r = np.floor(a)
    r += (a - r) >= 0.5
    return np.copysign(r, x)


def _signed_absmax(x: np.ndarray) -> np.ndarray:
    """Per block, the value of largest magnitude with its sign (the first one on ties)."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=1, keepdims=True), axis=1)


def _codes(y: np.ndarray, top: int) -> np.ndarray:
    """truncate toward zero (y >= 0 here), capped at `top`."""
    return np.minimum(np.trunc(y), top).astype(np.uint8)


def _q_symmetric(x, bits):
    """d and codes of the _0 variants."""
    half = 1 << (bits - 1)
    d = _signed_absmax(x) / np.float32(-half)
    q = _codes(x * _reciprocal(d) + np.float32(half + 0.5), 2 * half - 1)
    return d, q


def _q_offset(x, bits):
    """d, m and codes of the _1 variants."""
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    top = (1 << bits) - 1
    d = (hi - lo) / np.float32(top)
    q = _codes((x - lo) * _reciprocal(d) + np.float32(0.5), top)
    return d, lo, q


def _fifth_bit_bytes(q: np.ndarray) -> np.ndarray:
    return np.packbits(q >> 4, axis=1, bitorder="little")


def _q_q8_0(x):
    d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
    q = round_half_away(x * _reciprocal(d)).astype(np.int8)
    return np.concatenate([f16_bytes(d), q.view(np.uint8)], axis=1)


def _q_q4_0(x):
    d, q = _q_symmetric(x, 4)
    return np.concatenate([f16_bytes(d), pack_nibbles(q)], axis=1)


def _q_q4_1(x):
    d, m, q = _q_offset(x, 4)
    return np.concatenate([f16_bytes(d), f16_bytes(m), pack_nibbles(q)], axis=1)


def _q_q5_0(x):
    d, q = _q_symmetric(x, 5)
    return np.concatenate([f16_bytes(d), _fifth_bit_bytes(q), pack_nibbles(q)], axis=1)


def _q_q5_1(x):
    d, m, q = _q_offset(x, 5)
    return np.concatenate([f16_bytes(d), f16_bytes(m), _fifth_bit_bytes(q), pack_nibbles(q)], axis=1)


Q4_0 = register(BlockFormat("Q4_0", 2, QK, 2 + QK // 2, _dq_q4_0, _q_q4_0))
Q4_1 = register(BlockFormat("Q4_1", 3, QK, 4 + QK // 2, _dq_q4_1, _q_q4_1))
Q5_0 = register(BlockFormat("Q5_0", 6, QK, 6 + QK // 2, _dq_q5_0, _q_q5_0))
Q5_1 = register(BlockFormat("Q5_1", 7, QK, 8 + QK // 2, _dq_q5_1, _q_q5_1))
Q8_0 = register(BlockFormat("Q8_0", 8, QK, 2 + QK, _dq_q8_0, _q_q8_0))
