"""Before/Expected programs for multi-head latent attention: absorb_latent_attention turns the naive MLA
the model writes (kv_b_proj expands the latent into every head's K/V, then causal_attention) into
latent attention with the query multiplied into the latent space; lower_paged_attention caches one
[latent; rope key] row per token; fuse_projections keeps a router apart from the linears beside it.
Each rewrite keeps the reference executor's outputs."""
from __future__ import annotations

import numpy as np
from test_golden import check

from reft.ir import parse_graph
from reft.ir.interpret import ReferenceExecutor
from reft.passes.absorb_latent_attention import absorb_latent_attention
from reft.passes.context import PassContext, WeightStore
from reft.passes.eliminate_dead_code import eliminate_dead_code
from reft.passes.fuse_projections import fuse_projections
from reft.passes.lower_paged_attention import lower_paged_attention

H, DN, R, DV, C = 2, 4, 2, 3, 5

# naive MLA as models/deepseek_v3.py writes it: 2 heads, nope 4, rope 2, v 3, latent 5
BEFORE = """
graph forward {
  %0 = input() : float32[T,2,4] {name='q_nope'}
  %1 = input() : float32[T,2,2] {name='q_rot'}
  %2 = input() : float32[T,5] {name='c_kv'}
  %3 = input() : float32[T,1,2] {name='k_rot'}
  %4 = input() : int32[T] {name='positions'}
  %5 = input() : int32[T] {name='seq_ids'}
  %6 = param() : float32[14,5] {name='l.kv_b_proj.weight'}
  %7 = linear(%2, %6) : float32[T,14]
  %8 = reshape(%7) : float32[T,2,7] {shape=('T', 2, 7)}
  %9, %10 = split(%8) : float32[T,2,4], float32[T,2,3] {axis=-1, sizes=(4, 3)}
  %11 = concat(%3, %3) : float32[T,2,2] {axis=1}
  %12 = concat(%9, %11) : float32[T,2,6] {axis=-1}
  %13 = concat(%0, %1) : float32[T,2,6] {axis=-1}
  %14 = causal_attention(%13, %12, %10, %4, %5) : float32[T,2,3] {scale=0.25}
  %15 = reshape(%14) : float32[T,6] {shape=('T', 6)}
  return y=%15
}"""

# the expansion stays for eliminate_dead_code
ABSORBED = """
graph forward {
  %0 = input() : float32[T,2,4] {name='q_nope'}
  %1 = input() : float32[T,2,2] {name='q_rot'}
  %2 = input() : float32[T,5] {name='c_kv'}
  %3 = input() : float32[T,1,2] {name='k_rot'}
  %4 = input() : int32[T] {name='positions'}
  %5 = input() : int32[T] {name='seq_ids'}
  %6 = param() : float32[14,5] {name='l.kv_b_proj.weight'}
  %7 = linear(%2, %6) : float32[T,14]
  %8 = reshape(%7) : float32[T,2,7] {shape=('T', 2, 7)}
  %9, %10 = split(%8) : float32[T,2,4], float32[T,2,3] {axis=-1, sizes=(4, 3)}
  %11 = concat(%3, %3) : float32[T,2,2] {axis=1}
  %12 = concat(%9, %11) : float32[T,2,6] {axis=-1}
  %13 = concat(%0, %1) : float32[T,2,6] {axis=-1}
  %14 = param() : float32[2,5,4] {name='l.kv_b_proj.absorbed_k.weight'}
  %15 = param() : float32[2,3,5] {name='l.kv_b_proj.absorbed_v.weight'}
  %16 = head_linear(%0, %14) : float32[T,2,5]
  %17 = reshape(%3) : float32[T,2] {shape=('T', 2)}
  %18 = latent_attention(%16, %1, %2, %17, %4, %5) : float32[T,2,5] {scale=0.25}
  %19 = head_linear(%18, %15) : float32[T,2,3]
  %20 = reshape(%19) : float32[T,6] {shape=('T', 6)}
  return y=%20
}"""

