"""Backward ops: what the gradient rules (the `vjp` of each forward op) emit.

Contracts are kept simple for kernels: activations and gradients are float32; a weight operand
(`w`, `head`) may be any float dtype and is read as float32 (linear_grad_input's `w` may also be
block-quantized: a LoRA base kept in its GGUF blocks, read dequantized). `dy` is always the
gradient of the forward op's output. Shapes use T for rows (tokens), R for selected rows.

  zeros_like(x) -> like x                         zeros of x's type (x is read for its type only)
  sum_rows(x[M, ...]) -> [...]                    sum over the first axis (bias gradients,
                                                  broadcast reductions)
  scatter_rows(base[N, ...], rows[R], src[R, ...]) -> [N, ...]
                                                  base with src[r] added to row rows[r] (repeated
                                                  rows add up): take_rows and embedding gradients
  linear_grad_input(dy[..., N], w[N, K]) -> [..., K]      dy @ w
  linear_grad_weight(dy[M, N], x[M, K]) -> [N, K]         dy^T @ x
  rms_norm_grad(dy[..., D], x[..., D], w[D]) -> (dx[..., D], dw[D])     {eps, offset}
        r = 1/sqrt(mean(x^2) + eps), g = dy * (offset + w):  dx = r g - x r^3 mean(g x),
        dw = sum_rows(dy x r)
  rope_grad(dy[T, H, D], positions[T][, extent[T]]) -> [T, H, D]       {the attributes of rope}
        the inverse rotation: rope with every angle negated (longrope: the same factors and
        cos/sin scaling as the forward)
  softcap_grad(dy, x) -> dy * (1 - tanh(x / cap)^2)        {cap}
  silu_grad(dy, x) -> dy * s (1 + x (1 - s)),  s = sigmoid(x)
  gelu_tanh_grad(dy, x) -> dy * d/dx gelu_tanh(x)
  softmax_grad(dy, y) -> y (dy - sum(dy y))       y = the softmax output, last axis
  glu_grad(dh[..., F], y[..., 2F]) -> [..., 2F]   {act}: y = (gate, up) before the activation;
                                                  returns (dh up act'(gate), dh act(gate))
  causal_attention_grad(dout, q, k, v, out, positions, seq_ids) -> (dq, dk, dv)
                                                  {scale, sliding_window, softcap}: q/out/dout
        [T, H, D], k/v [T, Hkv, D]; probabilities are recomputed from q and k (flash-style), with
        D = rowsum(dout out): dS = P (dout v^T - D) (times 1 - tanh^2 of the capped score with
        softcap), dq = scale dS k, dk = scale dS^T q, dv = P^T dout; dk and dv sum the query heads
        of each KV group
"""
from __future__ import annotations

import math

import numpy as np

from ..types import TensorType
from .attention import ATTENTION_DEFAULTS, INT, _attend_probs, _causal_infer, attend_scores
from .fused import ACTS
from .nn import ROPE_DEFAULTS, _rope_infer, norm_scale, rope_rotate
from .registry import CONTRACTION, ELEMENTWISE, REDUCTION, check, f32, is_float, is_weight, op

F32 = "float32"


def _f32_act(t: TensorType, what: str, name: str):
    check(t.dtype == F32, f"{name}: {what} must be float32, got {t}")


# -- zeros_like, sum_rows, scatter_rows --------------------------------------------------
op("zeros_like", infer=lambda ts, a: [ts[0]], ref=lambda xs, a: [np.zeros(xs[0].shape, xs[0].dtype)], arity=1,
   doc="Zeros of x's shape and dtype (x is read for its type only).")


def _sum_rows_infer(ts, a):
    x = ts[0]
    check(x.rank >= 1 and is_float(x), f"sum_rows: float x of rank >= 1 required, got {x}")
    return [TensorType(x.shape[1:], x.dtype)]


op("sum_rows", infer=_sum_rows_infer, ref=lambda xs, a: [f32(xs[0]).sum(axis=0).astype(xs[0].dtype)],
   arity=1, traits={REDUCTION}, doc="Sum over the first axis.")


def _scatter_infer(ts, a):
    base, rows, src = ts
    check(rows.rank == 1 and rows.dtype in INT, f"scatter_rows: rows must be int[R], got {rows}")
    check(base.rank >= 1 and is_float(base) and src.dtype == base.dtype
          and src.shape == (rows.shape[0],) + base.shape[1:],
          f"scatter_rows: src {src} must be [{rows.shape[0]}, ...] rows of base {base}")
    return [base]


def _scatter_ref(xs, a):
    base, rows, src = xs
    if rows.size and (rows.min() < 0 or rows.max() >= base.shape[0]):
        raise IndexError(f"scatter_rows: row index out of range [0, {base.shape[0]})")
    out = f32(base).copy()
    np.add.at(out, rows, f32(src))
    return [out.astype(base.dtype)]


