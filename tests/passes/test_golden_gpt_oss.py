"""Before/Expected programs for GPT-OSS's sparse MLP (as models/gpt_oss.py writes it):
fold_weight_views turns the view ops on the checkpoint's x @ W expert tensors into reordered weights
(gate rows, then up rows: the interleaved columns pulled apart), fuse_glu folds the clamped SwiGLU
into `expert_glu` with the bias rows, fuse_projections joins llama.cpp's split gate / up stacks and
their bias rows expert by expert, and cast_weights keeps the bias rows float32. Each rewrite keeps
the reference executor's outputs."""
from __future__ import annotations

import numpy as np
from test_golden import check

from reft.ir import parse_graph
from reft.ir.interpret import ReferenceExecutor
from reft.passes.cast_weights import cast_weights
from reft.passes.context import PassContext, WeightStore
from reft.passes.fold_weight_views import fold_weight_views
from reft.passes.fuse_glu import fuse_glu
from reft.passes.fuse_projections import fuse_projections

HEAD = """
graph forward {
  %0 = input() : float32[T,32] {name='x'}
  %1 = param() : float32[4,32] {name='l.router.weight'}
  %2 = param() : float32[4] {name='l.router.bias'}
  %3 = linear(%0, %1, %2) : float32[T,4]
  %4, %5 = moe_router(%3) : int32[T,2], float32[T,2] {mode='topk_softmax', top_k=2}
  %6, %7 = moe_dispatch(%4) : int32[T,2], int32[5] {experts=4}"""

# the checkpoint's layout: gate_up [E, D, 2F] with gate / up interleaved by column, down [E, F, D]
BEFORE = HEAD + """
  %8 = param() : float32[4,32,16] {name='l.experts.gate_up_proj'}
  %9 = reshape(%8) : float32[4,32,8,2] {shape=(4, 32, 8, 2)}
  %10 = transpose(%9) : float32[4,2,8,32] {perm=(0, 3, 2, 1)}
  %11 = reshape(%10) : float32[4,16,32] {shape=(4, 16, 32)}
  %12 = param() : float32[4,16] {name='l.experts.gate_up_proj_bias'}
  %13 = reshape(%12) : float32[4,8,2] {shape=(4, 8, 2)}
  %14 = transpose(%13) : float32[4,2,8] {perm=(0, 2, 1)}
  %15 = reshape(%14) : float32[4,16] {shape=(4, 16)}
  %16 = param() : float32[4,8,32] {name='l.experts.down_proj'}
  %17 = transpose(%16) : float32[4,32,8] {perm=(0, 2, 1)}
  %18 = param() : float32[4,32] {name='l.experts.down_proj_bias'}
  %19 = expert_linear(%0, %6, %7, %11, %15) : float32[T,2,16]
  %20, %21 = split(%19) : float32[T,2,8], float32[T,2,8] {axis=-1, sizes=(8, 8)}
  %22 = swiglu_oai(%20, %21) : float32[T,2,8] {alpha=1.702, limit=7.0}
  %23 = expert_linear_sum(%22, %6, %7, %5, %17, %18) : float32[T,32]
  return y=%23
}"""

GU = "l.experts.gate_up_proj|reshape(4,32,8,2)|transpose(0,3,2,1)|reshape(4,16,32)"
GUB = "l.experts.gate_up_proj_bias|reshape(4,8,2)|transpose(0,2,1)|reshape(4,16)"
FOLDED = HEAD + f"""
  %8 = param() : float32[4,32,16] {{name='l.experts.gate_up_proj'}}
  %9 = param() : float32[4,32,8,2] {{name='l.experts.gate_up_proj|reshape(4,32,8,2)'}}
  %10 = param() : float32[4,2,8,32] {{name='l.experts.gate_up_proj|reshape(4,32,8,2)|transpose(0,3,2,1)'}}
  %11 = param() : float32[4,16,32] {{name='{GU}'}}
  %12 = param() : float32[4,16] {{name='l.experts.gate_up_proj_bias'}}
  %13 = param() : float32[4,8,2] {{name='l.experts.gate_up_proj_bias|reshape(4,8,2)'}}
  %14 = param() : float32[4,2,8] {{name='l.experts.gate_up_proj_bias|reshape(4,8,2)|transpose(0,2,1)'}}
  %15 = param() : float32[4,16] {{name='{GUB}'}}
  %16 = param() : float32[4,8,32] {{name='l.experts.down_proj'}}
  %17 = param() : float32[4,32,8] {{name='l.experts.down_proj|transpose(0,2,1)'}}
  %18 = param() : float32[4,32] {{name='l.experts.down_proj_bias'}}
  %19 = expert_linear(%0, %6, %7, %11, %15) : float32[T,2,16]
  %20, %21 = split(%19) : float32[T,2,8], float32[T,2,8] {{axis=-1, sizes=(8, 8)}}
  %22 = swiglu_oai(%20, %21) : float32[T,2,8] {{alpha=1.702, limit=7.0}}
  %23 = expert_linear_sum(%22, %6, %7, %5, %17, %18) : float32[T,32]
  return y=%23
}}"""