# after eliminate_dead_code
LATENT = """
graph forward {
  %0 = input() : float32[T,2,4] {name='q_nope'}
  %1 = input() : float32[T,2,2] {name='q_rot'}
  %2 = input() : float32[T,5] {name='c_kv'}
  %3 = input() : float32[T,1,2] {name='k_rot'}
  %4 = input() : int32[T] {name='positions'}
  %5 = input() : int32[T] {name='seq_ids'}
  %6 = param() : float32[2,5,4] {name='l.kv_b_proj.absorbed_k.weight'}
  %7 = param() : float32[2,3,5] {name='l.kv_b_proj.absorbed_v.weight'}
  %8 = head_linear(%0, %6) : float32[T,2,5]
  %9 = reshape(%3) : float32[T,2] {shape=('T', 2)}
  %10 = latent_attention(%8, %1, %2, %9, %4, %5) : float32[T,2,5] {scale=0.25}
  %11 = head_linear(%10, %7) : float32[T,2,3]
  %12 = reshape(%11) : float32[T,6] {shape=('T', 6)}
  return y=%12
}"""

# one [latent; rope key] row of 7 per token, no V cache
PAGED = """
graph forward {
  %0 = input() : float32[T,2,4] {name='q_nope'}
  %1 = input() : float32[T,2,2] {name='q_rot'}
  %2 = input() : float32[T,5] {name='c_kv'}
  %3 = input() : float32[T,1,2] {name='k_rot'}
  %4 = input() : int32[T] {name='positions'}
  %5 = input() : int32[T] {name='seq_ids'}
  %6 = input() : int32[S,MP] {name='page_table'}
  %7 = input() : float32[NP,4,1,7] {name='kv_cache.0.latent'}
  %8 = param() : float32[2,5,4] {name='l.kv_b_proj.absorbed_k.weight'}
  %9 = param() : float32[2,3,5] {name='l.kv_b_proj.absorbed_v.weight'}
  %10 = head_linear(%0, %8) : float32[T,2,5]
  %11 = reshape(%3) : float32[T,2] {shape=('T', 2)}
  %12 = latent_cache_write(%7, %2, %11, %4, %5, %6) : float32[NP,4,1,7]
  %13 = paged_latent_attention(%10, %1, %12, %4, %5, %6) : float32[T,2,5] {scale=0.25}
  %14 = head_linear(%13, %9) : float32[T,2,3]
  %15 = reshape(%14) : float32[T,6] {shape=('T', 6)}
  return y=%15
}"""


def batch(rng, lengths=(6, 4)):
    """Feeds for sequences of the given lengths, rows interleaved."""
    sid = np.concatenate([np.full(n, s) for s, n in enumerate(lengths)]).astype(np.int32)
    pos = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
    order = rng.permutation(len(sid))
    T = len(sid)
    return {"q_nope": rng.standard_normal((T, H, DN)).astype(np.float32),
            "q_rot": rng.standard_normal((T, H, R)).astype(np.float32),
            "c_kv": rng.standard_normal((T, C)).astype(np.float32),
            "k_rot": rng.standard_normal((T, 1, R)).astype(np.float32),
            "positions": pos[order], "seq_ids": sid[order]}


def run(text, store, feeds):
    g = parse_graph(text)
    return ReferenceExecutor(g, {n.name: store[n.name] for n in g.params()}).run(dict(feeds))["y"]


def absorbed_store(rng) -> WeightStore:
    store = WeightStore({"l.kv_b_proj.weight": rng.standard_normal((H * (DN + DV), C)).astype(np.float32)})
    ctx = PassContext(store)
    ctx.current = "absorb_latent_attention"
    absorb_latent_attention(parse_graph(BEFORE), ctx)
    return store


def test_absorb_multiplies_the_query_into_the_latent_space():
    rng = np.random.default_rng(0)
    store = WeightStore({"l.kv_b_proj.weight": rng.standard_normal((H * (DN + DV), C)).astype(np.float32)})
    ctx = check(absorb_latent_attention, BEFORE, ABSORBED, PassContext(store))
    assert ctx.counters["absorb_latent_attention"]["absorbed_layers"] == 1
    w = store["l.kv_b_proj.weight"].reshape(H, DN + DV, C)                  # head h: k rows, then v rows
    uk, uv = store["l.kv_b_proj.absorbed_k.weight"], store["l.kv_b_proj.absorbed_v.weight"]
    np.testing.assert_array_equal(uk[1], w[1, :DN].T)                       # W_UK^T: [C, Dn] per head
    np.testing.assert_array_equal(uv[1], w[1, DN:])                         # W_UV: [Dv, C] per head
    feeds = batch(rng)
    np.testing.assert_allclose(run(ABSORBED, store, feeds), run(BEFORE, store, feeds), rtol=1e-5, atol=1e-5)


