"""Unquantized GGML types as one-value blocks: F32, F16, BF16.

BF16 is the top half of a float32. Converting to it rounds to nearest even, except that a NaN
stays a (quiet) NaN instead of being rounded into an infinity: the rule ggml uses, so
bytes match llama.cpp's.
"""
from __future__ import annotations

import numpy as np

from .formats import BlockFormat, register


def _dq_f32(blocks):
    return blocks.view(np.float32)


def _q_f32(x):
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint8)


def _dq_f16(blocks):
    return blocks.view(np.float16).astype(np.float32)


def _q_f16(x):
    return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8)


def _dq_bf16(blocks):
    return (blocks.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _q_bf16(x):
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = (bits.astype(np.uint64) + 0x7FFF + ((bits >> 16) & 1)) >> 16
    quiet = (bits >> 16) | 0x40   # keep sign and payload, set the quiet bit
    return np.where(nan, quiet, rounded).astype(np.uint16).view(np.uint8)


F32 = register(BlockFormat("F32", 0, 1, 4, _dq_f32, _q_f32))
F16 = register(BlockFormat("F16", 1, 1, 2, _dq_f16, _q_f16))
BF16 = register(BlockFormat("BF16", 30, 1, 2, _dq_bf16, _q_bf16))
