"""quantize_weights: which matmuls get quantized (Before/Expected IR), the counters, the lazy
weight transform against reft.quant, and the errors for bad options."""
from __future__ import annotations

import numpy as np
import pytest

from reft.backends.reference import ReferenceExecutor
from reft.errors import ReftError
from reft.ir import parse_graph, print_graph, verify
from reft.ir.quantized import dequantize_rows
from reft.passes.context import PassContext, WeightStore
from reft.passes.quantize_weights import quantize_weights
from reft.quant import quantize_int4, quantize_int8

# embedding table tied to the LM head, two projections (one of them fused-shaped), a logits head
BEFORE = """
graph forward {
  %0 = input() : int32[T] {name='ids'}
  %1 = input() : int32[R] {name='rows'}
  %2 = param() : float32[16,64] {name='embed'}
  %3 = param() : float32[128,64] {name='qkv'}
  %4 = param() : float32[64,128] {name='o'}
  %5 = embedding(%0, %2) : float32[T,64] {dtype='float32'}
  %6 = linear(%5, %3) : float32[T,128]
  %7 = linear(%6, %4) : float32[T,64]
  %8 = take_rows(%7, %1) : float32[R,64]
  %9 = linear(%8, %2) : float32[R,16]
  return logits=%9
}"""


def expected(dt: str, head: str = "float32") -> str:
    return BEFORE.replace("float32[128,64] {name='qkv'}", f"{dt}[128,64] {{name='qkv'}}") \
                 .replace("float32[64,128] {name='o'}", f"{dt}[64,128] {{name='o'}}") \
                 .replace("float32[16,64] {name='embed'}", f"{head}[16,64] {{name='embed'}}")


def run(options: dict, weights: dict):
    ctx = PassContext(WeightStore(weights), options=options)
    ctx.current = "quantize_weights"
    g = parse_graph(BEFORE)
    g = quantize_weights(g, ctx)
    verify(g)
    return g, ctx


def weights(rng):
    return {"embed": rng.standard_normal((16, 64)).astype(np.float32),
            "qkv": rng.standard_normal((128, 64)).astype(np.float32),
            "o": rng.standard_normal((64, 128)).astype(np.float32)}


@pytest.mark.parametrize("quant,group,dt", [("int8", 32, "int8"), ("int4", 32, "int4_g32")])
def test_projections_quantized_head_and_embedding_stay_float(quant, group, dt):
    rng = np.random.default_rng(0)
    w = weights(rng)
    g, ctx = run({"quant": quant, "group_size": group}, w)
    assert print_graph(g) == print_graph(parse_graph(expected(dt)))
    assert ctx.counters["quantize_weights"] == {f"to_{dt}": 2, "kept_head": 1}
    # the stored bytes are reft.quant's quantization of the weight, laid out as the dtype says
    want = quantize_int8(w["o"]).dequantize() if quant == "int8" else quantize_int4(w["o"], group).dequantize()
    np.testing.assert_array_equal(dequantize_rows(ctx.weights["o"], dt, 128), want)
    assert ctx.weights["embed"] is w["embed"]


def test_group_size_and_head_option():
    rng = np.random.default_rng(1)
    w = weights(rng)
    g, ctx = run({"quant": "int4", "group_size": 64, "quant_head": True}, w)
    assert print_graph(g) == print_graph(parse_graph(expected("int4_g64", head="int4_g64")))
    assert ctx.counters["quantize_weights"] == {"to_int4_g64": 3}
    # the reference runs the quantized graph: embedding and head read the dequantized table
    ids = np.array([3, 7, 1], np.int32)
    out = ReferenceExecutor(g, {k: ctx.weights[k] for k in w}).run({"ids": ids, "rows": np.array([2], np.int32)})
    assert out["logits"].shape == (1, 16) and np.isfinite(out["logits"]).all()


def test_no_quant_option_is_identity():
    g, ctx = run({}, weights(np.random.default_rng(2)))
    assert print_graph(g) == print_graph(parse_graph(BEFORE)) and not ctx.counters


def test_groups_longer_than_the_rows():
    """128-value groups on the 64-input qkv rows: each row is one short group (as 576-wide SmolLM2
    rows end in a group of 64)."""
    w = weights(np.random.default_rng(3))
    g, ctx = run({"quant": "int4", "group_size": 128}, w)
    assert ctx.counters["quantize_weights"] == {"to_int4_g128": 2, "kept_head": 1}
    np.testing.assert_array_equal(dequantize_rows(ctx.weights["qkv"], "int4_g128", 64),
                                  quantize_int4(w["qkv"], 128).dequantize())


def test_bad_options_name_the_problem():
    with pytest.raises(ReftError, match="--group-size must be one of"):
        run({"quant": "int4", "group_size": 48}, weights(np.random.default_rng(3)))
    with pytest.raises(ReftError, match="unknown quantization"):
        run({"quant": "int3"}, weights(np.random.default_rng(3)))


SCALED = """
graph forward {
  %0 = input() : int32[T] {name='input_ids'}
  %1 = param() : float32[16,64] {name='embed'}
  %2 = param() : float32[64] {name='norm'}
  %3 = param() : float32[96,64] {name='qkv'}
  %4 = embedding(%0, %1) : float32[T,64] {dtype='float32'}
  %5 = rms_norm(%4, %2) : float32[T,64] {eps=1e-05}
  %6 = linear(%5, %3) : float32[T,96]
  return logits=%6
}"""


def test_scale_activations_folds_scales_into_the_norm():
    """AWQ-style scaling changes weights, not the function: same outputs, weight columns scaled by
    mean|x|^0.5 (geometric mean 1) and the norm weight divided by the same."""
    from reft.passes.scale_activations import scale_activations

    rng = np.random.default_rng(4)
    w = {"embed": rng.standard_normal((16, 64)).astype(np.float32) * np.geomspace(0.1, 10, 64).astype(np.float32),
         "norm": rng.uniform(0.5, 1.5, 64).astype(np.float32), "qkv": rng.standard_normal((96, 64)).astype(np.float32)}
    ids = rng.integers(0, 16, 40).astype(np.int32)
    ctx = PassContext(WeightStore(w), options={"quant": "int4", "calibration_ids": ids})
    ctx.current = "scale_activations"
    g = scale_activations(parse_graph(SCALED), ctx)
    verify(g)
    assert print_graph(g) == print_graph(parse_graph(SCALED)) and ctx.counters["scale_activations"]["scaled"] == 1
    new = {k: ctx.weights[k] for k in w}
    s = new["qkv"][0] / w["qkv"][0]
    assert s.max() / s.min() > 3 and abs(np.log(s).mean()) < 1e-4
    np.testing.assert_allclose(new["norm"] * s, w["norm"], rtol=1e-5)
    feeds = {"input_ids": rng.integers(0, 16, 9).astype(np.int32)}
    want = ReferenceExecutor(parse_graph(SCALED), w).run(feeds)["logits"]
    got = ReferenceExecutor(g, new).run(feeds)["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
