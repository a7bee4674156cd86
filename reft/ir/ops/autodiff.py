"""What the gradient rules share. A rule is the `vjp` of an OpDef:

    vjp(b, node, cts, wants) -> [cotangent or None for each input of node]

  b      a GraphBuilder appending to the graph being differentiated (rules emit through it)
  node   the forward node (or its recomputed copy under gradient checkpointing): its inputs,
         outputs and attributes are what a rule may read
  cts    the gradient of each output of node (a Value of the output's type), None where no
         gradient reaches that output, or ONE for the scalar being differentiated
  wants  for each input, whether its gradient is needed (frozen weights, integer inputs and
         values that depend on no trainable weight are False); a rule emits nothing for those

A returned cotangent has exactly its input's type (shape and dtype); reft/passes/differentiate.py
checks it and sums the contributions of several users.
"""
from __future__ import annotations

import math


class _One:
    """The gradient of the loss with respect to itself (only loss ops accept it)."""

    def __repr__(self) -> str:
        return "ONE"


ONE = _One()


def ct_or_zeros(b, cts, node, i):
    """The gradient of output i, zeros where none reaches it."""
    return cts[i] if cts[i] is not None else b.zeros_like(node.outputs[i])


def unbroadcast(b, g, t):
    """Sum g down to type t (undoing numpy broadcasting: extra leading axes, then size-1 axes)
    and convert it to t's dtype."""
    while g.type.rank > t.rank:
        g = b.sum_rows(g)
    for ax, (dg, dt) in enumerate(zip(g.shape, t.shape)):
        if dt == 1 and dg != 1:
            perm = (ax,) + tuple(i for i in range(t.rank) if i != ax)
            s = b.sum_rows(b.transpose(g, perm=perm))
            g = b.reshape(s, shape=g.shape[:ax] + (1,) + g.shape[ax + 1:])
    if g.dtype != t.dtype:
        g = b.cast(g, dtype=t.dtype)
    return g


def as_rows(b, v):
    """v as a matrix [M, last] (the row layout linear_grad_weight takes)."""
    if v.type.rank == 2:
        return v
    lead = v.shape[:-1]
    if all(isinstance(d, int) for d in lead):
        return b.reshape(v, shape=(math.prod(lead), v.shape[-1]))
    syms = [d for d in lead if isinstance(d, str)]
    if len(syms) == 1 and len(lead) == 1:
        return v
    raise TypeError(f"linear gradient: cannot flatten {v.type} into rows (several symbolic leading dims)")


def f32(b, v):
    return v if v.dtype == "float32" else b.cast(v, dtype="float32")


def linear_grads(b, dy, x, w, bias, wants):
    """[dx, dw, db] of y = x @ w^T (+ bias) given dy = dL/dy (float32, x's leading shape)."""
    out = [None, None, None]
    if wants[0]:
        out[0] = b.linear_grad_input(dy, w)
        if x.dtype != "float32":
            out[0] = b.cast(out[0], dtype=x.dtype)
    if len(wants) > 1 and wants[1]:
        if w.type.quantized:
            raise TypeError(f"cannot differentiate with respect to a quantized weight {w.type}")
        if x.type.rank == 1:
            row = lambda v: b.reshape(v, shape=(1, v.shape[0]))  # noqa: E731
            dw = b.linear_grad_weight(row(dy), row(f32(b, x)))
        else:
            dw = b.linear_grad_weight(as_rows(b, dy), as_rows(b, f32(b, x)))
        out[1] = dw if w.dtype == "float32" else b.cast(dw, dtype=w.dtype)
    if bias is not None and len(wants) > 2 and wants[2]:
        out[2] = unbroadcast(b, dy, bias.type)
    return out