def weights(rng) -> dict:
    shapes = {"l.router.weight": (4, 32), "l.router.bias": (4,), "l.experts.gate_up_proj": (4, 32, 16),
              "l.experts.gate_up_proj_bias": (4, 16), "l.experts.down_proj": (4, 8, 32),
              "l.experts.down_proj_bias": (4, 32)}
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def run(text_or_graph, store, x):
    g = parse_graph(text_or_graph) if isinstance(text_or_graph, str) else text_or_graph
    return ReferenceExecutor(g, {n.name: store[n.name] for n in g.params()}).run({"x": x})["y"]


def test_fold_weight_views_reorders_the_expert_tensors():
    rng = np.random.default_rng(0)
    store = WeightStore(weights(rng))
    ctx = check(fold_weight_views, BEFORE, FOLDED, PassContext(store))
    assert ctx.counters["fold_weight_views"] == {"folded_reshape": 4, "folded_transpose": 3}
    gate_up, bias = store["l.experts.gate_up_proj"], store["l.experts.gate_up_proj_bias"]
    np.testing.assert_array_equal(store[GU][2, :8], gate_up[2, :, 0::2].T)     # gate f = column 2f
    np.testing.assert_array_equal(store[GU][2, 8:], gate_up[2, :, 1::2].T)     # up f = column 2f + 1
    np.testing.assert_array_equal(store[GUB][1], np.concatenate([bias[1, 0::2], bias[1, 1::2]]))
    np.testing.assert_array_equal(store["l.experts.down_proj|transpose(0,2,1)"][3], store["l.experts.down_proj"][3].T)
    x = rng.standard_normal((5, 32)).astype(np.float32)
    np.testing.assert_allclose(run(FOLDED, store, x), run(BEFORE, store, x), rtol=1e-5, atol=1e-5)


def test_fuse_glu_folds_the_clamped_swiglu_with_the_bias_rows():
    rng = np.random.default_rng(1)
    store = WeightStore(weights(rng))
    before = HEAD + f"""
  %8 = param() : float32[4,16,32] {{name='{GU}'}}
  %9 = param() : float32[4,16] {{name='{GUB}'}}
  %10 = param() : float32[4,32,8] {{name='l.experts.down_proj|transpose(0,2,1)'}}
  %11 = param() : float32[4,32] {{name='l.experts.down_proj_bias'}}
  %12 = expert_linear(%0, %6, %7, %8, %9) : float32[T,2,16]
  %13, %14 = split(%12) : float32[T,2,8], float32[T,2,8] {{axis=-1, sizes=(8, 8)}}
  %15 = swiglu_oai(%13, %14) : float32[T,2,8] {{alpha=1.5, limit=0.5}}
  %16 = expert_linear_sum(%15, %6, %7, %5, %10, %11) : float32[T,32]
  return y=%16
}}"""
    expected = HEAD + f"""
  %8 = param() : float32[4,16,32] {{name='{GU}'}}
  %9 = param() : float32[4,16] {{name='{GUB}'}}
  %10 = param() : float32[4,32,8] {{name='l.experts.down_proj|transpose(0,2,1)'}}
  %11 = param() : float32[4,32] {{name='l.experts.down_proj_bias'}}
  %12 = expert_glu(%0, %6, %7, %8, %9) : float32[T,2,8] {{act='swiglu_oai', alpha=1.5, limit=0.5}}
  %13 = expert_linear_sum(%12, %6, %7, %5, %10, %11) : float32[T,32]
  return y=%13
}}"""
    fold = PassContext(store)
    fold_weight_views(parse_graph(BEFORE), fold)                  # defines the reordered weights
    ctx = check(fuse_glu, before, expected, PassContext(store))
    assert ctx.counters["fuse_glu"]["fused_swiglu_oai"] == 1
    x = rng.standard_normal((7, 32)).astype(np.float32)
    np.testing.assert_allclose(run(expected, store, x), run(before, store, x), rtol=1e-5, atol=1e-5)