def test_the_expansion_is_dead_code_after_absorbing():
    ctx = check(eliminate_dead_code, ABSORBED, LATENT)
    assert ctx.counters["eliminate_dead_code"]["removed"] == 7


def test_paged_latent_cache_holds_one_row_per_token():
    """A prompt in two chunks through the paged graph (pages shared across calls) gives the rows of
    the whole prompt through the latent graph without a cache."""
    ctx = check(lower_paged_attention, LATENT, PAGED, PassContext(options={"page_size": 4}))
    assert ctx.counters["lower_paged_attention"]["paged_latent_layers"] == 1
    rng = np.random.default_rng(1)
    store = absorbed_store(rng)
    feeds = batch(rng, lengths=(7,))
    order = np.argsort(feeds["positions"])
    feeds = {k: v[order] for k, v in feeds.items()}
    want = run(LATENT, store, feeds)
    cache = np.zeros((3, 4, 1, C + R), np.float32)
    table = np.array([[2, 0]], np.int32)
    for rows in (slice(0, 5), slice(5, 7)):
        part = {k: v[rows] for k, v in feeds.items()}
        got = run(PAGED, store, {**part, "page_table": table, "kv_cache.0.latent": cache})
        np.testing.assert_allclose(got, want[rows], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache[2, 1, 0], np.concatenate([feeds["c_kv"][1], feeds["k_rot"][1, 0]]))
    assert not cache[1].any()                                               # pages the table does not name


def test_windowed_attention_is_not_latent():
    src = BEFORE.replace("{scale=0.25}", "{scale=0.25, sliding_window=3}")
    ctx = check(absorb_latent_attention, src, src)
    assert not ctx.counters.get("absorb_latent_attention")


def test_a_router_does_not_fuse_with_the_shared_experts():
    """DeepSeek-V3's router and its shared experts' gate / up read the same x: gate and up fuse, the
    router stays its own (float) matmul."""
    w = {"r.weight": np.ones((4, 3), np.float32), "g.weight": np.ones((2, 3), np.float32),
         "u.weight": np.ones((2, 3), np.float32), "bias": np.zeros(4, np.float32)}
    ctx = check(fuse_projections, """
graph forward {
  %0 = input() : float32[T,3] {name='x'}
  %1 = param() : float32[4,3] {name='r.weight'}
  %2 = param() : float32[4] {name='bias'}
  %3 = param() : float32[2,3] {name='g.weight'}
  %4 = param() : float32[2,3] {name='u.weight'}
  %5 = linear(%0, %1) : float32[T,4]
  %6, %7 = moe_router(%5, %2) : int32[T,2], float32[T,2] {top_k=2, mode='sigmoid_group_topk', groups=2, topk_groups=1}
  %8 = linear(%0, %3) : float32[T,2]
  %9 = linear(%0, %4) : float32[T,2]
  %10 = mul(%8, %9) : float32[T,2]
  return ids=%6, w=%7, y=%10
}""", """
graph forward {
  %0 = input() : float32[T,3] {name='x'}
  %1 = param() : float32[4,3] {name='r.weight'}
  %2 = param() : float32[4] {name='bias'}
  %3 = param() : float32[2,3] {name='g.weight'}
  %4 = param() : float32[2,3] {name='u.weight'}
  %5 = linear(%0, %1) : float32[T,4]
  %6, %7 = moe_router(%5, %2) : int32[T,2], float32[T,2] {top_k=2, mode='sigmoid_group_topk', groups=2, topk_groups=1}
  %8 = param() : float32[4,3] {name='g+u.weight'}
  %9 = linear(%0, %8) : float32[T,4]
  %10, %11 = split(%9) : float32[T,2], float32[T,2] {axis=-1, sizes=(2, 2)}
  %12 = mul(%10, %11) : float32[T,2]
  return ids=%6, w=%7, y=%12
}""", PassContext(WeightStore(w)))
    assert dict(ctx.counters["fuse_projections"]) == {"fused_2": 1}
