"""Multi-adapter LoRA for serving: each token's row gets the low-rank update of its own adapter.

`lora_add(y[T, N], x[T, K], a[S, R, K], b[S, R, N], ids[T]) -> y + delta`, where for a token t
with adapter slot s = ids[t] >= 0

    delta[t] = (a[s] @ x[t]) @ b[s]          (R-wide intermediate)

and delta[t] = 0 for ids[t] < 0 (the base model). `a` is PEFT's lora_A padded to R rows; `b` is
lora_B transposed to [R, N], scaled by the adapter's alpha / r and padded with zero rows, so one
shape serves adapters of every rank up to R (reft/runtime/lora.py fills them). Requests for
different adapters and for the base model share a batch: the adapter weights are gathered per
row (the Punica / S-LoRA way), not merged into the base weights.
"""
from __future__ import annotations

import numpy as np

from ..types import TensorType
from .registry import check, f32, op


def _lora_add_infer(ts, a):
    y, x, la, lb, ids = ts
    check(all(t.dtype == "float32" for t in (y, x, la, lb)), f"lora_add: float32 y, x, a, b required, got"
          f" {y.dtype}, {x.dtype}, {la.dtype}, {lb.dtype}")
    check(ids.dtype == "int32" and ids.rank == 1, f"lora_add: ids must be int32 [T], got {ids}")
    check(y.rank == 2 and x.rank == 2 and y.shape[0] == x.shape[0] == ids.shape[0],
          f"lora_add: y {y}, x {x} and ids {ids} must share their rows")
    check(la.rank == 3 and lb.rank == 3 and la.shape[:2] == lb.shape[:2],
          f"lora_add: a [S, R, K] and b [S, R, N] disagree: {la}, {lb}")
    check(la.shape[2] == x.shape[1] and lb.shape[2] == y.shape[1],
          f"lora_add: a {la} / b {lb} do not fit x {x} -> y {y}")
    return [TensorType(y.shape, "float32")]


def _lora_add_ref(xs, a):
    y, x, la, lb, ids = xs
    out = f32(y).copy()
    rows = np.flatnonzero(ids >= 0)
    if rows.size:
        s = ids[rows]
        h = np.einsum("tk,trk->tr", f32(x)[rows], f32(la)[s])
        out[rows] += np.einsum("tr,trn->tn", h, f32(lb)[s])
    return [out]


op("lora_add", infer=_lora_add_infer, ref=_lora_add_ref, arity=5,
   doc="y + per-row LoRA update: (a[ids[t]] @ x[t]) @ b[ids[t]] for ids[t] >= 0, nothing for -1.")
