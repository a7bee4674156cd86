"""Fused ops made by the fusion passes. Each is defined by composing the references of the
ops it replaces, so a fused graph runs on the reference executor and every fusion is
checked by the same "outputs unchanged" tests as any other pass.

  add_rms_norm   s = x + r; y = rms_norm(s, w)  {eps, offset}   -> (s, y)
  linear_glu     y = linear(x, W[2F, K], b?); act(y[:, :F]) * y[:, F:]
  qkv_rope       y = linear(x, W, b?); split into q/k/v heads; optional per-head RMSNorm of
                 q and k {eps, offset}; rotary on q and k (longrope: with each token's
                 seq_extent, an input after positions)           -> (q, k, v)
"""
from __future__ import annotations

from ..types import TensorType
from . import registry as R
from .autodiff import ct_or_zeros, linear_grads
from .autodiff import f32 as to_f32
from .core import _gelu_tanh, _silu
from .nn import ROPE_DEFAULTS, _linear_infer, _linear_ref, _rms_norm_ref, _rope_infer, _rope_ref, rms_norm_vjp
from .registry import CONTRACTION, REDUCTION, check, is_float, op


# -- add_rms_norm(x, r, w) -> (x + r, rms_norm(x + r, w))
def _add_rms_norm_infer(ts, a):
    x, r, w = ts
    check(x == r and is_float(x) and x.rank >= 1, f"add_rms_norm: x {x} and residual {r} must match")
    check(w.shape == (x.shape[-1],) and is_float(w), f"add_rms_norm: weight {w} does not match {x}")
    return [x, x]


def _add_rms_norm_ref(xs, a):
    s = R.get("add").ref(xs[:2], {})[0]
    return [s, _rms_norm_ref([s, xs[2]], a)[0]]


def _add_rms_norm_vjp(b, node, cts, wants):
    x, r, w = node.inputs
    s = node.outputs[0]
    ds, dw = (None, None)
    if cts[1] is not None:
        ds, dw = rms_norm_vjp(b, cts[1], s, w, node.attrs["eps"], (True, wants[2]), node.attrs.get("offset", 0.0))
    if cts[0] is not None:
        ds = cts[0] if ds is None else b.add(ds, cts[0])
    ds = ds if ds is not None else b.zeros_like(s)
    return [ds if wants[0] else None, ds if wants[1] else None, dw]


op("add_rms_norm", infer=_add_rms_norm_infer, ref=_add_rms_norm_ref, vjp=_add_rms_norm_vjp, arity=3,
   traits={REDUCTION}, attrs=("eps",), defaults={"offset": 0.0},
   doc="Residual add fused with the RMSNorm that follows it; returns (sum, normed).")


# -- linear_glu(x, W[2F, K], b?) -> act(gate) * up
ACTS = {"silu": _silu, "gelu_tanh": _gelu_tanh}


