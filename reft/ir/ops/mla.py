"""Multi-head latent attention ops (DeepSeek-V3): attention over a compressed per-token latent.

  head_linear(x[T, H, K], W[H, N, K]) -> [T, H, N]                   per head h: x[:, h] @ W[h]^T
  latent_attention(q_latent[T, H, C], q_rope[T, H, R], latent[T, C], k_rope[T, R], positions, seq_ids)
                                                          -> [T, H, C]  {scale}
  latent_cache_write(cache[NP, PS, 1, C + R], latent[T, C], k_rope[T, R], positions, seq_ids, page_table)
                                                          -> cache     (side effect, aliases the cache)
  paged_latent_attention(q_latent, q_rope, cache, positions, seq_ids, page_table) -> [T, H, C]  {scale}

MLA's keys and values are per-head expansions of one latent c (kv_lora_rank C) per token, plus one
rope key k_r (R dims) every head shares: k_h = [W_UK[h] c; k_r], v_h = W_UV[h] c. The *absorbed* form
never expands them: with q_latent[h] = W_UK[h]^T q_nope[h] (a head_linear),

  score(t, j) = (q_latent[t, h] . c[j] + q_rope[t, h] . k_r[j]) * scale
  out[t, h]   = sum_j softmax(score)(j) c[j]         (then W_UV[h] out: another head_linear)

so attention reads C + R numbers per cached token, whatever the number of heads: multi-query
attention in the latent space, with the latent as value. `latent_attention` attends among the rows
of the batch (what the absorb_latent_attention pass writes); the paged-KV pass turns it into
`latent_cache_write` + `paged_latent_attention`, whose cache holds [c; k_r] per token as one KV "head"
of width C + R (reft/runtime/kv_cache.py allocates it like any page pool array).

Notable:
- Masking is the causal rule of the attention ops (reft/ir/ops/attention.py): a row at position p of
  sequence s reads positions 0..p of s; no sliding window or soft-capping (DeepSeek has neither).
- head_linear's weights are float (quantize_weights leaves them alone); the cpu backend keeps them
  row-major.
- No gradient rules (inference only).
"""
from __future__ import annotations

import numpy as np

from ..types import TensorType
from .attention import INT, _attend, slots
from .registry import CONTRACTION, SIDE_EFFECT, check, f32, is_float, op


# -- head_linear(x[T, H, K], W[H, N, K]) -> [T, H, N]
def _head_linear_infer(ts, a):
    x, w = ts
    check(is_float(x) and x.rank == 3, f"head_linear: x must be float[T, H, K], got {x}")
    check(is_float(w) and w.rank == 3 and all(isinstance(d, int) for d in w.shape),
          f"head_linear: weights must be float[H, N, K], got {w}")
    check(w.shape[0] == x.shape[1] and w.shape[2] == x.shape[2], f"head_linear: x {x} and weights {w} disagree on H or K")
    return [TensorType((x.shape[0], w.shape[0], w.shape[1]), x.dtype)]


def _head_linear_ref(xs, a):
    x, w = xs
    return [np.einsum("thk,hnk->thn", f32(x), f32(w)).astype(x.dtype)]


op("head_linear", infer=_head_linear_infer, ref=_head_linear_ref, arity=2, traits={CONTRACTION},
   doc="A matmul per head: y[:, h] = x[:, h] @ W[h]^T, W [H, N, K].")


# -- the latent attentions
def _check_queries(ql: TensorType, qr: TensorType, name: str) -> tuple[int, int]:
    """(C, R) of the latent and rope query parts [T, H, C] and [T, H, R]."""
    check(is_float(ql) and ql.rank == 3 and isinstance(ql.shape[2], int) and isinstance(ql.shape[1], int),
          f"{name}: q_latent must be float[T, H, C], got {ql}")
    check(is_float(qr) and qr.rank == 3 and qr.shape[:2] == ql.shape[:2] and isinstance(qr.shape[2], int),
          f"{name}: q_rope must be float{list(ql.shape[:2]) + ['R']}, got {qr}")
    return ql.shape[2], qr.shape[2]


def _check_meta(T, positions: TensorType, seq_ids: TensorType, name: str):
    check(positions.dtype in INT and positions.shape == (T,), f"{name}: positions must be int[{T}], got {positions}")
    check(seq_ids.dtype in INT and seq_ids.shape == (T,), f"{name}: seq_ids must be int[{T}], got {seq_ids}")


def _check_rows(lat: TensorType, kr: TensorType, C: int, R: int, T, name: str):
    check(is_float(lat) and lat.shape == (T, C), f"{name}: latent must be float[{T}, {C}], got {lat}")
    check(is_float(kr) and kr.shape == (T, R), f"{name}: k_rope must be float[{T}, {R}], got {kr}")


