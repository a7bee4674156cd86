"""reft's own weight-only formats for float checkpoints (what `--quant int8|int4` will write).

  int8  per output channel, symmetric:  w[o, i] ~= scale[o] * q[o, i]
        q int8[out, in] in [-127, 127], scale float32[out] = max|w[o]| / 127
  int4  per group of g (32, 64, 128) input values, asymmetric:  w ~= scale * q + min
        q uint8[out, in/2] (two codes a byte), scale/min float16[out, ceil(in/g)], codes 0..15,
        scale = (max - min) / 15 of the group; where g does not divide the row (576 inputs in
        groups of 128) its last group is shorter, a multiple of 32 values

Both round to nearest (ties to even, as torch's quantizers do). int4 codes are computed against
the float16 scale and min actually stored, so the rounding error is at most half a step of
what the kernel will use. Within each 32 values of a row, byte j holds value j in its low nibble
and value j + 16 in its high nibble (ggml's Q4 order: one 16-byte load unpacks to 32 values
with a mask and a shift).

Each format keeps its arrays separate (codes, scales, offsets) so a plan stores them as plain
tensors beside each other and a kernel streams the codes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ReftError
from .formats import nibbles, pack_nibbles

GROUP_SIZES = (32, 64, 128)


def _matrix(w) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ReftError(f"weight-only quantization takes a matrix [out, in], got shape {list(w.shape)}")
    if not np.isfinite(w).all():
        raise ReftError("cannot quantize a weight holding inf or NaN")
    return w


def _safe_div(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    """x / d, and 0 where d == 0 (an all-zero row or a constant group)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d == 0, np.float32(0), x / np.where(d == 0, np.float32(1), d))


@dataclass(frozen=True)
class Int8Weights:
    q: np.ndarray       # int8[out, in]
    scale: np.ndarray   # float32[out]

    def dequantize(self) -> np.ndarray:
        return self.q.astype(np.float32) * self.scale[:, None]

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes


def quantize_int8(w) -> Int8Weights:
    w = _matrix(w)
    scale = np.abs(w).max(axis=1) / np.float32(127)                       # (out,)
    q = np.clip(np.rint(_safe_div(w, scale[:, None])), -127, 127).astype(np.int8)
    return Int8Weights(q, scale.astype(np.float32))


@dataclass(frozen=True)
class Int4Weights:
    q: np.ndarray       # uint8[out, in/2]
    scale: np.ndarray   # float16[out, in/g]
    min: np.ndarray     # float16[out, in/g]
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.q.shape[1] * 2

    def codes(self) -> np.ndarray:
        """uint8[out, in], values 0..15."""
        out, n = self.shape
        return nibbles(self.q.reshape(out, n // 32, 16)).reshape(out, n)

    def dequantize(self) -> np.ndarray:
        sizes = group_sizes(self.shape[1], self.group_size)
        scale = np.repeat(self.scale.astype(np.float32), sizes, axis=1)
        return self.codes().astype(np.float32) * scale + np.repeat(self.min.astype(np.float32), sizes, axis=1)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes + self.min.nbytes


def group_sizes(n: int, group_size: int) -> np.ndarray:
    """Values in each group of a row of n: group_size, ..., then the remainder if any."""
    return np.diff(np.append(np.arange(0, n, group_size), n))


def quantize_int4(w, group_size: int = 32) -> Int4Weights:
    w = _matrix(w)
    if group_size not in GROUP_SIZES:
        raise ReftError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    out, n = w.shape
    if n % 32:
        raise ReftError(f"int4 needs rows of a multiple of 32 values, got {n}")
    starts, sizes = np.arange(0, n, group_size), group_sizes(n, group_size)
    lo, hi = np.minimum.reduceat(w, starts, axis=1), np.maximum.reduceat(w, starts, axis=1)
    lo16 = lo.astype(np.float16)
    scale16 = ((hi - lo) / np.float32(15)).astype(np.float16)
    step = np.repeat(scale16.astype(np.float32), sizes, axis=1)
    base = np.repeat(lo16.astype(np.float32), sizes, axis=1)
    q = np.clip(np.rint(_safe_div(w - base, step)), 0, 15).astype(np.uint8)
    packed = pack_nibbles(q.reshape(out, n // 32, 32)).reshape(out, n // 2)
    return Int4Weights(packed, scale16, lo16, group_size)
