"""Each pass on a Before program gives the Expected program (compared as printed IR), and
counts what it did."""
from __future__ import annotations

import numpy as np

from reft.ir import parse_graph, print_graph, verify
from reft.passes.context import PassContext, WeightStore
from reft.passes.eliminate_common_subexpressions import eliminate_common_subexpressions
from reft.passes.eliminate_dead_code import eliminate_dead_code
from reft.passes.fuse_projections import fuse_projections, fused_name
from reft.passes.lower_paged_attention import lower_paged_attention
from reft.passes.cast_weights import cast_weights


def check(pass_fn, before: str, expected: str, ctx: PassContext | None = None) -> PassContext:
    ctx = ctx or PassContext()
    ctx.current = pass_fn.__name__
    g = parse_graph(before)
    verify(g)
    g = pass_fn(g, ctx)
    verify(g)
    assert print_graph(g) == print_graph(parse_graph(expected))
    return ctx


def test_dce_removes_unused_nodes_and_weights_but_keeps_inputs():
    ctx = check(eliminate_dead_code, """
graph forward {
  %0 = input() : float32[T,4] {name='x'}
  %1 = input() : int32[T] {name='unused_input'}
  %2 = param() : float32[4,4] {name='w'}
  %3 = param() : float32[4,4] {name='unused'}
  %4 = linear(%0, %2) : float32[T,4]
  %5 = silu(%0) : float32[T,4]
  %6 = linear(%5, %3) : float32[T,4]
  return y=%4
}""", """
graph forward {
  %0 = input() : float32[T,4] {name='x'}
  %1 = input() : int32[T] {name='unused_input'}
  %2 = param() : float32[4,4] {name='w'}
  %3 = linear(%0, %2) : float32[T,4]
  return y=%3
}""")
    assert ctx.counters["eliminate_dead_code"]["removed"] == 3


def test_dce_keeps_side_effects():
    src = """
graph forward {
  %0 = input() : float32[NP,4,1,2] {name='kc'}
  %1 = input() : float32[NP,4,1,2] {name='vc'}
  %2 = input() : float32[T,1,2] {name='k'}
  %3 = input() : int32[T] {name='pos'}
  %4 = input() : int32[T] {name='sid'}
  %5 = input() : int32[S,MP] {name='table'}
  %6, %7 = kv_cache_write(%0, %1, %2, %2, %3, %4, %5) : float32[NP,4,1,2], float32[NP,4,1,2]
  return k=%2
}"""
    check(eliminate_dead_code, src, src)


def test_cse_merges_identical_nodes_and_same_named_params():
    ctx = check(eliminate_common_subexpressions, """
graph forward {
  %0 = input() : float32[T,4] {name='x'}
  %1 = param() : float32[4] {name='w'}
  %2 = rms_norm(%0, %1) : float32[T,4] {eps=1e-05}
  %3 = rms_norm(%0, %1) : float32[T,4] {eps=1e-05}
  %4 = rms_norm(%0, %1) : float32[T,4] {eps=1e-06}
  %5 = add(%2, %3) : float32[T,4]
  %6 = add(%5, %4) : float32[T,4]
  return y=%6
}""", """
graph forward {
  %0 = input() : float32[T,4] {name='x'}
  %1 = param() : float32[4] {name='w'}
  %2 = rms_norm(%0, %1) : float32[T,4] {eps=1e-05}
  %3 = rms_norm(%0, %1) : float32[T,4] {eps=1e-06}
  %4 = add(%2, %2) : float32[T,4]
  %5 = add(%4, %3) : float32[T,4]
  return y=%5
}""")
    assert ctx.counters["eliminate_common_subexpressions"]["merged"] == 1


