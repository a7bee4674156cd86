"""Before/Expected programs for the mixture-of-experts rewrites: fuse_projections joins the experts'
gate and up stacks expert by expert (the parts stay for eliminate_dead_code), fuse_glu folds the
SiLU product into `expert_glu`, and quantize_weights quantizes the expert stacks but keeps the
router float. Each rewrite keeps the reference executor's outputs."""
from __future__ import annotations

import numpy as np
from test_golden import check

from reft.ir import parse_graph
from reft.ir.interpret import ReferenceExecutor
from reft.passes.context import PassContext, WeightStore
from reft.passes.fuse_glu import fuse_glu
from reft.passes.fuse_projections import fuse_projections
from reft.passes.quantize_weights import quantize_weights

# a sparse MLP as models/mixtral.py writes it: router, dispatch, gate / up / down stacks
BEFORE = """
graph forward {
  %0 = input() : float32[T,32] {name='x'}
  %1 = param() : float32[4,32] {name='l.gate.weight'}
  %2 = param() : float32[4,8,32] {name='l.experts.*.w1.weight'}
  %3 = param() : float32[4,8,32] {name='l.experts.*.w3.weight'}
  %4 = param() : float32[4,32,8] {name='l.experts.*.w2.weight'}
  %5 = linear(%0, %1) : float32[T,4]
  %6, %7 = moe_router(%5) : int32[T,2], float32[T,2] {top_k=2}
  %8, %9 = moe_dispatch(%6) : int32[T,2], int32[5] {experts=4}
  %10 = expert_linear(%0, %8, %9, %2) : float32[T,2,8]
  %11 = expert_linear(%0, %8, %9, %3) : float32[T,2,8]
  %12 = silu(%10) : float32[T,2,8]
  %13 = mul(%12, %11) : float32[T,2,8]
  %14 = expert_linear_sum(%13, %8, %9, %7, %4) : float32[T,32]
  return y=%14
}"""

FUSED = """
graph forward {
  %0 = input() : float32[T,32] {name='x'}
  %1 = param() : float32[4,32] {name='l.gate.weight'}
  %2 = param() : float32[4,8,32] {name='l.experts.*.w1.weight'}
  %3 = param() : float32[4,8,32] {name='l.experts.*.w3.weight'}
  %4 = param() : float32[4,32,8] {name='l.experts.*.w2.weight'}
  %5 = linear(%0, %1) : float32[T,4]
  %6, %7 = moe_router(%5) : int32[T,2], float32[T,2] {top_k=2}
  %8, %9 = moe_dispatch(%6) : int32[T,2], int32[5] {experts=4}
  %10 = param() : float32[4,16,32] {name='l.experts.*.w1+w3.weight'}
  %11 = expert_linear(%0, %8, %9, %10) : float32[T,2,16]
  %12, %13 = split(%11) : float32[T,2,8], float32[T,2,8] {axis=-1, sizes=(8, 8)}
  %14 = silu(%12) : float32[T,2,8]
  %15 = mul(%14, %13) : float32[T,2,8]
  %16 = expert_linear_sum(%15, %8, %9, %7, %4) : float32[T,32]
  return y=%16
}"""


def weights(rng) -> dict:
    return {"l.gate.weight": rng.standard_normal((4, 32)).astype(np.float32),
            **{f"l.experts.*.{w}.weight": rng.standard_normal(s).astype(np.float32)
               for w, s in (("w1", (4, 8, 32)), ("w3", (4, 8, 32)), ("w2", (4, 32, 8)))}}


def run(text_or_graph, store, x):
    g = parse_graph(text_or_graph) if isinstance(text_or_graph, str) else text_or_graph
    return ReferenceExecutor(g, {n.name: store[n.name] for n in g.params()}).run({"x": x})["y"]