def _check_cache(cache: TensorType, width: int, name: str):
    check(is_float(cache) and cache.rank == 4 and isinstance(cache.shape[1], int) and cache.shape[2:] == (1, width),
          f"{name}: cache must be float[NP, PS, 1, {width}] (latent + rope key), got {cache}")


def latent_attend(ql, qr, lat, kr, qpos, kpos, scale: float) -> np.ndarray:
    """Causal latent attention of queries (Tq, H, C) / (Tq, H, R) over keys (L, C) / (L, R) at positions
    kpos: multi-query attention with key [c; k_r] and value c. -> (Tq, H, C) float32."""
    q = np.concatenate([f32(ql), f32(qr)], axis=-1)                          # (Tq, H, C+R)
    k = np.concatenate([f32(lat), f32(kr)], axis=-1)[:, None, :]              # (L, 1, C+R)
    return _attend(q, k, f32(lat)[:, None, :], qpos, kpos, {"scale": scale, "sliding_window": 0})


def _latent_infer(ts, a):
    ql, qr, lat, kr, pos, sid = ts
    C, R = _check_queries(ql, qr, "latent_attention")
    _check_rows(lat, kr, C, R, ql.shape[0], "latent_attention")
    _check_meta(ql.shape[0], pos, sid, "latent_attention")
    return [ql]


def _latent_ref(xs, a):
    ql, qr, lat, kr, pos, sid = xs
    out = np.zeros(ql.shape, np.float32)
    for s in np.unique(sid):
        rows = np.nonzero(sid == s)[0]
        out[rows] = latent_attend(ql[rows], qr[rows], lat[rows], kr[rows], pos[rows], pos[rows], a["scale"])
    return [out.astype(ql.dtype)]


op("latent_attention", infer=_latent_infer, ref=_latent_ref, arity=6, attrs=("scale",),
   doc="Causal MLA in the absorbed form among the rows of the batch: scores q_latent . c + q_rope . k_rope, "
       "values c (the latent).")


def _write_infer(ts, a):
    cache, lat, kr, pos, sid, pt = ts
    T = lat.shape[0] if lat.rank == 2 else None
    check(lat.rank == 2 and kr.rank == 2 and isinstance(lat.shape[1], int) and isinstance(kr.shape[1], int),
          f"latent_cache_write: latent / k_rope must be float[T, C] / float[T, R], got {lat}, {kr}")
    _check_rows(lat, kr, lat.shape[1], kr.shape[1], T, "latent_cache_write")
    _check_cache(cache, lat.shape[1] + kr.shape[1], "latent_cache_write")
    _check_meta(T, pos, sid, "latent_cache_write")
    check(pt.dtype in INT and pt.rank == 2, f"latent_cache_write: page_table must be int[S, MP], got {pt}")
    return [cache]


def _write_ref(xs, a):
    cache, lat, kr, pos, sid, pt = xs
    page, off = slots(pos, sid, pt, cache.shape[1])
    C = lat.shape[1]
    cache[page, off, 0, :C] = lat.astype(cache.dtype)
    cache[page, off, 0, C:] = kr.astype(cache.dtype)
    return [cache]


op("latent_cache_write", aliases={0: 0}, infer=_write_infer, ref=_write_ref, arity=6, traits={SIDE_EFFECT},
   doc="Store each token's [latent; rope key] row into its cache page; the output aliases the cache.")


def _paged_infer(ts, a):
    ql, qr, cache, pos, sid, pt = ts
    C, R = _check_queries(ql, qr, "paged_latent_attention")
    _check_cache(cache, C + R, "paged_latent_attention")
    _check_meta(ql.shape[0], pos, sid, "paged_latent_attention")
    check(pt.dtype in INT and pt.rank == 2, f"paged_latent_attention: page_table must be int[S, MP], got {pt}")
    return [ql]


def _paged_ref(xs, a):
    ql, qr, cache, pos, sid, pt = xs
    C = ql.shape[2]
    out = np.zeros(ql.shape, np.float32)
    for s in np.unique(sid):
        rows = np.nonzero(sid == s)[0]
        kpos = np.arange(int(pos[rows].max()) + 1)
        page, off = slots(kpos, np.full_like(kpos, s), pt, cache.shape[1])
        kv = f32(cache[page, off, 0])                                           # (L, C+R)
        out[rows] = latent_attend(ql[rows], qr[rows], kv[:, :C], kv[:, C:], pos[rows], kpos, a["scale"])
    return [out.astype(ql.dtype)]


op("paged_latent_attention", infer=_paged_infer, ref=_paged_ref, arity=6, attrs=("scale",),
   doc="Causal MLA in the absorbed form of each row over its sequence's cached [latent; rope key] rows 0..p.")