op("scatter_rows", infer=_scatter_infer, ref=_scatter_ref, arity=3,
   doc="base with src[r] added into row rows[r]; repeated rows add up.")


# -- linear gradients --------------------------------------------------------------------
def _lgi_infer(ts, a):
    dy, w = ts
    _f32_act(dy, "dy", "linear_grad_input")
    check(w.rank == 2 and is_weight(w) and dy.rank >= 1 and dy.shape[-1] == w.shape[0],
          f"linear_grad_input: dy {dy} and weight {w} disagree on N")
    return [TensorType(dy.shape[:-1] + (w.shape[1],), F32)]


op("linear_grad_input", infer=_lgi_infer, ref=lambda xs, a: [f32(xs[0]) @ f32(xs[1])], arity=2,
   traits={CONTRACTION}, quantized_input=1,
   doc="dy @ w: the input gradient of linear (w is [out, in]; a quantized w is read dequantized).")


def _lgw_infer(ts, a):
    dy, x = ts
    _f32_act(dy, "dy", "linear_grad_weight")
    _f32_act(x, "x", "linear_grad_weight")
    check(dy.rank == 2 and x.rank == 2 and dy.shape[0] == x.shape[0],
          f"linear_grad_weight: dy {dy} and x {x} must be [M, N] and [M, K]")
    return [TensorType((dy.shape[1], x.shape[1]), F32)]


op("linear_grad_weight", infer=_lgw_infer, ref=lambda xs, a: [xs[0].T @ xs[1]], arity=2,
   traits={CONTRACTION}, doc="dy^T @ x: the weight gradient of linear, [out, in].")


# -- rms_norm_grad -----------------------------------------------------------------------
def _rms_grad_infer(ts, a):
    dy, x, w = ts
    _f32_act(dy, "dy", "rms_norm_grad")
    check(x == dy and w.rank == 1 and is_float(w) and w.shape == (x.shape[-1],),
          f"rms_norm_grad: dy {dy}, x {x}, weight {w} do not match")
    return [x, TensorType(w.shape, F32)]


def _rms_grad_ref(xs, a):
    dy, x, w = f32(xs[0]), f32(xs[1]), norm_scale(xs[2], a.get("offset", 0.0))
    r = (1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(a["eps"]))).astype(np.float32)
    g = dy * w
    dx = r * g - x * (r ** 3) * np.mean(g * x, axis=-1, keepdims=True)
    dw = (dy * x * r).reshape(-1, x.shape[-1]).sum(axis=0)
    return [dx.astype(np.float32), dw.astype(np.float32)]


op("rms_norm_grad", infer=_rms_grad_infer, ref=_rms_grad_ref, arity=3, traits={REDUCTION}, attrs=("eps",),
   defaults={"offset": 0.0}, doc="Gradients of rms_norm(x, w) for x and w, recomputing 1/rms from x.")


# -- rope_grad ---------------------------------------------------------------------------
def _rope_grad_infer(ts, a):
    _f32_act(ts[0], "dy", "rope_grad")
    return _rope_infer(ts, a)


op("rope_grad", infer=_rope_grad_infer, arity=(2, 3), attrs=("theta", "rotary_dim"), defaults=ROPE_DEFAULTS,
   ref=lambda xs, a: [rope_rotate(xs[0], xs[1], a, -1.0, extent=xs[2] if len(xs) == 3 else None)],
   doc="Gradient of rope: the inverse rotation (every angle negated).")


# -- elementwise activation gradients ----------------------------------------------------
def _pair_infer(name):
    def infer(ts, a):
        dy, x = ts
        _f32_act(dy, "dy", name)
        check(x == dy, f"{name}: dy {dy} and x {x} must match")
        return [dy]
    return infer


def _silu_grad(dy, x):
    s = 1.0 / (1.0 + np.exp(-x))
    return dy * s * (1.0 + x * (1.0 - s))


C = math.sqrt(2.0 / math.pi)


def _gelu_tanh_grad(dy, x):
    t = np.tanh(C * (x + 0.044715 * x ** 3))
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * C * (1.0 + 3 * 0.044715 * x * x))


def _pair_ref(fn):
    return lambda xs, a: [fn(f32(xs[0]), f32(xs[1])).astype(np.float32)]


op("silu_grad", infer=_pair_infer("silu_grad"), ref=_pair_ref(_silu_grad), arity=2, traits={ELEMENTWISE},
   doc="dy * d/dx silu(x)")
