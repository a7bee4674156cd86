"""Hypothesis cases of the backward, loss and dropout ops (reft/ir/ops/grad.py, loss.py, dropout.py),
merged into strategies.OP_CASES / SYMBOLIC_AXES by tests/strategies.py (import them from there).

  GRAD_OP_CASES          op -> strategy of (op_name, [numpy inputs], attrs), float32 activations
  GRAD_SYMBOLIC_AXES     op -> which input axes carry the token dim (T) or the row dim (R)
  AWAITING_CPU_KERNELS   ops registered before their cpu kernels exist: the cpu op tests skip them
                         and the op-coverage test tolerates them; delete an op from this set when
                         its kernel lands (its cases then run on the cpu backend automatically)
"""
from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

import strategies as S   # the shared helpers (read when a case is drawn; strategies imports this file)

dims = st.integers(1, 6)
F32 = "float32"


def _rng(draw):
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1)))


def _f(rng, shape, lo=-2.0, hi=2.0):
    return rng.uniform(lo, hi, size=shape).astype(np.float32)


def _weight_dtype(draw):
    return draw(st.sampled_from(["float32", "float16", "bfloat16"]))


@st.composite
def _zeros_like(draw):
    return "zeros_like", [S.rand(_rng(draw), draw(S.shapes(1, 3)), draw(S.float_dtypes))], {}


@st.composite
def _sum_rows(draw):
    return "sum_rows", [_f(_rng(draw), draw(S.shapes(1, 3)))], {}


@st.composite
def _scatter_rows(draw):
    rng = _rng(draw)
    s, R = draw(S.shapes(1, 3)), draw(dims)
    rows = S.rand(rng, (R,), draw(S.int_dtypes), 0, s[0])          # repeated rows add up
    return "scatter_rows", [_f(rng, s), rows, _f(rng, (R,) + s[1:])], {}


@st.composite
def _linear_grad_input(draw):
    rng = _rng(draw)
    lead, N, K = draw(S.shapes(0, 2)), draw(dims), draw(dims)
    return "linear_grad_input", [_f(rng, lead + (N,)), S.rand(rng, (N, K), _weight_dtype(draw))], {}


@st.composite
def _linear_grad_weight(draw):
    rng = _rng(draw)
    M, N, K = draw(dims), draw(dims), draw(dims)
    return "linear_grad_weight", [_f(rng, (M, N)), _f(rng, (M, K))], {}


@st.composite
def _rms_norm_grad(draw):
    rng = _rng(draw)
    s = draw(S.shapes(1, 3))
    eps = draw(st.sampled_from([1e-6, 1e-5, 0.1]))
    return "rms_norm_grad", [_f(rng, s), _f(rng, s), S.rand(rng, (s[-1],), _weight_dtype(draw))], \
        {"eps": eps, **S.norm_offset(draw)}


@st.composite
def _rope_grad(draw):
    rng = _rng(draw)
    T, H, D = draw(dims), draw(st.integers(1, 4)), draw(st.integers(2, 8))
    pos = S.rand(rng, (T,), draw(S.int_dtypes), 0, draw(st.sampled_from([8, 5000])))
    a = S.rope_attrs(draw, D)
    return "rope_grad", [_f(rng, (T, H, D)), *S.rope_inputs(draw, rng, pos, a)], a


@st.composite
def _pair(draw, op):
    rng = _rng(draw)
    s = draw(S.shapes(1, 3))
    y = _f(rng, s, -4, 4)
    if op == "softmax_grad":                                          # y is a softmax output
        e = np.exp(y - y.max(-1, keepdims=True))
        y = (e / e.sum(-1, keepdims=True)).astype(np.float32)
    attrs = {"cap": draw(st.sampled_from([1.0, 3.0, 30.0]))} if op == "softcap_grad" else {}
    return op, [_f(rng, s), y], attrs


@st.composite
def _glu_grad(draw):
    rng = _rng(draw)
    lead, F = draw(S.shapes(1, 2)), draw(st.integers(1, 24))
    act = draw(st.sampled_from(["silu", "gelu_tanh"]))
    return "glu_grad", [_f(rng, lead + (F,)), _f(rng, lead + (2 * F,), -4, 4)], {"act": act}


