"""The cpu mixture-of-experts kernels (templates/moe.h) against the numpy reference: the grouped
matmuls at token counts across the GEMV / tile / sgemm paths of every local target, stacked expert
weights in every quantized dtype at decode and prompt sizes, row-major experts, and a routed block
(router -> dispatch -> experts) whose decode rows equal the same tokens alone.

Every-op coverage at small sizes is tests/backends/test_cpu_ops.py (its cases: tests/strategies_moe.py).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from quant_blocks import F16_SCALES, random_blocks
from strategies_moe import moe_matmul_cases, routing
from test_cpu_ops import EDGES, LOCAL_TARGETS, check_against_reference

from reft.backends.cpu import compile_graph
from reft.backends.reference import ReferenceExecutor
from reft.ir import GraphBuilder, verify
from reft.ir.quantized import GGML_NAMES, quantize_weight
from reft.ir.types import QUANT_DTYPES

TOKENS = st.sampled_from([1, 2, 3, 4, 5, 7, 9, 16, 17, *EDGES])


@pytest.mark.parametrize("op", ["expert_linear", "expert_glu", "expert_linear_sum"])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data())
def test_grouped_matmuls_at_every_batch_path(op, data):
    """Experts with one token (decode GEMV), a few (tiles) and more than GEMV_MAX_T (sgemm), float
    weights of every dtype, packed, 2 threads splitting each expert's rows."""
    cases = [data.draw(moe_matmul_cases(TOKENS)[op]) for _ in range(data.draw(st.integers(1, 2)))]
    check_against_reference(cases, target=data.draw(st.sampled_from(LOCAL_TARGETS)))


def test_row_major_experts(tmp_path):
    """Stacked weights that are not graph weights (no packing) go through the row-major matmuls."""
    rng = np.random.default_rng(3)
    T, k, E, K, N = 5, 2, 4, 24, 12
    ids, order, offsets = routing(rng, T, k, E)
    b = GraphBuilder("forward")
    x = b.input("x", ("T", K), "float32")
    o, off = b.input("order", ("T", k), "int32"), b.input("offsets", (E + 1,), "int32")
    w = b.input("w", (E, N, K), "float16")
    b.output("y", b.expert_linear(x, o, off, w))
    feeds = {"x": rng.standard_normal((T, K)).astype(np.float32), "order": order, "offsets": offsets,
             "w": rng.standard_normal((E, N, K)).astype(np.float16)}
    want = ReferenceExecutor(b.graph, {}).run(dict(feeds))["y"]
    got = compile_graph(b.graph, {}, tmp_path, max_tokens=8, threads=2).run(dict(feeds))["y"]
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def quantized_stack(dtype: str, E: int, n: int, k: int, rng) -> np.ndarray:
    """uint8[E, n, row_bytes]: valid quantized matrices (random blocks with small finite scales, or
    reft's formats quantized from floats)."""
    if dtype in GGML_NAMES:
        raw = random_blocks(GGML_NAMES[dtype], E * n * k // QUANT_DTYPES[dtype][0], rng)
        for off in F16_SCALES[GGML_NAMES[dtype]]:
            d = rng.uniform(-1, 1, (len(raw), 1)).astype(np.float16) / np.float16(64)
            raw[:, off:off + 2] = d.view(np.uint8)
        return raw.reshape(E, n, -1)
    return quantize_weight(rng.standard_normal((E, n, k)).astype(np.float32), dtype)


def quantized_graph():
    """A routed expert block per quantized dtype: glu (gate/up) and the weighted down projection."""
    rng = np.random.default_rng(11)
    b = GraphBuilder("forward")
    weights, dims = {}, {}
    E, k = 4, 2
    for dt in sorted(QUANT_DTYPES):
        K = 256 if dt.endswith("_k") else 96
        F = 256 if dt.endswith("_k") else 64
        x = b.input(f"x_{dt}", ("T", K), "float32")
        logits = b.input(f"logits_{dt}", ("T", E), "float32")
        ids, wts = b.moe_router(logits, top_k=k)
        order, offsets = b.moe_dispatch(ids, experts=E)
        gu = b.param(f"gu_{dt}", (E, 2 * F, K), dt)
        down = b.param(f"down_{dt}", (E, K, F), dt)
        weights[f"gu_{dt}"] = quantized_stack(dt, E, 2 * F, K, rng)
        weights[f"down_{dt}"] = quantized_stack(dt, E, K, F, rng)
        h = b.expert_glu(x, order, offsets, gu, act="silu")
        b.output(f"up_{dt}", b.expert_linear(x, order, offsets, gu))
        b.output(f"moe_{dt}", b.expert_linear_sum(h, order, offsets, wts, down))
        dims[dt] = (K, E)
    verify(b.graph)
    return b.graph, weights, dims


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    graph, weights, dims = quantized_graph()
    exe = compile_graph(graph, weights, tmp_path_factory.mktemp("moe_quant"), max_tokens=40, threads=2)
    return graph, weights, dims, exe


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(T=st.sampled_from([1, 2, 5, 17, 40]), seed=st.integers(0, 2**31 - 1))
def test_quantized_experts_match_reference(quantized, T, seed):
    """Every quantized dtype of the stacked experts, at decode (GEMV on the blocks) and prompt sizes
    (an expert with more rows than QGEMV_MAX_T: dequantized chunks + sgemm)."""
    graph, weights, dims, exe = quantized
    rng = np.random.default_rng(seed)
    feeds = {}
    for dt, (K, E) in dims.items():
        feeds[f"x_{dt}"] = rng.standard_normal((T, K)).astype(np.float32)
        feeds[f"logits_{dt}"] = rng.standard_normal((T, E)).astype(np.float32)
    want = ReferenceExecutor(graph, weights).run(dict(feeds))
    got = exe.run(dict(feeds))
    for name, w in want.items():
        assert np.isfinite(w).all() and np.abs(w).max() > 0, name
        scale = float(np.abs(w).max())   # float32 sums in another order: relative to the largest output
        np.testing.assert_allclose(got[name] / scale, w / scale, rtol=0, atol=1e-4, err_msg=f"{name} T={T}")


def test_decode_rows_do_not_depend_on_the_batch(tmp_path):
    """A token's routed output is the same computed alone or among others (decode-sized batches,
    float32 packed experts): the GEMV and tiles give each row the same sums."""
    rng = np.random.default_rng(5)
    E, k, K, F = 6, 2, 48, 40
    b = GraphBuilder("forward")
    x = b.input("x", ("T", K), "float32")
    ids, wts = b.moe_router(b.input("logits", ("T", E), "float32"), top_k=k)
    order, offsets = b.moe_dispatch(ids, experts=E)
    h = b.expert_glu(x, order, offsets, b.param("gu", (E, 2 * F, K)), act="silu")
    b.output("y", b.expert_linear_sum(h, order, offsets, wts, b.param("down", (E, K, F))))
    weights = {"gu": rng.standard_normal((E, 2 * F, K)).astype(np.float32),
               "down": rng.standard_normal((E, K, F)).astype(np.float32)}
    exe = compile_graph(b.graph, weights, tmp_path, max_tokens=16, threads=2)
    xs, logits = rng.standard_normal((12, K)).astype(np.float32), rng.standard_normal((12, E)).astype(np.float32)
    alone = exe.run({"x": xs[:1], "logits": logits[:1]})["y"][0]
    for T in (2, 3, 5, 12):
        got = exe.run({"x": xs[:T], "logits": logits[:T]})["y"][0]
        np.testing.assert_array_equal(got, alone, err_msg=f"T={T}")
