"""Value types of the IR: dtypes and shapes with named symbolic dims.

A dim is either an int (static) or a str naming a symbolic dim bound at run time:
  T  tokens in the flattened batch     S  sequences in the batch
  R  rows whose logits are requested   NP pages in the KV pool
  MP max pages per sequence            (any other identifier is allowed)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

try:  # bfloat16 for numpy; the reference executor stores bf16 weights with it
    import ml_dtypes

    _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is a hard dependency
    _BF16 = None

Dim = int | str
Shape = tuple[Dim, ...]

# IR dtype name -> numpy dtype
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": _BF16,
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "uint8": np.dtype(np.uint8),
}
FLOAT_DTYPES = frozenset({"float32", "float16", "bfloat16"})
INT_DTYPES = frozenset({"int32", "int64", "uint8"})

# Quantized weight dtypes: a value of logical shape [N, K] is stored as raw bytes, uint8[N, row_bytes],
# each row a run of blocks (reft/ir/quantized.py gives their meaning); a stack of matrices [E, N, K]
# (mixture-of-experts weights) as uint8[E, N, row_bytes]. name -> (values, bytes) per block;
# "int8" (reft's per-channel format) is one block per row: a float32 scale, then K int8 codes.
QUANT_DTYPES: dict[str, tuple[int, int]] = {
    "q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24),
    "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210),
    "int8": (0, 4), "int4_g32": (32, 20), "int4_g64": (64, 36), "int4_g128": (128, 68),
}

_SYM = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")


def np_dtype(name: str) -> np.dtype:
    """numpy dtype of a value's storage (uint8 bytes for quantized dtypes)."""
    return np.dtype(np.uint8) if name in QUANT_DTYPES else DTYPES[name]


def is_quantized(dtype: str) -> bool:
    return dtype in QUANT_DTYPES


def row_bytes(dtype: str, k: int) -> int:
    """Bytes of one row of k values in a quantized dtype."""
    bv, bb = QUANT_DTYPES[dtype]
    if bv == 0:   # int8: a scale, then the row's codes; the kernels read them 32 at a time
        if k % 32:
            raise TypeError(f"{dtype} needs rows of a multiple of 32 values, got {k}")
        return bb + k
    if dtype.startswith("int4_"):   # the last group of a row may be short (a multiple of 32 values)
        if k % 32:
            raise TypeError(f"{dtype} needs rows of a multiple of 32 values, got {k}")
        tail = k % bv
        return k // bv * bb + (4 + tail // 2 if tail else 0)
    if k % bv:
        raise TypeError(f"{dtype} needs rows of a multiple of {bv} values, got {k}")
    return k // bv * bb


def dtype_name(dt) -> str:
    dt = np.dtype(dt)
    for k, v in DTYPES.items():
        if v == dt:
            return k
    raise TypeError(f"numpy dtype {dt} has no IR dtype")


def itemsize(dtype: str) -> int:
    return DTYPES[dtype].itemsize


@dataclass(frozen=True)
class TensorType:
    shape: Shape
    dtype: str

    def __post_init__(self):
        if self.dtype not in DTYPES and self.dtype not in QUANT_DTYPES:
            raise TypeError(f"unknown dtype {self.dtype!r}")
        for d in self.shape:
            if isinstance(d, bool) or not (isinstance(d, int) and d >= 0 or isinstance(d, str) and _SYM.match(d)):
                raise TypeError(f"bad dim {d!r} in shape {self.shape}")
        if self.dtype in QUANT_DTYPES:
            if len(self.shape) not in (2, 3) or not isinstance(self.shape[-1], int):
                raise TypeError(f"a {self.dtype} value must be a matrix [N, K] (or a stack [E, N, K]) with static K,"
                                f" got {self.shape}")
            row_bytes(self.dtype, self.shape[-1])

    @property
    def quantized(self) -> bool:
        return self.dtype in QUANT_DTYPES

    def storage_shape(self) -> tuple:
        """Shape of the stored array: the logical shape, or uint8[(E,) N, row_bytes] when quantized."""
        if self.dtype in QUANT_DTYPES:
            return self.shape[:-1] + (row_bytes(self.dtype, self.shape[-1]),)
        return self.shape

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def numel(self) -> int:
        if not self.is_static:
            raise ValueError(f"shape {self.shape} is symbolic")
        return int(np.prod(self.shape, dtype=np.int64))

    def nbytes(self) -> int:
        if self.dtype in QUANT_DTYPES:
            return TensorType(self.storage_shape(), "uint8").numel()
        return self.numel() * itemsize(self.dtype)

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(str(d) for d in self.shape)}]"


def bind(shape: Shape, sizes: dict[str, int]) -> tuple[int, ...]:
    """Concrete shape for the given symbol sizes."""
    return tuple(d if isinstance(d, int) else sizes[d] for d in shape)


def unify(shape: Shape, concrete: tuple[int, ...], sizes: dict[str, int], what: str) -> None:
    """Check `concrete` against `shape`, binding unseen symbols into `sizes`."""
    if len(shape) != len(concrete):
        raise ValueError(f"{what}: expected rank {len(shape)} {shape}, got shape {concrete}")
    for d, c in zip(shape, concrete):
        if isinstance(d, int):
            if d != c:
                raise ValueError(f"{what}: expected shape {shape}, got {concrete}")
        elif sizes.setdefault(d, c) != c:
            raise ValueError(f"{what}: dim {d} is {sizes[d]} elsewhere but {c} here (shape {concrete})")


def dims_product(dims) -> tuple[int, tuple[str, ...]]:
    """(product of static dims, sorted symbolic dims) — the 'size' of a shape."""
    p, syms = 1, []
    for d in dims:
        if isinstance(d, int):
            p *= d
        else:
            syms.append(d)
    return p, tuple(sorted(syms))