@st.composite
def _causal_attention_grad(draw):
    rng = _rng(draw)
    H, Hkv, D = draw(S.heads())
    _, sid, pos = draw(S.token_batch(max_past=0))
    T = len(sid)
    q, k, v = _f(rng, (T, H, D)), _f(rng, (T, Hkv, D)), _f(rng, (T, Hkv, D))
    a = {"scale": draw(st.sampled_from([1.0 / math.sqrt(D), 1.0, 0.3])), "sliding_window": draw(st.integers(0, 3))}
    if draw(st.booleans()):
        a["softcap"] = draw(st.sampled_from([0.5, 2.0]))
    (out,) = S.ops.get("causal_attention").ref([q, k, v, pos, sid], a)
    return "causal_attention_grad", [_f(rng, (T, H, D)), q, k, v, out, pos, sid], a


def _targets(draw, rng, T, V):
    t = S.rand(rng, (T,), draw(S.int_dtypes), 0, V)
    t[rng.random(T) < 0.3] = -100                                        # masked rows
    return t


@st.composite
def _linear_cross_entropy(draw, grad=False):
    rng = _rng(draw)
    T, D, V = draw(dims), draw(dims), draw(st.integers(1, 40))
    x, head = _f(rng, (T, D)), S.rand(rng, (V, D), _weight_dtype(draw))
    xs = [x, head, _targets(draw, rng, T, V), np.array(draw(st.sampled_from([1.0, 0.25])), np.float32)]
    a = {"softcap": draw(st.sampled_from([1.5, 30.0]))} if draw(st.booleans()) else {}
    if not grad:
        return "linear_cross_entropy", xs, a
    lse = S.ops.get("linear_cross_entropy").ref(xs, S.ops.get("linear_cross_entropy").full_attrs(a))[1]
    xs.append(lse)
    if draw(st.booleans()):
        xs.append(np.array(draw(st.sampled_from([1.0, -0.5, 3.0])), np.float32))
    return "linear_cross_entropy_grad", xs, a


@st.composite
def _dropout(draw):
    rng = _rng(draw)
    key = np.array(draw(st.integers(-2**63, 2**63 - 1)), np.int64)
    return "dropout", [_f(rng, draw(S.shapes(1, 3))), key], \
        {"p": draw(st.sampled_from([0.0, 0.1, 0.5, 0.9])), "stream": draw(st.integers(0, 2**32 - 1))}


GRAD_OP_CASES: dict[str, st.SearchStrategy] = {
    "zeros_like": _zeros_like(),
    "sum_rows": _sum_rows(),
    "scatter_rows": _scatter_rows(),
    "linear_grad_input": _linear_grad_input(),
    "linear_grad_weight": _linear_grad_weight(),
    "rms_norm_grad": _rms_norm_grad(),
    "rope_grad": _rope_grad(),
    "silu_grad": _pair("silu_grad"),
    "gelu_tanh_grad": _pair("gelu_tanh_grad"),
    "softcap_grad": _pair("softcap_grad"),
    "softmax_grad": _pair("softmax_grad"),
    "glu_grad": _glu_grad(),
    "causal_attention_grad": _causal_attention_grad(),
    "linear_cross_entropy": _linear_cross_entropy(),
    "linear_cross_entropy_grad": _linear_cross_entropy(grad=True),
    "dropout": _dropout(),
}

_T = {0: "T"}


def _lead_if_rank2(n_rest):
    return lambda xs, a: [_T if xs[0].ndim >= 2 else {}] + [{}] * n_rest


GRAD_SYMBOLIC_AXES = {
    "zeros_like": lambda xs, a: [_T],
    "sum_rows": lambda xs, a: [_T],
    "scatter_rows": lambda xs, a: [_T, {0: "R"}, {0: "R"}],
    "linear_grad_input": _lead_if_rank2(1),
    "linear_grad_weight": lambda xs, a: [_T, _T],
    "rms_norm_grad": lambda xs, a: [_T if xs[0].ndim >= 2 else {}] * 2 + [{}],
    "rope_grad": lambda xs, a: [_T] * len(xs),
    "silu_grad": lambda xs, a: [_T, _T],
    "gelu_tanh_grad": lambda xs, a: [_T, _T],
    "softcap_grad": lambda xs, a: [_T, _T],
    "softmax_grad": lambda xs, a: [_T, _T],
    "glu_grad": lambda xs, a: [_T, _T],
    "causal_attention_grad": lambda xs, a: [_T] * 7,
    "linear_cross_entropy": lambda xs, a: [_T, {}, _T, {}],
    "linear_cross_entropy_grad": lambda xs, a: [_T, {}, _T, {}, _T] + [{}] * (len(xs) - 5),
    "dropout": lambda xs, a: [_T, {}],
}

AWAITING_CPU_KERNELS: frozenset[str] = frozenset()