SPLIT = HEAD + """
  %8 = param() : float32[4,8,32] {name='l.experts.gate_proj.weight'}
  %9 = param() : float32[4,8] {name='l.experts.gate_proj.bias'}
  %10 = expert_linear(%0, %6, %7, %8, %9) : float32[T,2,8]
  %11 = param() : float32[4,8,32] {name='l.experts.up_proj.weight'}
  %12 = param() : float32[4,8] {name='l.experts.up_proj.bias'}
  %13 = expert_linear(%0, %6, %7, %11, %12) : float32[T,2,8]
  %14 = param() : float32[4,32,8] {name='l.experts.down_proj.weight'}
  %15 = param() : float32[4,32] {name='l.experts.down_proj.bias'}
  %16 = swiglu_oai(%10, %13) : float32[T,2,8] {alpha=1.702, limit=7.0}
  %17 = expert_linear_sum(%16, %6, %7, %5, %14, %15) : float32[T,32]
  return y=%17
}"""


def split_weights(rng) -> dict:
    shapes = {"l.router.weight": (4, 32), "l.router.bias": (4,), "l.experts.gate_proj.weight": (4, 8, 32),
              "l.experts.gate_proj.bias": (4, 8), "l.experts.up_proj.weight": (4, 8, 32),
              "l.experts.up_proj.bias": (4, 8), "l.experts.down_proj.weight": (4, 32, 8),
              "l.experts.down_proj.bias": (4, 32)}
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def test_fuse_projections_joins_split_stacks_and_their_bias_rows():
    rng = np.random.default_rng(2)
    store = WeightStore(split_weights(rng))
    expected = HEAD + """
  %8 = param() : float32[4,8,32] {name='l.experts.gate_proj.weight'}
  %9 = param() : float32[4,8] {name='l.experts.gate_proj.bias'}
  %10 = param() : float32[4,16,32] {name='l.experts.gate_proj+up_proj.weight'}
  %11 = param() : float32[4,16] {name='l.experts.gate_proj+up_proj.bias'}
  %12 = expert_linear(%0, %6, %7, %10, %11) : float32[T,2,16]
  %13, %14 = split(%12) : float32[T,2,8], float32[T,2,8] {axis=-1, sizes=(8, 8)}
  %15 = param() : float32[4,8,32] {name='l.experts.up_proj.weight'}
  %16 = param() : float32[4,8] {name='l.experts.up_proj.bias'}
  %17 = param() : float32[4,32,8] {name='l.experts.down_proj.weight'}
  %18 = param() : float32[4,32] {name='l.experts.down_proj.bias'}
  %19 = swiglu_oai(%13, %14) : float32[T,2,8] {alpha=1.702, limit=7.0}
  %20 = expert_linear_sum(%19, %6, %7, %5, %17, %18) : float32[T,32]
  return y=%20
}"""
    ctx = check(fuse_projections, SPLIT, expected, PassContext(store))
    assert ctx.counters["fuse_projections"]["fused_experts_2"] == 1
    b = store["l.experts.gate_proj+up_proj.bias"]
    np.testing.assert_array_equal(b[3], np.concatenate([store["l.experts.gate_proj.bias"][3],
                                                        store["l.experts.up_proj.bias"][3]]))
    x = rng.standard_normal((6, 32)).astype(np.float32)
    np.testing.assert_allclose(run(expected, store, x), run(SPLIT, store, x), rtol=1e-5, atol=1e-5)


def test_cast_weights_keeps_the_expert_bias_rows_float32():
    store = WeightStore(split_weights(np.random.default_rng(3)))
    ctx = PassContext(store, options={"weight_dtype": "bfloat16"})
    g = cast_weights(parse_graph(SPLIT), ctx)
    dtypes = {n.name: n.out.dtype for n in g.params()}
    assert {k for k, v in dtypes.items() if v == "float32"} == {
        "l.router.bias", "l.experts.gate_proj.bias", "l.experts.up_proj.bias", "l.experts.down_proj.bias"}
    assert store["l.experts.up_proj.bias"].dtype == np.float32
