"""Loss ops: softmax cross-entropy of the LM head fused with the head's matmul.

The [T, V] logits never exist at once: both ops walk the rows in chunks of CHUNK tokens,
computing a chunk's logits, using them and dropping them (torchtune / Liger style). The backward
recomputes each chunk's logits and forms dx and dhead in the same loop.

Targets are already shifted: row t's target is the token at t + 1 of the same sequence, or
`ignore_index` (-100) where there is none (a sequence's last token) or where the loss is masked
(SFT prompt tokens). The caller normalises through the `scale` input: the training runtime feeds
1 / (number of target tokens in the whole accumulated batch), so the loss is the mean over
target tokens, as Hugging Face / torchtune compute it, and gradient accumulation sums exactly.

  linear_cross_entropy(x[T, D], head[V, D], targets[T], scale[]) -> (loss[], lse[T])
        z = x @ head^T (soft-capped to softcap * tanh(z / softcap) when softcap > 0: Gemma 2's
        final logits); loss = scale * sum over rows with target != ignore_index of
        (logsumexp(z_t) - z_t[target_t]); lse[t] = logsumexp(z_t) for those rows, 0 for
        ignored rows (saved for the backward). {ignore_index=-100, softcap=0}
  linear_cross_entropy_grad(x, head, targets, scale, lse[, dloss]) -> (dx[T, D], dhead[V, D])
        with G = dloss * scale (dloss = 1 when absent) and p = exp(z - lse):
        dz = G (p - onehot(target)) on rows with a target, 0 elsewhere (times 1 - tanh^2 with
        softcap); dx = dz @ head, dhead = dz^T @ x. {ignore_index=-100, softcap=0}

x, the gradients and the loss are float32; head may be any float dtype (read as float32);
targets int32 or int64; scale and dloss float32[]. A target outside [0, V) that is not the
ignore index is an error.
"""
from __future__ import annotations

import numpy as np

from ..types import TensorType
from .autodiff import ONE
from .registry import CONTRACTION, check, f32, is_float, op

CHUNK = 256                     # rows per chunk in the reference (kernels choose their own)
SCALAR = TensorType((), "float32")


def _check(ts, name):
    x, head, targets, scale = ts[:4]
    check(x.dtype == "float32" and x.rank == 2, f"{name}: x must be float32[T, D], got {x}")
    check(head.rank == 2 and is_float(head) and head.shape[1] == x.shape[1],
          f"{name}: head must be float[V, {x.shape[1]}], got {head}")
    check(targets.dtype in ("int32", "int64") and targets.shape == (x.shape[0],),
          f"{name}: targets must be int[{x.shape[0]}], got {targets}")
    check(scale == SCALAR, f"{name}: scale must be float32[], got {scale}")
    return x, head


def _chunks(x, head, targets, ignore, softcap=0.0):
    """(rows, logits (n, V) float32, valid (n,), clipped targets (n,), tanh of the capped logits or
    None) per chunk of CHUNK rows."""
    V = head.shape[0]
    valid_all = targets != ignore
    bad = valid_all & ((targets < 0) | (targets >= V))
    if bad.any():
        raise IndexError(f"linear_cross_entropy: target {int(targets[bad][0])} out of range [0, {V})")
    w = f32(head)
    for s in range(0, x.shape[0], CHUNK):
        rows = slice(s, min(s + CHUNK, x.shape[0]))
        valid = valid_all[rows]
        z, t = f32(x[rows]) @ w.T, None
        if softcap:
            t = np.tanh(z / np.float32(softcap))
            z = t * np.float32(softcap)
        yield rows, z, valid, np.where(valid, targets[rows], 0), t


def _lse(z):
    m = z.max(axis=-1)
    return np.log(np.exp(z - m[:, None]).sum(axis=-1)) + m


def _lce_infer(ts, a):
    x, _ = _check(ts, "linear_cross_entropy")
    return [SCALAR, TensorType((x.shape[0],), "float32")]


def _lce_ref(xs, a):
    x, head, targets, scale = xs
    lse = np.zeros(x.shape[0], np.float32)
    total = 0.0
    for rows, z, valid, t, _ in _chunks(x, head, targets, a["ignore_index"], a["softcap"]):
        l = _lse(z)
        nll = l - z[np.arange(len(t)), t]
        total += float(np.sum(nll[valid], dtype=np.float64))
        lse[rows] = np.where(valid, l, 0.0)
    return [np.array(np.float32(scale) * np.float32(total), np.float32), lse]


def _lce_vjp(b, node, cts, wants):
    x, head, targets, scale = node.inputs
    extra = [] if cts[0] is ONE else [cts[0]]
    dx, dhead = b.linear_cross_entropy_grad(x, head, targets, scale, node.outputs[1], *extra, **node.attrs)
    if wants[1] and head.dtype != "float32":
        dhead = b.cast(dhead, dtype=head.dtype)
    return [dx if wants[0] else None, dhead if wants[1] else None, None, None]


op("linear_cross_entropy", infer=_lce_infer, ref=_lce_ref, vjp=_lce_vjp, arity=4, traits={CONTRACTION},
   defaults={"ignore_index": -100, "softcap": 0.0},
   doc="scale * summed softmax cross-entropy of x @ head^T against targets, chunked over rows.")


def _grad_infer(ts, a):
    x, head = _check(ts, "linear_cross_entropy_grad")
    check(ts[4] == TensorType((x.shape[0],), "float32"),
          f"linear_cross_entropy_grad: lse must be float32[{x.shape[0]}], got {ts[4]}")
    if len(ts) == 6:
        check(ts[5] == SCALAR, f"linear_cross_entropy_grad: dloss must be float32[], got {ts[5]}")
    return [x, TensorType(head.shape, "float32")]


def _grad_ref(xs, a):
    x, head, targets, scale, lse = xs[:5]
    g = np.float32(scale) * (np.float32(xs[5]) if len(xs) == 6 else np.float32(1.0))
    w = f32(head)
    dx = np.zeros(x.shape, np.float32)
    dhead = np.zeros(head.shape, np.float32)
    for rows, z, valid, t, th in _chunks(x, head, targets, a["ignore_index"], a["softcap"]):
        p = np.exp(z - lse[rows][:, None])
        p[np.arange(len(t)), t] -= 1.0
        dz = (p * np.where(valid, g, np.float32(0.0))[:, None]).astype(np.float32)
        if th is not None:
            dz = dz * (np.float32(1.0) - th * th)
        dx[rows] = dz @ w
        dhead += dz.T @ f32(x[rows])
    return [dx, dhead]


op("linear_cross_entropy_grad", infer=_grad_infer, ref=_grad_ref, arity=(5, 6), traits={CONTRACTION},
   defaults={"ignore_index": -100, "softcap": 0.0},
   doc="Gradients of linear_cross_entropy for x and head (logits recomputed per chunk).")
