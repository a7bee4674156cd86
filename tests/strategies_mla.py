"""Hypothesis strategies for the multi-head latent attention ops (reft/ir/ops/mla.py) and DeepSeek-V3's
grouped router, merged into strategies.OP_CASES / SYMBOLIC_AXES by tests/strategies.py (import them
from there).

  MLA_OP_CASES       op -> strategy of (op_name, [numpy inputs], attrs); activations float32 (the
                     cpu kernels' activations), caches and head_linear weights of every float dtype
  MLA_SYMBOLIC_AXES  op -> the symbolic axes of each input
  GROUPED_ROUTER     moe_router cases of mode sigmoid_group_topk (tests/strategies.py draws them
                     beside strategies_moe's)
  head_linear_cases(tokens)  head_linear with `tokens` rows (the matmul's GEMV and sgemm paths)
"""
from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

import strategies as S   # the shared helpers (read when a case is drawn; strategies imports this file)
from reft.ir import ops

_T, _CACHE, _TABLE = {0: "T"}, {0: "NP"}, {0: "S", 1: "MP"}


@st.composite
def _head_linear(draw, tokens=st.integers(1, 6)):
    rng = S._rng(draw)
    T, H, K, N = draw(tokens), draw(st.integers(1, 5)), draw(st.integers(1, 40)), draw(st.integers(1, 20))
    return "head_linear", [S.rand(rng, (T, H, K), "float32"), S.rand(rng, (H, N, K), draw(S.float_dtypes))], {}


def head_linear_cases(tokens: st.SearchStrategy[int]) -> st.SearchStrategy:
    return _head_linear(tokens)


def _dims(draw) -> tuple[int, int, int]:
    """(H, C, R): up to 20 heads (the paged kernel takes them 16 at a time), latent and rope widths."""
    return draw(st.integers(1, 20)), draw(st.integers(1, 40)), draw(st.integers(1, 8))


def _meta(draw, sid, pos):
    """positions, seq_ids in one int dtype (the kernels take them so)."""
    dt = np.dtype(draw(S.int_dtypes))
    return pos.astype(dt), sid.astype(dt)


def _scale(draw, C: int, R: int) -> dict:
    return {"scale": draw(st.sampled_from([1.0 / math.sqrt(C + R), 1.0, 0.3]))}


@st.composite
def _latent_attention(draw):
    rng = S._rng(draw)
    H, C, R = _dims(draw)
    _, sid, pos = draw(S.token_batch())
    T = len(sid)
    pos, sid = _meta(draw, sid, pos)
    xs = [S.rand(rng, (T, H, C), "float32"), S.rand(rng, (T, H, R), "float32"), S.rand(rng, (T, C), "float32"),
          S.rand(rng, (T, R), "float32"), pos, sid]
    return "latent_attention", xs, _scale(draw, C, R)


def _paged_setup(draw, rng):
    """(H, C, R, seqs, seq_ids, positions, page_table, cache) with a random cache of some float dtype."""
    H, C, R = _dims(draw)
    seqs, sid, pos = draw(S.token_batch())
    ps = draw(st.integers(1, 4))
    table, n_pages = S.page_layout(draw, seqs, ps, draw(S.int_dtypes))
    cache = S.rand(rng, (n_pages, ps, 1, C + R), draw(S.float_dtypes))
    return H, C, R, seqs, sid, pos, table, cache


@st.composite
def _latent_cache_write(draw):
    rng = S._rng(draw)
    H, C, R, seqs, sid, pos, table, cache = _paged_setup(draw, rng)
    T = len(sid)
    pos, sid = _meta(draw, sid, pos)
    return "latent_cache_write", [cache, S.rand(rng, (T, C), "float32"), S.rand(rng, (T, R), "float32"), pos, sid,
                                  table], {}


@st.composite
def _paged_latent_attention(draw):
    rng = S._rng(draw)
    H, C, R, seqs, sid, pos, table, cache = _paged_setup(draw, rng)
    write = ops.get("latent_cache_write").ref
    for s, past, new in seqs:   # every position a query may read (0..past+new-1) is written first
        L = past + new
        write([cache, S.rand(rng, (L, C), "float32"), S.rand(rng, (L, R), "float32"), np.arange(L),
               np.full(L, s), table], {})
    T = len(sid)
    pos, sid = _meta(draw, sid, pos)
    xs = [S.rand(rng, (T, H, C), "float32"), S.rand(rng, (T, H, R), "float32"), cache, pos, sid, table]
    return "paged_latent_attention", xs, _scale(draw, C, R)


@st.composite
def _grouped_router(draw):
    """E = groups x experts per group; logits of any float dtype, a float32 correction bias."""
    rng = S._rng(draw)
    G, GS, T = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 6))
    E, TG = G * GS, draw(st.integers(1, G))
    logits = S.rand(rng, (T, E), draw(S.float_dtypes), -4, 4)
    bias = S.rand(rng, (E,), "float32", -0.5, 0.5)
    return "moe_router", [logits, bias], {"top_k": draw(st.integers(1, min(TG * GS, 4))), "mode": "sigmoid_group_topk",
                                          "normalize": draw(st.booleans()), "groups": G, "topk_groups": TG,
                                          "scale": draw(st.sampled_from([1.0, 2.5]))}


GROUPED_ROUTER = _grouped_router()
MLA_OP_CASES = {"head_linear": _head_linear(), "latent_attention": _latent_attention(),
                "latent_cache_write": _latent_cache_write(), "paged_latent_attention": _paged_latent_attention()}
MLA_SYMBOLIC_AXES = {
    "head_linear": lambda xs, a: [_T, {}],
    "latent_attention": lambda xs, a: [_T] * 6,
    "latent_cache_write": lambda xs, a: [_CACHE, _T, _T, _T, _T, _TABLE],
    "paged_latent_attention": lambda xs, a: [_T, _T, _CACHE, _T, _T, _TABLE],
}