def _glu_infer(ts, a):
    y = _linear_infer(ts, a)[0]
    n = y.shape[-1]
    check(a["act"] in ACTS, f"linear_glu: act must be one of {sorted(ACTS)}, got {a['act']!r}")
    check(isinstance(n, int) and n % 2 == 0, f"linear_glu: weight rows {n} must be even (gate then up)")
    return [TensorType(y.shape[:-1] + (n // 2,), y.dtype)]


def _glu_ref(xs, a):
    y = _linear_ref(xs, a)[0]
    f = y.shape[-1] // 2
    g = ACTS[a["act"]](R.f32(y[..., :f])).astype(y.dtype)
    return [R.get("mul").ref([g, y[..., f:]], {})[0]]


def _glu_vjp(b, node, cts, wants):
    """Recomputes the projection (gate, up) before the activation: one more matmul."""
    x, w = node.inputs[:2]
    bias = node.inputs[2] if len(node.inputs) == 3 else None
    y = b.linear(to_f32(b, x), w, *([bias] if bias is not None else []))
    dy = b.glu_grad(to_f32(b, cts[0]), to_f32(b, y), act=node.attrs["act"])
    return linear_grads(b, dy, x, w, bias, wants)


op("linear_glu", quantized_input=1, infer=_glu_infer, ref=_glu_ref, vjp=_glu_vjp, arity=(2, 3),
   traits={CONTRACTION}, attrs=("act",),
   doc="Gate/up projection with the gated activation in its epilogue: act(x W_g^T) * (x W_u^T).")


# -- qkv_rope(x, W, [b], positions, [extent], [q_norm_w, k_norm_w]) -> q, k, v
def _unpack(xs, a):
    """(x, W, bias, rope inputs [positions(, extent)], norm weights) by the attributes."""
    i = 2
    bias = None
    if a["bias"]:
        bias, i = xs[2], 3
    n_rope = 1 + (a["scaling"] == "longrope")
    rope_in = list(xs[i:i + n_rope])
    norms = xs[i + n_rope:i + n_rope + 2] if a["qk_norm"] else None
    return xs[0], xs[1], bias, rope_in, norms


def _rope_attrs(a):
    return {k: a[k] for k in ("theta", "rotary_dim", *ROPE_DEFAULTS)}


def _qkv_infer(ts, a):
    x, w, b, rope_in, norms = _unpack(ts, a)
    H, Hkv, D = a["heads"], a["kv_heads"], a["head_dim"]
    n = 2 + bool(a["bias"]) + 1 + (a["scaling"] == "longrope") + 2 * bool(a["qk_norm"])
    check(len(ts) == n, f"qkv_rope: wrong number of inputs {len(ts)} (expected {n})")
    y = _linear_infer([x, w] + ([b] if b is not None else []), {})[0]
    check(x.rank == 2 and y.shape[-1] == (H + 2 * Hkv) * D, f"qkv_rope: weight {w} is not (H + 2 Hkv) * D rows")
    if norms:
        check(all(n.shape == (D,) and is_float(n) for n in norms), f"qkv_rope: q/k norm weights must be [{D}]")
    T = x.shape[0]
    q, k = TensorType((T, H, D), x.dtype), TensorType((T, Hkv, D), x.dtype)
    _rope_infer([q, *rope_in], _rope_attrs(a))
    return [q, k, k]


def _qkv_ref(xs, a):
    x, w, b, rope_in, norms = _unpack(xs, a)
    H, Hkv, D = a["heads"], a["kv_heads"], a["head_dim"]
    y = _linear_ref([x, w] + ([b] if b is not None else []), {})[0]
    T = x.shape[0]
    q = y[:, :H * D].reshape(T, H, D)
    k = y[:, H * D:(H + Hkv) * D].reshape(T, Hkv, D)
    v = y[:, (H + Hkv) * D:].reshape(T, Hkv, D).copy()
    if norms:
        q = _rms_norm_ref([q, norms[0]], a)[0]
        k = _rms_norm_ref([k, norms[1]], a)[0]
    ra = _rope_attrs(a)
    return [_rope_ref([q, *rope_in], ra)[0], _rope_ref([k, *rope_in], ra)[0], v]


def _qkv_vjp(b, node, cts, wants):
    """Inverse rotation of dq and dk, the q/k RMSNorm backward (recomputing the projection only
    then), and the projection's gradients from the concatenated [dq, dk, dv]."""
    a = R.get("qkv_rope").full_attrs(node.attrs)
    x, w, bias, rope_in, norms = _unpack(node.inputs, a)
    H, Hkv, D = a["heads"], a["kv_heads"], a["head_dim"]
    T = x.shape[0]
    dq, dk, dv = (to_f32(b, ct_or_zeros(b, cts, node, i)) for i in range(3))
    ra = _rope_attrs(a)
    dq, dk = b.rope_grad(dq, *rope_in, **ra), b.rope_grad(dk, *rope_in, **ra)
    i_norm = 2 + bool(a["bias"]) + len(rope_in)
    dnorms = [None, None]
    if norms:
        y = b.linear(to_f32(b, x), w, *([bias] if bias is not None else []))
        yq, yk, _ = b.split(y, axis=1, sizes=(H * D, Hkv * D, Hkv * D))
        q0, k0 = b.reshape(yq, shape=(T, H, D)), b.reshape(yk, shape=(T, Hkv, D))
        dq, dnorms[0] = rms_norm_vjp(b, dq, q0, norms[0], a["eps"], (True, wants[i_norm]), a["offset"])
        dk, dnorms[1] = rms_norm_vjp(b, dk, k0, norms[1], a["eps"], (True, wants[i_norm + 1]), a["offset"])
    dy = b.concat(b.reshape(dq, shape=(T, H * D)), b.reshape(dk, shape=(T, Hkv * D)),
                  b.reshape(dv, shape=(T, Hkv * D)), axis=1)                  # (T, (H + 2 Hkv) D)
    grads = linear_grads(b, dy, x, w, bias, wants[:3 if bias is not None else 2])
    return grads[:2] + ([grads[2]] if bias is not None else []) + [None] * len(rope_in) + (dnorms if norms else [])


op("qkv_rope", quantized_input=1, infer=_qkv_infer, ref=_qkv_ref, vjp=_qkv_vjp, arity=(3, 7), traits={CONTRACTION},
   attrs=("heads", "kv_heads", "head_dim", "theta", "rotary_dim"),
   defaults={"bias": False, "qk_norm": False, "eps": 1e-6, "offset": 0.0, **ROPE_DEFAULTS},
   doc="Fused q/k/v projection with (optional q/k RMSNorm and) rotary embedding in its epilogue.")
