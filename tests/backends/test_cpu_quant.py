"""The cpu kernels on quantized weights against the reference backend (which dequantizes with
reft.quant's numpy formats): linear, linear_glu, qkv_rope and embedding for every quantized
dtype, at decode (GEMV) and prompt (integer GEMM or dequantize + sgemm) batch sizes.

One graph holds every case (one compile); hypothesis draws the batch size and the activations.
Weights are random but valid blocks (any codes, finite float16 scales) or, for reft's own
formats, float matrices quantized by reft.quant.
"""
from __future__ import annotations

import numpy as np
import pytest
from reft.backends.cpu.targets import TARGETS, runs_here
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from quant_blocks import F16_SCALES, random_blocks

from reft.backends.cpu import compile_graph
from reft.backends.reference import ReferenceExecutor
from reft.ir import GraphBuilder, verify
from reft.ir.quantized import GGML_NAMES, quantize_weight
from reft.ir.types import QUANT_DTYPES, TensorType

QTYPES = sorted(QUANT_DTYPES)


def weight(dtype: str, n: int, k: int, rng) -> np.ndarray:
    """uint8[n, row_bytes]: a valid quantized [n, k] matrix."""
    if dtype in GGML_NAMES:
        bv = QUANT_DTYPES[dtype][0]
        raw = random_blocks(GGML_NAMES[dtype], n * k // bv, rng)
        for off in F16_SCALES[GGML_NAMES[dtype]]:   # scales of either sign around 1/64, so outputs stay finite
            d = rng.uniform(-1, 1, (len(raw), 1)).astype(np.float16) / np.float16(64)
            raw[:, off:off + 2] = d.view(np.uint8)
        return raw.reshape(n, -1)
    return quantize_weight(rng.standard_normal((n, k)).astype(np.float32), dtype)


def build():
    rng = np.random.default_rng(7)
    b = GraphBuilder("forward")
    weights, xs = {}, {}
    ids = b.input("ids", ("T",), "int32")
    pos = b.input("pos", ("T",), "int32")
    for dt in QTYPES:
        k = QUANT_DTYPES[dt][0] if QUANT_DTYPES[dt][0] >= 128 else 64   # one or two blocks of 128/256 per row
        k *= 2 if dt.endswith("_k") else 3
        if dt.startswith("int4"):
            k = 480   # int4_g64 / g128 rows end in a short group (32 / 96 values)
        x = b.input(f"x_{dt}", ("T", k), "float32")
        xs[dt] = k
        n = 13 if dt != "q6_k" else 40                # rows not a multiple of the 8-row split quantum
        w = b.param(f"w_{dt}", (n, k), dt)
        weights[f"w_{dt}"] = weight(dt, n, k, rng)
        bias = b.param(f"b_{dt}", (n,))
        weights[f"b_{dt}"] = rng.standard_normal(n).astype(np.float32)
        b.output(f"linear_{dt}", b.linear(x, w, bias))
        g = b.param(f"g_{dt}", (2 * 24, k), dt)
        weights[f"g_{dt}"] = weight(dt, 48, k, rng)
        b.output(f"glu_{dt}", b.linear_glu(x, g, act="silu"))
        H, Hkv, D = 2, 1, 16
        qkv = b.param(f"qkv_{dt}", ((H + 2 * Hkv) * D, k), dt)
        weights[f"qkv_{dt}"] = weight(dt, (H + 2 * Hkv) * D, k, rng)
        q, kk, v = b.qkv_rope(x, qkv, pos, heads=H, kv_heads=Hkv, head_dim=D, theta=10000.0, rotary_dim=D)
        for name, o in (("q", q), ("k", kk), ("v", v)):
            b.output(f"{name}_{dt}", o)
        table = b.param(f"emb_{dt}", (50, k), dt)
        weights[f"emb_{dt}"] = weight(dt, 50, k, rng)
        b.output(f"emb_{dt}", b.embedding(ids, table, dtype="float32"))
    verify(b.graph)
    return b.graph, weights, xs


@pytest.fixture(scope="module", params=[t for t in TARGETS if runs_here(t)])
def compiled(request, tmp_path_factory):
    """Every cpu target this host runs (AVX-512, AVX2, generic on an AVX-512 x86-64 host)."""
    graph, weights, xs = build()
    target = request.param
    exe = compile_graph(graph, weights, tmp_path_factory.mktemp("quant"), max_tokens=32, threads=2, target=target)
    return graph, weights, xs, exe


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(T=st.sampled_from([1, 2, 3, 4, 5, 7, 16, 17]), seed=st.integers(0, 2**31 - 1))
def test_quantized_kernels_match_reference(compiled, T, seed):
    check_step(*compiled, T, seed)


@pytest.mark.parametrize("T", [17, 30, 32])
def test_prompt_batches_match_reference(compiled, T):
    """Batches past QGEMV_MAX_T take the prompt path (the integer GEMM for llama.cpp's types on
    avx2, dequantized rows and the sgemm elsewhere), with token counts that leave every tile tail."""
    check_step(*compiled, T, 1000 + T)


def check_step(graph, weights, xs, exe, T, seed):
    """One step of T tokens (random ids, positions, activations) against the reference."""
    rng = np.random.default_rng(seed)
    feeds = {"ids": rng.integers(0, 50, T).astype(np.int32), "pos": rng.integers(0, 100, T).astype(np.int32)}
    feeds.update({f"x_{dt}": rng.standard_normal((T, k)).astype(np.float32) for dt, k in xs.items()})
    want = ReferenceExecutor(graph, weights).run(feeds)
    got = exe.run(feeds)
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert np.isfinite(w).all() and np.abs(w).max() > 0, name
        # float32 sums in another order: error relative to the largest output of the case
        scale = max(float(np.abs(w).max()), 1e-30)
        np.testing.assert_allclose(g / scale, w / scale, rtol=0, atol=2e-5 if name.startswith("emb") else 1e-4,
                                   err_msg=f"{name} T={T}")


def test_quantized_rows_do_not_depend_on_the_batch_in_reproducible_mode(compiled):
    check_reproducible_rows(*compiled)


def check_reproducible_rows(graph, weights, xs, exe, T=24):
    """In reproducible mode, a step of T > QGEMV_MAX_T tokens whose first and last tokens equal a
    1-token step's gives those rows bit for bit the 1-token results, for every format's matmuls (the
    GEMV with int16 activations or float codes, instead of dequantized rows and the sgemm)."""
    rng = np.random.default_rng(7)
    one = {"ids": np.array([3], np.int32), "pos": np.array([5], np.int32)}
    one.update({f"x_{dt}": rng.standard_normal((1, k)).astype(np.float32) for dt, k in xs.items()})
    many = {"ids": rng.integers(0, 50, T).astype(np.int32), "pos": rng.integers(0, 100, T).astype(np.int32)}
    many.update({f"x_{dt}": rng.standard_normal((T, k)).astype(np.float32) for dt, k in xs.items()})
    for name in many:
        many[name][0] = many[name][-1] = one[name][0]
    exe.set_deterministic(True)
    try:
        alone, got = exe.run(one), exe.run(many)
    finally:
        exe.set_deterministic(False)
    for name, a in alone.items():
        np.testing.assert_array_equal(got[name][0], a[0], err_msg=f"{name} first row")
        np.testing.assert_array_equal(got[name][-1], a[0], err_msg=f"{name} last row")


def test_quantized_dtype_rules():
    """Logical shape [N, K], storage uint8[N, row_bytes]; K must be whole blocks."""
    t = TensorType((10, 512), "q4_k")
    assert t.storage_shape() == (10, 288) and t.nbytes() == 2880
    assert TensorType((3, 64), "int8").storage_shape() == (3, 68)
    assert TensorType((3, 128), "int4_g64").nbytes() == 3 * 2 * 36
    with pytest.raises(TypeError, match="multiple of 256"):
        TensorType((4, 128), "q6_k")
    with pytest.raises(TypeError, match="matrix"):
        TensorType((128,), "q8_0")