op("gelu_tanh_grad", infer=_pair_infer("gelu_tanh_grad"), ref=_pair_ref(_gelu_tanh_grad), arity=2,
   traits={ELEMENTWISE}, doc="dy * d/dx gelu_tanh(x)")


def _softcap_grad_ref(xs, a):
    t = np.tanh(f32(xs[1]) / np.float32(a["cap"]))
    return [(f32(xs[0]) * (np.float32(1.0) - t * t)).astype(np.float32)]


op("softcap_grad", infer=_pair_infer("softcap_grad"), ref=_softcap_grad_ref, arity=2, traits={ELEMENTWISE},
   attrs=("cap",), doc="dy * d/dx cap tanh(x / cap) = dy (1 - tanh(x / cap)^2)")


op("softmax_grad", infer=_pair_infer("softmax_grad"), arity=2, traits={REDUCTION},
   ref=lambda xs, a: [(xs[1] * (xs[0] - np.sum(xs[0] * xs[1], axis=-1, keepdims=True))).astype(np.float32)],
   doc="Gradient of softmax over the last axis, from its output y: y (dy - sum(dy y)).")

ACT_GRADS = {"silu": _silu_grad, "gelu_tanh": _gelu_tanh_grad}


def _glu_grad_infer(ts, a):
    dh, y = ts
    _f32_act(dh, "dh", "glu_grad")
    _f32_act(y, "y", "glu_grad")
    check(a["act"] in ACTS, f"glu_grad: act must be one of {sorted(ACTS)}, got {a['act']!r}")
    n = y.shape[-1] if y.rank else None
    check(y.rank == dh.rank and isinstance(n, int) and n == 2 * dh.shape[-1] and y.shape[:-1] == dh.shape[:-1],
          f"glu_grad: y {y} must be dh {dh} with a last dim twice as large")
    return [y]


def _glu_grad_ref(xs, a):
    dh, y = xs
    f = dh.shape[-1]
    g, u = y[..., :f], y[..., f:]
    dg = ACT_GRADS[a["act"]](dh * u, g)
    return [np.concatenate([dg, dh * ACTS[a["act"]](g)], axis=-1).astype(np.float32)]


op("glu_grad", infer=_glu_grad_infer, ref=_glu_grad_ref, arity=2, attrs=("act",),
   doc="Gradient of act(gate) * up w.r.t. y = (gate, up), the projection before the activation.")


# -- causal_attention_grad ---------------------------------------------------------------
def _attn_grad_infer(ts, a):
    dout, q, k, v, out, pos, sid = ts
    _causal_infer([q, k, v, pos, sid], a)
    for what, t in (("dout", dout), ("q", q), ("k", k), ("v", v), ("out", out)):
        _f32_act(t, what, "causal_attention_grad")
    check(dout == q and out == q, f"causal_attention_grad: dout {dout} / out {out} must match q {q}")
    return [q, k, v]


def _attn_grad_ref(xs, a):
    dout, q, k, v, out, pos, sid = xs
    dq, dk, dv = np.zeros(q.shape, np.float32), np.zeros(k.shape, np.float32), np.zeros(v.shape, np.float32)
    H, Hkv, D = q.shape[1], k.shape[1], q.shape[2]
    rep, scale, cap = H // Hkv, np.float32(a["scale"]), a.get("softcap", 0.0)
    for s in np.unique(sid):
        rows = np.nonzero(sid == s)[0]
        L = len(rows)
        kr, vr = np.repeat(k[rows], rep, axis=1), np.repeat(v[rows], rep, axis=1)    # (L, H, D)
        p = _attend_probs(q[rows], kr, pos[rows], pos[rows], a["scale"], a["sliding_window"], cap)   # (H, L, L)
        do = dout[rows]                                                             # (L, H, D)
        delta = np.sum(do * out[rows], axis=-1).T                                   # (H, L)
        dp = np.einsum("thd,lhd->htl", do, vr)                                      # (H, L, L)
        ds = p * (dp - delta[:, :, None])                                           # (H, L, L)
        if cap:
            t = attend_scores(q[rows], kr, a["scale"], cap)[1]
            ds = ds * (np.float32(1.0) - t * t)
        dq[rows] = np.einsum("htl,lhd->thd", ds, kr) * scale
        dk[rows] = (np.einsum("htl,thd->lhd", ds, q[rows]) * scale).reshape(L, Hkv, rep, D).sum(2)
        dv[rows] = np.einsum("htl,thd->lhd", p, do).reshape(L, Hkv, rep, D).sum(2)
    return [dq, dk, dv]


op("causal_attention_grad", infer=_attn_grad_infer, ref=_attn_grad_ref, arity=7, attrs=("scale",),
   defaults=ATTENTION_DEFAULTS,
   doc="Gradients of causal_attention for q, k, v (probabilities recomputed from q and k).")
