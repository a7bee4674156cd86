"""Hypothesis strategies for the mixture-of-experts ops, merged into strategies.OP_CASES /
SYMBOLIC_AXES by tests/strategies.py (import them from there).

  MOE_OP_CASES       op -> strategy of (op_name, [numpy inputs], attrs); activations float32 (the
                     cpu kernels' activations), weights of every float dtype
  MOE_SYMBOLIC_AXES  op -> the symbolic token axes of each input
  routing(...)       ids[T, k] (distinct experts per token, as a router picks them, or any ids)
                     with the order and offsets moe_dispatch makes of them
"""
from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from reft.ir import ops

FLOATS = ("float32", "float16", "bfloat16")
_T = {0: "T"}


def _rand(rng, shape, dtype="float32"):
    from reft.ir.types import np_dtype

    return rng.uniform(-2, 2, size=shape).astype(np.float32).astype(np_dtype(dtype))


def routing(rng, T: int, k: int, E: int, distinct: bool = True):
    """(ids, order, offsets): each token's k experts (distinct, or any with repeats) and their dispatch."""
    if distinct:
        ids = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int32).reshape(T, k)
    else:
        ids = rng.integers(0, E, (T, k)).astype(np.int32)
    d = ops.get("moe_dispatch")
    order, offsets = d.ref([ids], {"experts": E})
    return ids, order, offsets


@st.composite
def _router(draw, tokens=st.integers(1, 6)):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    T, E = draw(tokens), draw(st.integers(1, 9))
    logits = _rand(rng, (T, E), draw(st.sampled_from(FLOATS))) * 2
    return "moe_router", [logits], {"top_k": draw(st.integers(1, min(E, 4))),
                                    "mode": draw(st.sampled_from(["softmax_topk", "topk_softmax"])),
                                    "normalize": draw(st.booleans())}


@st.composite
def _dispatch(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    T, E = draw(st.integers(1, 6)), draw(st.integers(1, 9))
    k = draw(st.integers(1, min(E, 3)))
    ids, _, _ = routing(rng, T, k, E, draw(st.booleans()))
    return "moe_dispatch", [ids], {"experts": E}


def _grouped(draw, tokens):
    """Common draws: rng, T, k, E, the routing and its dispatch."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    T, E = draw(tokens), draw(st.integers(1, 6))
    k = draw(st.integers(1, min(E, 3)))
    ids, order, offsets = routing(rng, T, k, E, draw(st.integers(0, 3)) > 0)
    return rng, T, k, E, order, offsets


def _bias(draw, rng, E: int, N: int) -> list:
    """No bias, or a float32 row per expert (GPT-OSS; plans keep expert biases float32)."""
    return [_rand(rng, (E, N))] if draw(st.booleans()) else []


@st.composite
def _expert_linear(draw, tokens=st.integers(1, 6)):
    rng, T, k, E, order, offsets = _grouped(draw, tokens)
    K, N = draw(st.integers(1, 40)), draw(st.integers(1, 20))
    return "expert_linear", [_rand(rng, (T, K)), order, offsets, _rand(rng, (E, N, K), draw(st.sampled_from(FLOATS))),
                             *_bias(draw, rng, E, N)], {}


def _glu_act(draw) -> dict:
    """A gated activation: SiLU / GELU(gate) * up, or GPT-OSS's clamped SwiGLU with a limit that clips."""
    act = draw(st.sampled_from(["silu", "gelu_tanh", "swiglu_oai"]))
    if act != "swiglu_oai":
        return {"act": act}
    return {"act": act, "alpha": draw(st.sampled_from([1.702, 0.5])), "limit": draw(st.sampled_from([7.0, 1.0, 0.25]))}


@st.composite
def _expert_glu(draw, tokens=st.integers(1, 6)):
    rng, T, k, E, order, offsets = _grouped(draw, tokens)
    K, F = draw(st.integers(1, 40)), draw(st.integers(1, 20))
    return "expert_glu", [_rand(rng, (T, K)), order, offsets, _rand(rng, (E, 2 * F, K), draw(st.sampled_from(FLOATS))),
                          *_bias(draw, rng, E, 2 * F)], _glu_act(draw)


@st.composite
def _expert_linear_sum(draw, tokens=st.integers(1, 6)):
    rng, T, k, E, order, offsets = _grouped(draw, tokens)
    K, N = draw(st.integers(1, 40)), draw(st.integers(1, 20))
    weights = rng.uniform(0, 1, (T, k)).astype(np.float32)
    return "expert_linear_sum", [_rand(rng, (T, k, K)), order, offsets, weights,
                                 _rand(rng, (E, N, K), draw(st.sampled_from(FLOATS))), *_bias(draw, rng, E, N)], {}


@st.composite
def _swiglu_oai(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape, dt = (draw(st.integers(1, 6)), draw(st.integers(1, 4)), draw(st.integers(1, 40))), draw(st.sampled_from(FLOATS))
    a = _glu_act(draw)
    attrs = {k: v for k, v in a.items() if k != "act"}
    return "swiglu_oai", [_rand(rng, shape, dt) * 2, _rand(rng, shape, dt) * 2], attrs


MOE_OP_CASES = {"moe_router": _router(), "moe_dispatch": _dispatch(), "expert_linear": _expert_linear(),
                "expert_glu": _expert_glu(), "expert_linear_sum": _expert_linear_sum(), "swiglu_oai": _swiglu_oai()}


def moe_matmul_cases(tokens: st.SearchStrategy[int]) -> dict[str, st.SearchStrategy]:
    """The grouped matmuls with `tokens` rows of x (the GEMV, tile and sgemm paths of each expert)."""
    return {"expert_linear": _expert_linear(tokens), "expert_glu": _expert_glu(tokens),
            "expert_linear_sum": _expert_linear_sum(tokens)}


MOE_SYMBOLIC_AXES = {
    "moe_router": lambda xs, a: [_T],
    "moe_dispatch": lambda xs, a: [_T],
    "expert_linear": lambda xs, a: [_T, _T, {}, {}, {}],
    "expert_glu": lambda xs, a: [_T, _T, {}, {}, {}],
    "expert_linear_sum": lambda xs, a: [_T, _T, {}, _T, {}, {}],
    "swiglu_oai": lambda xs, a: [_T, _T],
}
