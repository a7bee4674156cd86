"""Quantized weight values: what the bytes of a quantized IR dtype mean, in numpy.

A weight of logical shape [N, K] and a quantized dtype is stored as uint8[N, row_bytes]; each
row is a run of blocks (types.QUANT_DTYPES gives their sizes):

  q8_0 q4_0 q4_1 q5_0 q5_1 q4_k q5_k q6_k   llama.cpp's blocks, byte for byte as in a GGUF file
                                          (reft.quant holds their numpy reference)
  int8       reft's per-channel format: a row is its float32 scale, then K int8 codes;
             w = scale * q
  int4_g{G}  reft's group-wise asymmetric format: a block of G values (the last block of a row
             may be shorter, a multiple of 32) is float16 scale, float16 min, then G/2 bytes of
             codes 0..15 (in each 32 values, byte j holds value j in its low nibble and j + 16 in
             its high one); w = scale * q + min

A stack of matrices [E, N, K] (the experts of a mixture-of-experts layer) is stored as
uint8[E, N, row_bytes]. Ops that read weights (linear, linear_glu, qkv_rope, embedding, the expert
matmuls) get a `QTensor` from the reference executor and dequantize it to float32 before computing
as they do for float weights; the kernels of other backends read the same bytes. Matmuls on llama.cpp's types also round
their activations to int16 per block of 32 values (`quantize_activations`; llama.cpp rounds to
int8), so kernels can use integer dot products; reft's int8/int4 formats are weight-only (float
activations).
"""
from __future__ import annotations

import numpy as np

from .types import QUANT_DTYPES, TensorType, row_bytes

# IR dtype -> reft.quant format name, for llama.cpp's block types
GGML_NAMES = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1",
              "q4_k": "Q4_K", "q5_k": "Q5_K", "q6_k": "Q6_K"}
INT4_GROUPS = {32: "int4_g32", 64: "int4_g64", 128: "int4_g128"}


def ir_dtype_of_ggml(type_name: str) -> str | None:
    """The IR dtype keeping a GGUF tensor type quantized (None for F32/F16/BF16 and unknown types)."""
    return next((k for k, v in GGML_NAMES.items() if v == type_name), None)


def rounds_activations(dtype: str) -> bool:
    """Whether a matmul on weights of `dtype` multiplies `quantize_activations(x)`: llama.cpp's
    block types do; float weights and reft's weight-only int8/int4 take x as it is."""
    return dtype in GGML_NAMES


def quantize_activations(x: np.ndarray) -> np.ndarray:
    """x[..., K] float32 rounded to int16 codes per block of 32 values and back: d = max|x| / 32767,
    code = round-half-even(x * (1 / d)). What a matmul on a llama.cpp block type multiplies."""
    x = np.asarray(x, dtype=np.float32)
    b = x.reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    d = (np.abs(b).max(axis=-1, keepdims=True) / np.float32(32767)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(b * inv), -32768, 32767)
    return (q * d).astype(np.float32).reshape(x.shape)


def dequantize_rows(raw: np.ndarray, dtype: str, k: int) -> np.ndarray:
    """uint8[n, row_bytes] rows of `dtype` -> float32[n, k]."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, row_bytes(dtype, k))
    n = raw.shape[0]
    if dtype in GGML_NAMES:
        from ..quant import dequantize

        return dequantize(raw, GGML_NAMES[dtype], (n, k))
    if dtype == "int8":
        scale = raw[:, :4].copy().view(np.float32)                          # (n, 1)
        return raw[:, 4:].view(np.int8).astype(np.float32) * scale
    from ..quant.reft_formats import group_sizes

    g = QUANT_DTYPES[dtype][0]
    out, at = [], 0
    for size in group_sizes(k, g):   # whole groups, then a shorter last one where g does not divide k
        block = raw[:, at:at + 4 + size // 2]
        at += 4 + size // 2
        scale = block[:, 0:2].copy().view(np.float16).astype(np.float32)  # (n, 1)
        mn = block[:, 2:4].copy().view(np.float16).astype(np.float32)
        codes = block[:, 4:].reshape(n, size // 32, 16)
        q = np.concatenate([codes & 0x0F, codes >> 4], axis=-1).reshape(n, size)
        out.append(q.astype(np.float32) * scale + mn)
    return np.concatenate(out, axis=1)


def quantize_weight(w: np.ndarray, dtype: str) -> np.ndarray:
    """float[N, K] -> its uint8[N, row_bytes] in `dtype` (int8, int4_g*, or a GGML type with a
    reference quantizer); a stack float[E, N, K] -> uint8[E, N, row_bytes], matrix by matrix.
    int8/int4 use reft.quant's quantize_int8 / quantize_int4."""
    from ..quant import quantize, quantize_int4, quantize_int8

    w = np.asarray(w, dtype=np.float32)
    if w.ndim == 3:
        return np.stack([quantize_weight(m, dtype) for m in w])
    n, k = w.shape
    if dtype in GGML_NAMES:
        return quantize(w, GGML_NAMES[dtype]).reshape(n, row_bytes(dtype, k))
    if dtype == "int8":
        q = quantize_int8(w)
        return np.concatenate([q.scale.reshape(n, 1).view(np.uint8), q.q.view(np.uint8)], axis=1)
    g = QUANT_DTYPES[dtype][0]
    q = quantize_int4(w, g)
    parts = []
    for i, start in enumerate(range(0, k, g)):   # [scale][min][codes] per group, the last maybe short
        parts += [q.scale[:, i:i + 1].view(np.uint8), q.min[:, i:i + 1].view(np.uint8),
                  q.q[:, start // 2:min(start + g, k) // 2]]
    return np.ascontiguousarray(np.concatenate(parts, axis=1))


class QTensor:
    """A quantized weight as the reference executor hands it to op references."""

    def __init__(self, raw: np.ndarray, t: TensorType):
        want = t.storage_shape()
        if raw.dtype != np.uint8 or tuple(raw.shape) != want:
            raise ValueError(f"a {t} weight is stored as uint8{list(want)}, got {raw.dtype}{list(raw.shape)}")
        self.raw, self.dtype, self.shape = raw, t.dtype, tuple(t.shape)
        self.int16_activations = rounds_activations(t.dtype)
        self._f32 = None

    def dequantize(self) -> np.ndarray:
        if self._f32 is None:
            self._f32 = dequantize_rows(self.raw, self.dtype, self.shape[-1]).reshape(self.shape)
        return self._f32

    def take(self, ids: np.ndarray) -> np.ndarray:
        """float32 rows `ids` (an embedding lookup dequantizes only the rows it reads)."""
        if self._f32 is not None:
            return self._f32[ids]
        return dequantize_rows(self.raw[ids.reshape(-1)], self.dtype, self.shape[1]).reshape(*ids.shape, self.shape[1])