def test_fuse_projections_joins_gate_and_up_per_expert():
    rng = np.random.default_rng(0)
    store = WeightStore(weights(rng))
    ctx = check(fuse_projections, BEFORE, FUSED, PassContext(store))
    assert ctx.counters["fuse_projections"]["fused_experts_2"] == 1
    fused = store["l.experts.*.w1+w3.weight"]                                 # (E, 2F, K): gate rows, then up
    np.testing.assert_array_equal(fused[2, :8], store["l.experts.*.w1.weight"][2])
    np.testing.assert_array_equal(fused[2, 8:], store["l.experts.*.w3.weight"][2])
    x = rng.standard_normal((5, 32)).astype(np.float32)
    np.testing.assert_allclose(run(FUSED, store, x), run(BEFORE, store, x), rtol=1e-5, atol=1e-5)


def test_fuse_glu_makes_expert_glu():
    rng = np.random.default_rng(1)
    store = WeightStore(weights(rng))
    store.define("l.experts.*.w1+w3.weight", lambda: np.concatenate(
        [store["l.experts.*.w1.weight"], store["l.experts.*.w3.weight"]], axis=1))
    expected = """
graph forward {
  %0 = input() : float32[T,32] {name='x'}
  %1 = param() : float32[4,32] {name='l.gate.weight'}
  %2 = param() : float32[4,8,32] {name='l.experts.*.w1.weight'}
  %3 = param() : float32[4,8,32] {name='l.experts.*.w3.weight'}
  %4 = param() : float32[4,32,8] {name='l.experts.*.w2.weight'}
  %5 = linear(%0, %1) : float32[T,4]
  %6, %7 = moe_router(%5) : int32[T,2], float32[T,2] {top_k=2}
  %8, %9 = moe_dispatch(%6) : int32[T,2], int32[5] {experts=4}
  %10 = param() : float32[4,16,32] {name='l.experts.*.w1+w3.weight'}
  %11 = expert_glu(%0, %8, %9, %10) : float32[T,2,8] {act='silu'}
  %12 = expert_linear_sum(%11, %8, %9, %7, %4) : float32[T,32]
  return y=%12
}"""
    ctx = check(fuse_glu, FUSED, expected, PassContext(store))
    assert ctx.counters["fuse_glu"]["fused_silu"] == 1
    x = rng.standard_normal((7, 32)).astype(np.float32)
    np.testing.assert_allclose(run(expected, store, x), run(BEFORE, store, x), rtol=1e-5, atol=1e-5)


def test_quantize_weights_takes_the_experts_and_keeps_the_router():
    """With 32-wide experts: int8 rows are whole 32-value blocks."""
    rng = np.random.default_rng(2)
    store = WeightStore({"l.gate.weight": rng.standard_normal((4, 32)).astype(np.float32),
                         **{f"l.experts.*.{w}.weight": rng.standard_normal((4, 32, 32)).astype(np.float32)
                            for w in ("w1", "w3", "w2")}})
    before = parse_graph(BEFORE.replace("[4,8,32]", "[4,32,32]").replace("[4,32,8]", "[4,32,32]")
                         .replace("[T,2,8]", "[T,2,32]"))
    x = rng.standard_normal((6, 32)).astype(np.float32)
    want = run(before, store, x)
    ctx = PassContext(store, options={"quant": "int8"})
    ctx.current = "quantize_weights"
    g = quantize_weights(before, ctx)
    dtypes = {n.name: n.out.dtype for n in g.params()}
    assert dtypes == {"l.gate.weight": "float32", "l.experts.*.w1.weight": "int8", "l.experts.*.w3.weight": "int8",
                      "l.experts.*.w2.weight": "int8"}
    assert ctx.counters["quantize_weights"] == {"kept_router": 1, "to_int8": 3}
    assert store["l.experts.*.w2.weight"].shape == (4, 32, 32 + 4)             # uint8[E, N, scale + K codes]
    got = run(g, store, x)
    assert np.linalg.norm(got - want) < 0.02 * np.linalg.norm(want)
