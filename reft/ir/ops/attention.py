"""Attention ops.

Tokens of several sequences are flattened into one batch of T rows; `seq_ids[T]` says which
sequence each row belongs to and `positions[T]` its position in that sequence. A query at
position p attends to keys of its own sequence at positions j with j <= p (and p - j < window
when `sliding_window` > 0). Grouped-query attention: query head h reads KV head h // (H / Hkv).
With `softcap` > 0 the scores q . k * scale are soft-capped, softcap * tanh(s / softcap), before
the mask (Gemma 2). Attention sinks (GPT-OSS), an optional last input float[H]: a learned logit per
query head that joins the softmax's denominator of every query of that head, as a key no value
belongs to (the probabilities over the real keys then sum to less than 1).

  causal_attention  keys/values are the rows of this batch (no cache: training, or before
                    the paged-KV pass); values may be narrower or wider than keys (DeepSeek's
                    v_head_dim), the output has the values' head dim
  kv_cache_write    stores this batch's K/V rows into pages of the cache (side effect; its
                    outputs alias the cache inputs, which orders later readers after it)
  paged_attention   keys/values are read from the cache pages through the page table
"""
from __future__ import annotations

import numpy as np

from ...errors import ReftError
from ..types import TensorType
from .registry import SIDE_EFFECT, check, f32, is_float, op

INT = ("int32", "int64")
# sliding_window: 0 = no window; softcap: scores become softcap * tanh(s / softcap) before the mask (0 = off)
ATTENTION_DEFAULTS = {"sliding_window": 0, "softcap": 0.0}


def _check_meta(q: TensorType, positions: TensorType, seq_ids: TensorType, name: str):
    T = q.shape[0]
    check(positions.dtype in INT and positions.shape == (T,), f"{name}: positions must be int[{T}], got {positions}")
    check(seq_ids.dtype in INT and seq_ids.shape == (T,), f"{name}: seq_ids must be int[{T}], got {seq_ids}")


def _check_heads(q: TensorType, kv_heads, kv_dim, name: str):
    check(is_float(q) and q.rank == 3, f"{name}: q must be float[T, H, D], got {q}")
    H, D = q.shape[1], q.shape[2]
    check(isinstance(H, int) and isinstance(kv_heads, int) and kv_heads > 0 and H % kv_heads == 0,
          f"{name}: {H} query heads are not a multiple of {kv_heads} KV heads")
    check(kv_dim == D, f"{name}: head dim {D} of q does not match {kv_dim} of k/v")


def attend_scores(q, k, scale, softcap=0.0):
    """Scores q . k * scale, (H, Tq, L), soft-capped to softcap * tanh(s / softcap) when softcap > 0
    (Gemma 2: before the mask); also returns the tanh (None without capping) for the gradient."""
    s = np.einsum("thd,lhd->htl", q, k) * np.float32(scale)        # (H, Tq, L)
    if not softcap:
        return s, None
    t = np.tanh(s / np.float32(softcap))
    return t * np.float32(softcap), t


