"""View ops: reshape, transpose, split, concat, and row selection."""
from __future__ import annotations

import numpy as np

from ..types import TensorType, dims_product
from .autodiff import ct_or_zeros
from .registry import VIEW, check, op


def _axis(a, rank, name):
    ax = a["axis"]
    ax = ax + rank if ax < 0 else ax
    check(0 <= ax < rank, f"{name}: axis {a['axis']} out of range for rank {rank}")
    return ax


def _reshape_infer(ts, a):
    x, shape = ts[0], tuple(a["shape"])
    check(dims_product(x.shape) == dims_product(shape), f"reshape: {x.shape} cannot become {shape}")
    return [TensorType(shape, x.dtype)]


def _reshape_ref(xs, a):
    x = xs[0]
    known = {}
    # bind symbols of the target shape from the source shape where they appear at the same dims
    static = int(np.prod([d for d in a["shape"] if isinstance(d, int)], dtype=np.int64))
    syms = [d for d in a["shape"] if isinstance(d, str)]
    if len(syms) == 1:
        known[syms[0]] = x.size // max(static, 1)
    elif len(syms) > 1:
        raise TypeError("reshape: the reference needs at most one symbolic dim in the target")
    return [x.reshape(tuple(known.get(d, d) for d in a["shape"]))]


op("reshape", aliases={0: 0}, infer=_reshape_infer, ref=_reshape_ref, arity=1,
   vjp=lambda b, node, cts, wants: [b.reshape(cts[0], shape=node.inputs[0].shape)], traits={VIEW}, attrs=("shape",),
   doc="Same elements in row-major order, new shape (static dims and the same symbols).")


def _transpose_infer(ts, a):
    x, perm = ts[0], tuple(a["perm"])
    check(sorted(perm) == list(range(x.rank)), f"transpose: perm {perm} is not a permutation of rank {x.rank}")
    return [TensorType(tuple(x.shape[p] for p in perm), x.dtype)]


def _transpose_vjp(b, node, cts, wants):
    inverse = tuple(int(i) for i in np.argsort(node.attrs["perm"]))
    return [b.transpose(cts[0], perm=inverse)]


op("transpose", infer=_transpose_infer, ref=lambda xs, a: [np.ascontiguousarray(xs[0].transpose(a["perm"]))],
   vjp=_transpose_vjp, arity=1, traits={VIEW}, attrs=("perm",), doc="Permute axes.")


def _split_infer(ts, a):
    x = ts[0]
    ax = _axis(a, x.rank, "split")
    sizes = tuple(a["sizes"])
    check(isinstance(x.shape[ax], int) and sum(sizes) == x.shape[ax] and all(s > 0 for s in sizes),
          f"split: sizes {sizes} do not add up to dim {x.shape[ax]} of {x.shape}")
    return [TensorType(x.shape[:ax] + (s,) + x.shape[ax + 1:], x.dtype) for s in sizes]


def _split_ref(xs, a):
    x = xs[0]
    ax = a["axis"] % x.ndim
    return [np.ascontiguousarray(p) for p in np.split(x, np.cumsum(a["sizes"])[:-1], axis=ax)]


def _split_vjp(b, node, cts, wants):
    parts = [ct_or_zeros(b, cts, node, i) for i in range(len(node.outputs))]
    return [b.concat(*parts, axis=node.attrs["axis"])]


op("split", infer=_split_infer, ref=_split_ref, vjp=_split_vjp, arity=1, traits={VIEW}, attrs=("axis", "sizes"),
   doc="Split a static axis into consecutive parts of the given sizes (one output each).")


def _concat_infer(ts, a):
    x = ts[0]
    ax = _axis(a, x.rank, "concat")
    total = 0
    for t in ts:
        check(t.rank == x.rank and t.dtype == x.dtype, f"concat: {t} does not match {x}")
        check(all(t.shape[i] == x.shape[i] for i in range(x.rank) if i != ax), f"concat: {t} does not match {x} off axis {ax}")
        check(isinstance(t.shape[ax], int), f"concat: axis {ax} of {t} must be static")
        total += t.shape[ax]
    return [TensorType(x.shape[:ax] + (total,) + x.shape[ax + 1:], x.dtype)]


def _concat_vjp(b, node, cts, wants):
    ax = node.attrs["axis"] % node.out.type.rank
    parts = b.split(cts[0], axis=ax, sizes=tuple(v.shape[ax] for v in node.inputs))
    parts = parts if isinstance(parts, list) else [parts]
    return [p if w else None for p, w in zip(parts, wants)]


op("concat", infer=_concat_infer, ref=lambda xs, a: [np.concatenate(xs, axis=a["axis"])], vjp=_concat_vjp,
   arity=(1, 1 << 16), traits={VIEW}, attrs=("axis",), doc="Concatenate along a static axis.")


def _take_rows_infer(ts, a):
    x, rows = ts
    check(rows.rank == 1 and rows.dtype in ("int32", "int64"), f"take_rows: rows must be int[R], got {rows}")
    check(x.rank >= 1, "take_rows: x must have rank >= 1")
    return [TensorType((rows.shape[0],) + x.shape[1:], x.dtype)]


def _take_rows_ref(xs, a):
    x, rows = xs
    if rows.size and (rows.min() < 0 or rows.max() >= x.shape[0]):
        raise IndexError(f"take_rows: row index out of range [0, {x.shape[0]})")
    return [x[rows]]


def _take_rows_vjp(b, node, cts, wants):
    x, rows = node.inputs
    return [b.scatter_rows(b.zeros_like(x), rows, cts[0]), None]


op("take_rows", infer=_take_rows_infer, ref=_take_rows_ref, vjp=_take_rows_vjp, arity=2, traits={VIEW},
   doc="x[rows]: select rows of the first axis (logits only for the rows the caller asks for).")
