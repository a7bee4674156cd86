"""Quantized weight formats: llama.cpp's GGML block types and reft's own.

Public API (numpy; the C++ kernels consume the same raw bytes):
  FORMATS                          name -> BlockFormat (name, ggml_type, block_values, block_bytes)
  get_format(name | ggml_type_id)  the BlockFormat, or a ModelError naming an unsupported type
  dequantize(raw, qtype, shape)    raw uint8 bytes of a tensor -> float32 array of `shape` (every
                                   format, MXFP4 included: GPT-OSS's experts, read only)
  quantize(x, qtype)               float array -> its raw uint8 bytes (types with a reference
                                   quantizer: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1)
  quantize_int8(w) / quantize_int4(w, group_size)
                                   reft's own weight-only formats for float checkpoints:
                                   int8 per-channel symmetric, int4 group-wise asymmetric
                                   (reft_formats.py)

A tensor of numpy shape (..., K) in a block format is K / block_values blocks per row, rows
one after another: the layout GGUF files store, so a file's bytes are used unchanged.
"""
from __future__ import annotations

import numpy as np

from ..errors import ModelError
from . import floats, kquants, legacy, mxfp4  # noqa: F401  (register the formats)
from .formats import FORMATS, BlockFormat, get_format, type_name
from .reft_formats import Int4Weights, Int8Weights, quantize_int4, quantize_int8

__all__ = ["FORMATS", "BlockFormat", "get_format", "type_name", "dequantize", "quantize",
           "Int8Weights", "Int4Weights", "quantize_int8", "quantize_int4"]


def _as_bytes(raw) -> np.ndarray:
    a = np.asarray(raw)
    if a.dtype != np.uint8:
        a = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    return a.reshape(-1)


def dequantize(raw, qtype, shape) -> np.ndarray:
    """float32 values of a tensor of numpy `shape` stored as `qtype` in the bytes `raw`."""
    fmt = get_format(qtype)
    shape = tuple(int(d) for d in shape)
    raw = _as_bytes(raw)
    want = fmt.nbytes(shape)
    if raw.size != want:
        raise ModelError(f"{fmt.name} tensor of shape {list(shape)} needs {want} bytes, got {raw.size}")
    blocks = raw.reshape(-1, fmt.block_bytes)
    return fmt.dequant(blocks).reshape(shape)


def quantize(x, qtype) -> np.ndarray:
    """The raw bytes (uint8, shape (..., row_bytes)) of float array `x` in `qtype`."""
    fmt = get_format(qtype)
    if fmt.quant is None:
        raise ModelError(f"reft has no quantizer for {fmt.name} (only dequantization)")
    x = np.asarray(x, dtype=np.float32)
    shape = x.shape if x.ndim else (1,)
    row_bytes = fmt.row_bytes(shape[-1])
    blocks = np.ascontiguousarray(x).reshape(-1, fmt.block_values)
    return fmt.quant(blocks).reshape(*shape[:-1], row_bytes)