def _attend_probs(q, k, qpos, kpos, scale, window, softcap=0.0, sinks=None):
    """Attention probabilities: q (Tq, H, D), k (L, H, D) (KV heads already repeated) -> (H, Tq, L);
    sinks (H,): each head's extra logit in the denominator (the max is taken over it too)."""
    s = attend_scores(q, k, scale, softcap)[0]
    mask = kpos[None, :] <= qpos[:, None]
    if window > 0:
        mask &= (qpos[:, None] - kpos[None, :]) < window
    s = np.where(mask[None], s, -np.inf)
    m = s.max(axis=-1, keepdims=True)                               # (H, Tq, 1)
    if sinks is not None:
        m = np.maximum(m, sinks[:, None, None])
    p = np.exp(s - m)
    denom = p.sum(axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + np.exp(sinks[:, None, None] - m)
    return p / denom


def _attend(q, k, v, qpos, kpos, a, sinks=None):
    """q (Tq, H, D); k, v (L, Hkv, D); qpos (Tq,), kpos (L,) -> (Tq, H, D), float32."""
    rep = q.shape[1] // k.shape[1]
    k = np.repeat(k, rep, axis=1)                                   # (L, H, D)
    v = np.repeat(v, rep, axis=1)
    p = _attend_probs(q, k, qpos, kpos, a["scale"], a["sliding_window"], a.get("softcap", 0.0), sinks)
    return np.einsum("htl,lhd->thd", p, v)


def _check_sinks(ts, at: int, q: TensorType, name: str):
    """The optional sinks input (index `at`, the last): float[H] with H the query heads."""
    check(len(ts) <= at + 1, f"{name}: takes at most {at + 1} inputs, got {len(ts)}")
    if len(ts) == at + 1:
        check(is_float(ts[at]) and ts[at].shape == (q.shape[1],),
              f"{name}: sinks must be float[{q.shape[1]}] (one per query head), got {ts[at]}")


def _sinks(xs, at: int):
    return f32(xs[at]) if len(xs) > at else None


# -- causal_attention(q, k, v, positions, seq_ids)
def _causal_infer(ts, a):
    q, k, v, pos, sid = ts[:5]
    check(k.rank == 3 and is_float(k) and is_float(v) and q.rank == 3 and k.shape[0] == q.shape[0]
          and v.rank == 3 and v.shape[:2] == k.shape[:2], f"causal_attention: k {k} / v {v} do not match q {q}")
    _check_heads(q, k.shape[1], k.shape[2], "causal_attention")
    _check_meta(q, pos, sid, "causal_attention")
    _check_sinks(ts, 5, q, "causal_attention")
    return [q if v.shape == k.shape else TensorType(q.shape[:2] + v.shape[2:], q.dtype)]


def _causal_ref(xs, a):
    q, k, v, pos, sid = xs[:5]
    out = np.zeros(q.shape[:2] + v.shape[2:], np.float32)
    for s in np.unique(sid):
        rows = np.nonzero(sid == s)[0]
        out[rows] = _attend(f32(q[rows]), f32(k[rows]), f32(v[rows]), pos[rows], pos[rows], a, _sinks(xs, 5))
    return [out.astype(q.dtype)]


def _causal_vjp(b, node, cts, wants):
    if len(node.inputs) > 5:
        raise ReftError("causal_attention with attention sinks has no gradient rule yet; it cannot be trained through")
    q, k, v, pos, sid = node.inputs
    f = [x if x.dtype == "float32" else b.cast(x, dtype="float32") for x in (cts[0], q, k, v, node.out)]
    grads = b.causal_attention_grad(*f, pos, sid, **node.attrs)
    out = [g if x.dtype == "float32" else b.cast(g, dtype=x.dtype) for g, x in zip(grads, (q, k, v))]
    return [g if w else None for g, w in zip(out, wants[:3])] + [None, None]


op("causal_attention", infer=_causal_infer, ref=_causal_ref, vjp=_causal_vjp, arity=(5, 6), attrs=("scale",),
   defaults=ATTENTION_DEFAULTS,
   doc="Causal GQA attention among the rows of the batch, per sequence (optional last input: sinks[H]).")


# -- kv_cache_write(k_cache, v_cache, k, v, positions, seq_ids, page_table) -> (k_cache, v_cache)
def _check_cache(kc: TensorType, vc: TensorType, name: str):
    check(kc.rank == 4 and kc == vc and is_float(kc), f"{name}: caches must be float[NP, PS, Hkv, D], got {kc}, {vc}")
    check(isinstance(kc.shape[1], int), f"{name}: page size must be static, got {kc.shape[1]}")


def _check_table(pt: TensorType, name: str):
    check(pt.dtype in INT and pt.rank == 2, f"{name}: page_table must be int[S, MP], got {pt}")


def slots(positions, seq_ids, page_table, page_size):
    """(page, offset) of each position in the cache."""
    pages = page_table[seq_ids, positions // page_size]
    return pages, positions % page_size


def _write_infer(ts, a):
    kc, vc, k, v, pos, sid, pt = ts
    _check_cache(kc, vc, "kv_cache_write")
    check(k.rank == 3 and k.shape == v.shape and k.shape[1:] == kc.shape[2:] and is_float(k) and is_float(v),
          f"kv_cache_write: k {k} / v {v} do not fit cache {kc}")
    _check_meta(k, pos, sid, "kv_cache_write")
    _check_table(pt, "kv_cache_write")
    return [kc, vc]


def _write_ref(xs, a):
    kc, vc, k, v, pos, sid, pt = xs
    page, off = slots(pos, sid, pt, kc.shape[1])
    kc[page, off] = k.astype(kc.dtype)
    vc[page, off] = v.astype(vc.dtype)
    return [kc, vc]


op("kv_cache_write", aliases={0: 0, 1: 1}, infer=_write_infer, ref=_write_ref, arity=7, traits={SIDE_EFFECT},
   doc="Store K/V rows into their cache pages; outputs alias the cache inputs.")


# -- paged_attention(q, k_cache, v_cache, positions, seq_ids, page_table)
def _paged_infer(ts, a):
    q, kc, vc, pos, sid, pt = ts[:6]
    _check_cache(kc, vc, "paged_attention")
    _check_heads(q, kc.shape[2], kc.shape[3], "paged_attention")
    _check_meta(q, pos, sid, "paged_attention")
    _check_table(pt, "paged_attention")
    _check_sinks(ts, 6, q, "paged_attention")
    return [q]


def _paged_ref(xs, a):
    q, kc, vc, pos, sid, pt = xs[:6]
    out = np.zeros(q.shape, np.float32)
    ps = kc.shape[1]
    for s in np.unique(sid):
        rows = np.nonzero(sid == s)[0]
        kpos = np.arange(int(pos[rows].max()) + 1)
        page, off = slots(kpos, np.full_like(kpos, s), pt, ps)
        out[rows] = _attend(f32(q[rows]), f32(kc[page, off]), f32(vc[page, off]), pos[rows], kpos, a,
                            _sinks(xs, 6))
    return [out.astype(q.dtype)]


op("paged_attention", infer=_paged_infer, ref=_paged_ref, arity=(6, 7), attrs=("scale",),
   defaults=ATTENTION_DEFAULTS,
   doc="Causal GQA attention of each row over its sequence's cached positions 0..p (optional last input: "
       "sinks[H]).")