def test_fuse_qkv_with_bias_concatenates_weights():
    rng = np.random.default_rng(0)
    w = {f"l.{n}_proj.{k}": rng.standard_normal(s).astype(np.float32)
         for n, rows in (("q", 4), ("k", 2), ("v", 2)) for k, s in (("weight", (rows, 3)), ("bias", (rows,)))}
    ctx = PassContext(WeightStore(w))
    check(fuse_projections, """
graph forward {
  %0 = input() : float32[T,3] {name='x'}
  %1 = param() : float32[4,3] {name='l.q_proj.weight'}
  %2 = param() : float32[4] {name='l.q_proj.bias'}
  %3 = param() : float32[2,3] {name='l.k_proj.weight'}
  %4 = param() : float32[2] {name='l.k_proj.bias'}
  %5 = param() : float32[2,3] {name='l.v_proj.weight'}
  %6 = param() : float32[2] {name='l.v_proj.bias'}
  %7 = linear(%0, %1, %2) : float32[T,4]
  %8 = linear(%0, %3, %4) : float32[T,2]
  %9 = linear(%0, %5, %6) : float32[T,2]
  %10 = add(%8, %9) : float32[T,2]
  return q=%7, kv=%10
}""", """
graph forward {
  %0 = input() : float32[T,3] {name='x'}
  %1 = param() : float32[4,3] {name='l.q_proj.weight'}
  %2 = param() : float32[4] {name='l.q_proj.bias'}
  %3 = param() : float32[2,3] {name='l.k_proj.weight'}
  %4 = param() : float32[2] {name='l.k_proj.bias'}
  %5 = param() : float32[2,3] {name='l.v_proj.weight'}
  %6 = param() : float32[2] {name='l.v_proj.bias'}
  %7 = param() : float32[8,3] {name='l.q_proj+k_proj+v_proj.weight'}
  %8 = param() : float32[8] {name='l.q_proj+k_proj+v_proj.bias'}
  %9 = linear(%0, %7, %8) : float32[T,8]
  %10, %11, %12 = split(%9) : float32[T,4], float32[T,2], float32[T,2] {axis=-1, sizes=(4, 2, 2)}
  %13 = add(%11, %12) : float32[T,2]
  return q=%10, kv=%13
}""", ctx)
    assert ctx.counters["fuse_projections"]["fused_3"] == 1
    fused = ctx.weights["l.q_proj+k_proj+v_proj.weight"]
    assert np.array_equal(fused, np.concatenate([w["l.q_proj.weight"], w["l.k_proj.weight"], w["l.v_proj.weight"]]))


def test_fuse_skips_mixed_bias_and_lone_linears():
    src = """
graph forward {
  %0 = input() : float32[T,3] {name='x'}
  %1 = param() : float32[4,3] {name='a.weight'}
  %2 = param() : float32[4] {name='a.bias'}
  %3 = param() : float32[2,3] {name='b.weight'}
  %4 = linear(%0, %1, %2) : float32[T,4]
  %5 = linear(%0, %3) : float32[T,2]
  return a=%4, b=%5
}"""
    ctx = check(fuse_projections, src, src)
    assert not ctx.counters.get("fuse_projections")


def test_fused_names():
    assert fused_name(["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"]) == \
        "model.layers.0.mlp.gate_proj+up_proj.weight"
    assert fused_name(["a", "b"]) == "a+b"


def test_cast_weights_converts_matrices_only():
    ctx = PassContext(WeightStore({"w": np.ones((2, 2), np.float32), "n": np.ones(2, np.float32)}),
                      options={"weight_dtype": "bfloat16"})
    check(cast_weights, """
graph forward {
  %0 = input() : float32[T,2] {name='x'}
  %1 = param() : float32[2,2] {name='w'}
  %2 = param() : float32[2] {name='n'}
  %3 = linear(%0, %1, %2) : float32[T,2]
  return y=%3
}""", """
graph forward {
  %0 = input() : float32[T,2] {name='x'}
  %1 = param() : bfloat16[2,2] {name='w'}
  %2 = param() : float32[2] {name='n'}
  %3 = linear(%0, %1, %2) : float32[T,2]
  return y=%3
}""", ctx)
    assert str(ctx.weights["w"].dtype) == "bfloat16" and ctx.weights["n"].dtype == np.float32


def test_lower_paged_attention():
    ctx = PassContext(options={"page_size": 4})
    check(lower_paged_attention, """
graph forward {
  %0 = input() : float32[T,4,2] {name='q'}
  %1 = input() : float32[T,2,2] {name='k'}
  %2 = input() : int32[T] {name='positions'}
  %3 = input() : int32[T] {name='seq_ids'}
  %4 = causal_attention(%0, %1, %1, %2, %3) : float32[T,4,2] {scale=0.5, sliding_window=0}
  return o=%4
}""", """
graph forward {
  %0 = input() : float32[T,4,2] {name='q'}
  %1 = input() : float32[T,2,2] {name='k'}
  %2 = input() : int32[T] {name='positions'}
  %3 = input() : int32[T] {name='seq_ids'}
  %4 = input() : int32[S,MP] {name='page_table'}
  %5 = input() : float32[NP,4,2,2] {name='kv_cache.0.k'}
  %6 = input() : float32[NP,4,2,2] {name='kv_cache.0.v'}
  %7, %8 = kv_cache_write(%5, %6, %1, %1, %2, %3, %4) : float32[NP,4,2,2], float32[NP,4,2,2]
  %9 = paged_attention(%0, %7, %8, %2, %3, %4) : float32[T,4,2] {scale=0.5, sliding_window=0}
  return o=%9
}""", ctx)
    assert ctx.counters["lower_paged_attention"]["paged_layers"] == 1
