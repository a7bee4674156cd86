"""The cpu multi-head latent attention kernels (templates/mla.h) and DeepSeek-V3's router
(templates/router_grouped.h) against the numpy reference, beyond the small every-op cases: head_linear
at token counts across the GEMV and sgemm paths of every local target, paged latent attention over
contexts of several pages with DeepSeek-like widths (more heads than one block of 16), and a decode
row whose result does not depend on what else is in its batch.

Every-op coverage at small sizes is tests/backends/test_cpu_ops.py (its cases: tests/strategies_mla.py).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import head_linear_cases
from test_cpu_ops import EDGES, LOCAL_TARGETS, check_against_reference

from reft.backends.cpu import compile_graph
from reft.backends.reference import ReferenceExecutor
from reft.ir import GraphBuilder, ops

TOKENS = st.sampled_from([1, 2, 3, 5, 9, 16, 17, *EDGES])


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data())
def test_head_linear_at_every_batch_path(data):
    """Row-major per-head matrices of every float dtype, a dot per (token, row) up to GEMV_MAX_T
    tokens and the sgemm above; 2 threads splitting the H * N rows across heads."""
    cases = [data.draw(head_linear_cases(TOKENS)) for _ in range(data.draw(st.integers(1, 2)))]
    check_against_reference(cases, target=data.draw(st.sampled_from(LOCAL_TARGETS)))


def latent_graph(H: int, C: int, R: int, ps: int, cache_dtype: str) -> GraphBuilder:
    b = GraphBuilder("forward")
    ql, qr = b.input("ql", ("T", H, C), "float32"), b.input("qr", ("T", H, R), "float32")
    cache = b.input("cache", ("NP", ps, 1, C + R), cache_dtype)
    pos, sid = b.input("pos", ("T",), "int32"), b.input("sid", ("T",), "int32")
    table = b.input("table", ("S", "MP"), "int32")
    b.output("y", b.paged_latent_attention(ql, qr, cache, pos, sid, table, scale=0.07))
    return b


def filled_cache(rng, lengths, C, R, ps, dtype):
    """A shuffled pool holding every sequence's positions 0..L-1, and its page table."""
    need = [-(-L // ps) for L in lengths]
    pages = rng.permutation(sum(need) + 2)
    table = np.zeros((len(lengths), max(need)), np.int32)
    at = 0
    for s, n in enumerate(need):
        table[s, :n] = pages[at:at + n]
        at += n
    cache = np.zeros((len(pages), ps, 1, C + R), np.float32).astype(dtype)
    write = ops.get("latent_cache_write").ref
    for s, L in enumerate(lengths):
        write([cache, rng.standard_normal((L, C)).astype(np.float32), rng.standard_normal((L, R)).astype(np.float32),
               np.arange(L), np.full(L, s), table], {})
    return cache, table


@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16"])
def test_paged_latent_attention_over_several_pages(cache_dtype, tmp_path):
    """20 heads (a block of 16 and a block of 4) with latent 64 and rope 16 over contexts of up to 41
    positions in pages of 16; a prompt piece of one sequence beside a decode step of another."""
    from reft.ir.types import np_dtype

    rng = np.random.default_rng(2)
    H, C, R, ps = 20, 64, 16, 16
    cache, table = filled_cache(rng, [41, 23], C, R, ps, np_dtype(cache_dtype))
    pos = np.array([40, 18, 19, 20, 21, 22], np.int32)
    sid = np.array([0, 1, 1, 1, 1, 1], np.int32)
    feeds = {"ql": rng.standard_normal((6, H, C)).astype(np.float32), "qr": rng.standard_normal((6, H, R)).astype(np.float32),
             "cache": cache, "pos": pos, "sid": sid, "table": table}
    b = latent_graph(H, C, R, ps, cache_dtype)
    want = ReferenceExecutor(b.graph, {}).run(dict(feeds))["y"]
    exe = compile_graph(b.graph, {}, tmp_path, max_tokens=16, threads=2)
    got = exe.run(dict(feeds))["y"]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    alone = exe.run({**feeds, "ql": feeds["ql"][:1], "qr": feeds["qr"][:1], "pos": pos[:1], "sid": sid[:1]})["y"]
    np.testing.assert_array_equal(alone[0], got[0])     # the decode row, bit for bit, whatever its batch


def test_grouped_router_at_deepseek_width(tmp_path):
    """256 experts in 8 groups, 4 kept, top-8, normalised and scaled, 37 tokens on 2 threads."""
    rng = np.random.default_rng(6)
    T, E = 37, 256
    b = GraphBuilder("forward")
    logits, bias = b.input("logits", ("T", E), "float32"), b.input("bias", (E,), "float32")
    ids, w = b.moe_router(logits, bias, top_k=8, mode="sigmoid_group_topk", groups=8, topk_groups=4, scale=2.5)
    b.output("ids", ids)
    b.output("w", w)
    feeds = {"logits": rng.standard_normal((T, E)).astype(np.float32) * 2,
             "bias": rng.uniform(-0.3, 0.3, E).astype(np.float32)}
    want = ReferenceExecutor(b.graph, {}).run(dict(feeds))
    got = compile_graph(b.graph, {}, tmp_path, max_tokens=64, threads=2).run(dict(feeds))
    np.testing.assert_array_equal(got["ids"], want["ids"])
    np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6, atol=1e-7)
    assert len({int(i) // 32 for i in want["ids"][0]}) <= 4   # from at most topk_groups groups
