"""Op records: shape/dtype rules agree with the numpy references, and the trickier references
agree with torch / transformers (the independent oracle)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from reft.ir import ops
from reft.ir.types import TensorType, bind, dtype_name
from strategies import (OP_CASES, fill_cache, heads, input_types, op_cases, page_layout, rand,
                              symbolize, token_batch)

CASES = settings(max_examples=40, deadline=None)
NON_SOURCE = sorted(n for n, d in ops.REGISTRY.items() if ops.SOURCE not in d.traits)


def test_every_op_has_a_case():
    assert sorted(OP_CASES) == NON_SOURCE


def test_every_op_has_rule_and_reference():
    for name in NON_SOURCE:
        d = ops.get(name)
        assert d.infer is not None and d.ref is not None, name


def _run(op, xs, attrs):
    d = ops.get(op)
    return d.ref([x.copy() for x in xs], d.full_attrs(attrs))


@pytest.mark.parametrize("op", NON_SOURCE)
def test_infer_matches_reference(op):
    @CASES
    @given(OP_CASES[op])
    def check(case):
        name, xs, attrs = case
        want = ops.infer_types(name, input_types(xs), attrs)
        got = _run(name, xs, attrs)
        assert len(got) == len(want)
        for t, a in zip(want, got):
            assert isinstance(a, np.ndarray) or np.isscalar(a)
            assert TensorType(tuple(np.shape(a)), dtype_name(a.dtype)) == t

    check()


@pytest.mark.parametrize("op", NON_SOURCE)
def test_infer_with_symbolic_dims(op):
    @CASES
    @given(OP_CASES[op])
    def check(case):
        name, xs, attrs = case
        types, sym_attrs, sizes = symbolize(name, xs, attrs)
        want = ops.infer_types(name, types, sym_attrs)
        got = _run(name, xs, sym_attrs)       # the reference also runs with symbolic attrs
        assert len(got) == len(want)
        for t, a in zip(want, got):
            assert bind(t.shape, sizes) == tuple(np.shape(a)) and t.dtype == dtype_name(a.dtype)

    check()


@pytest.mark.parametrize("op", sorted(set(NON_SOURCE) - ops.ops_with(ops.SIDE_EFFECT)))
def test_reference_leaves_inputs_alone(op):
    @settings(max_examples=15, deadline=None)
    @given(OP_CASES[op])
    def check(case):
        name, xs, attrs = case
        before = [x.copy() for x in xs]
        ops.get(name).ref(xs, ops.get(name).full_attrs(attrs))
        for a, b in zip(xs, before):
            np.testing.assert_array_equal(a, b)

    check()


@settings(max_examples=30, deadline=None)
@given(op_cases())
def test_op_cases_any(case):
    name, xs, attrs = case
    assert name in ops.REGISTRY and all(isinstance(x, np.ndarray) for x in xs)


# Malformed inputs are misuse: the rule must raise TypeError (the builder and verify rely on it),
# never an IndexError from looking at a dim that is not there.
T32 = TensorType


@pytest.mark.parametrize("op,types,attrs", [
    ("rms_norm", [T32((), "float32"), T32((1,), "float32")], {"eps": 1e-6}),
    ("causal_attention", [T32((2, 4, 8), "float32"), T32((2,), "float32"), T32((2,), "float32"),
                          T32((2,), "int32"), T32((2,), "int32")], {"scale": 1.0}),
], ids=["rms_norm_scalar", "causal_attention_rank1_k"])
def test_infer_rank_misuse_is_type_error(op, types, attrs):
    with pytest.raises(TypeError):
        ops.infer_types(op, types, attrs)


@pytest.mark.parametrize("op,types,attrs", [
    ("add", [T32(("T", 4), "float32"), T32((3, 4), "float32")], {}),
    ("add", [T32((4,), "int32"), T32((4,), "float32")], {}),
    ("linear", [T32(("T", 4), "float32"), T32((8, 3), "float32")], {}),
    ("linear", [T32(("T", 4), "float32"), T32((8, 4), "float32"), T32((4,), "float32")], {}),
    ("rms_norm", [T32(("T", 4), "float32"), T32((5,), "float32")], {"eps": 1e-6}),
    ("rms_norm", [T32(("T", 4), "float32"), T32((4,), "float32")], {}),
    ("rope", [T32(("T", 2, 8), "float32"), T32(("T",), "int32")], {"theta": 1e4, "rotary_dim": 10}),
    ("rope", [T32(("T", 2, 8), "float32"), T32(("T",), "int32")], {"theta": 1e4, "rotary_dim": 3}),
    ("rope", [T32(("T", 2, 8), "float32"), T32(("T",), "int32")], {"theta": 1e4, "rotary_dim": 8, "scaling": "dynamic"}),
    ("rope", [T32(("T", 2, 8), "float32"), T32(("T",), "int32")],
     {"theta": 1e4, "rotary_dim": 8, "scaling": "yarn", "factor": 0.0}),
    ("reshape", [T32(("T", 4), "float32")], {"shape": ("T", 3)}),
    ("reshape", [T32(("T", 4), "float32")], {"shape": ("S", 4)}),
    ("split", [T32(("T", 4), "float32")], {"axis": 0, "sizes": (2, 2)}),
    ("split", [T32(("T", 4), "float32")], {"axis": 1, "sizes": (2, 1)}),
    ("concat", [T32(("T", 4), "float32"), T32(("T", 4), "float16")], {"axis": 1}),
    ("transpose", [T32(("T", 4), "float32")], {"perm": (0, 0)}),
    ("causal_attention", [T32(("T", 3, 8), "float32"), T32(("T", 2, 8), "float32"), T32(("T", 2, 8), "float32"),
                          T32(("T",), "int32"), T32(("T",), "int32")], {"scale": 1.0}),
    ("causal_attention", [T32(("T", 4, 8), "float32"), T32(("T", 2, 8), "float32"), T32(("T", 2, 8), "float32"),
                          T32(("T",), "int32"), T32(("T",), "int32"), T32((2,), "float32")], {"scale": 1.0}),  # sinks per KV head
    ("paged_attention", [T32(("T", 4, 8), "float32"), T32(("NP", 16, 2, 4), "float32"), T32(("NP", 16, 2, 4), "float32"),
                         T32(("T",), "int32"), T32(("T",), "int32"), T32(("S", "MP"), "int32")], {"scale": 1.0}),
    ("paged_attention", [T32(("T", 4, 8), "float32"), T32(("NP", "PS", 2, 8), "float32"), T32(("NP", "PS", 2, 8), "float32"),
                         T32(("T",), "int32"), T32(("T",), "int32"), T32(("S", "MP"), "int32")], {"scale": 1.0}),
    ("kv_cache_write", [T32(("NP", 16, 2, 8), "float32"), T32(("NP", 16, 2, 8), "float32"), T32(("T", 2, 4), "float32"),
                        T32(("T", 2, 4), "float32"), T32(("T",), "int32"), T32(("T",), "int32"),
                        T32(("S", "MP"), "int32")], {}),
    ("embedding", [T32(("T",), "float32"), T32((10, 4), "float32")], {"dtype": "float32"}),
    ("embedding", [T32(("T",), "int32"), T32((10, 4), "float32")], {"dtype": "int32"}),
    ("cast", [T32(("T",), "float32")], {"dtype": "float64"}),
    ("take_rows", [T32(("T", 4), "float32"), T32(("R",), "float32")], {}),
    ("silu", [T32(("T",), "float32")], {"alpha": 1.0}),
    ("silu", [], {}),
])
def test_infer_rejects_misuse(op, types, attrs):
    with pytest.raises(TypeError):
        ops.infer_types(op, types, attrs)


# -- values against torch -------------------------------------------------------------

def ref(op, *xs, **attrs):
    d = ops.get(op)
    return d.ref(list(xs), d.full_attrs(attrs))


def t(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float32))


VALUES = settings(max_examples=25, deadline=None)


@VALUES
@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(1, 16), st.sampled_from([1e-6, 1e-5]))
def test_rms_norm_vs_torch(seed, T, D, eps):
    rng = np.random.default_rng(seed)
    x, w = rand(rng, (T, D), "float32", -3, 3), rand(rng, (D,), "float32")
    (y,) = ref("rms_norm", x, w, eps=eps)
    want = F.rms_norm(t(x), (D,), t(w), eps=eps).numpy()
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


@VALUES
@given(st.integers(0, 2**32 - 1), st.sampled_from(["float32", "float16", "bfloat16"]))
def test_silu_gelu_softmax_vs_torch(seed, dt):
    rng = np.random.default_rng(seed)
    x = rand(rng, (5, 7), dt, -30, 30) if seed % 2 else rand(rng, (5, 7), dt, -4, 4)
    tol = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 8e-3}[dt]
    xt = t(x.astype(np.float32))
    for op, fn in [("silu", F.silu), ("gelu_tanh", lambda v: F.gelu(v, approximate="tanh")),
                   ("softmax", lambda v: torch.softmax(v, -1))]:
        with np.errstate(over="ignore"):    # exp overflow for very negative x is harmless
            (y,) = ref(op, x)
        assert y.dtype == x.dtype
        np.testing.assert_allclose(y.astype(np.float32), fn(xt).numpy(), rtol=tol, atol=tol, err_msg=op)


def _hf_inv_freq(kind, attrs, head_dim):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rp = {"rope_type": kind, "rope_theta": attrs["theta"]}
    if kind == "linear":
        rp["factor"] = attrs["factor"]
    if kind == "llama3":
        rp.update(factor=attrs["factor"], low_freq_factor=attrs["low_freq_factor"],
                  high_freq_factor=attrs["high_freq_factor"],
                  original_max_position_embeddings=attrs["original_max_position"])
    cfg = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                      max_position_embeddings=attrs.get("original_max_position", 8192) * 4,
                      rope_parameters=rp)
    if kind == "default":
        inv, scaling = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        inv, scaling = ROPE_INIT_FUNCTIONS[kind](cfg)
    assert scaling == 1.0
    return inv


ROPE_KINDS = {
    "default": {},
    "linear": {"factor": 4.0},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position": 64},
}


@pytest.mark.parametrize("kind", sorted(ROPE_KINDS))
@VALUES
@given(seed=st.integers(0, 2**32 - 1), T=st.integers(1, 6), H=st.integers(1, 3),
       half=st.integers(1, 16), theta=st.sampled_from([10000.0, 500000.0, 1000.0]))
def test_rope_vs_transformers(kind, seed, T, H, half, theta):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    D = 2 * half
    attrs = {"theta": theta, "rotary_dim": D, "scaling": kind, **ROPE_KINDS[kind]}
    rng = np.random.default_rng(seed)
    q, k = rand(rng, (T, H, D), "float32"), rand(rng, (T, H, D), "float32")
    # positions stay small: numpy's and torch's float32 pow differ by an ulp in ~10% of the
    # inverse frequencies, which moves the angle by up to pos * 6e-8 (64 * 6e-8 = 3.8e-6 rad,
    # so up to ~2e-5 on values of size 5: the atol below)
    pos = rng.integers(0, 64, size=T).astype(np.int64)
    inv = _hf_inv_freq(kind, attrs, D)
    np.testing.assert_allclose(ops.nn.rope_inv_freq(ops.get("rope").full_attrs(attrs)), inv.numpy(), rtol=1e-6)
    freqs = torch.from_numpy(pos)[:, None].float() * inv[None, :]
    emb = torch.cat([freqs, freqs], -1)                                         # (T, D)
    qh, kh = apply_rotary_pos_emb(t(q).transpose(0, 1)[None], t(k).transpose(0, 1)[None],
                                  emb.cos()[None], emb.sin()[None])              # (1, H, T, D)
    (q2,) = ref("rope", q, pos, **attrs)
    (k2,) = ref("rope", k, pos, **attrs)
    np.testing.assert_allclose(q2, qh[0].transpose(0, 1).numpy(), rtol=1e-5, atol=3e-5)
    np.testing.assert_allclose(k2, kh[0].transpose(0, 1).numpy(), rtol=1e-5, atol=3e-5)


@VALUES
@given(seed=st.integers(0, 2**32 - 1), T=st.integers(1, 5), half=st.integers(1, 4), extra=st.integers(1, 6))
def test_rope_partial_rotary_leaves_the_rest(seed, T, half, extra):
    """rotary_dim < head dim: the first rotary_dim dims rotate as a head of that size; the rest pass."""
    rng = np.random.default_rng(seed)
    r = 2 * half
    x = rand(rng, (T, 2, r + extra), "float32")
    pos = rng.integers(0, 50, size=T).astype(np.int32)
    (y,) = ref("rope", x, pos, theta=10000.0, rotary_dim=r)
    (y_rot,) = ref("rope", np.ascontiguousarray(x[..., :r]), pos, theta=10000.0, rotary_dim=r)
    np.testing.assert_array_equal(y[..., r:], x[..., r:])
    np.testing.assert_allclose(y[..., :r], y_rot, rtol=1e-6, atol=1e-6)


def _sdpa(q, k, v, qpos, qsid, kpos, ksid, scale, window):
    """torch SDPA with an explicit boolean mask; q (Tq, H, D), k/v (L, Hkv, D)."""
    H, Hkv = q.shape[1], k.shape[1]
    mask = (ksid[None, :] == qsid[:, None]) & (kpos[None, :] <= qpos[:, None])
    if window:
        mask &= (qpos[:, None] - kpos[None, :]) < window
    qt = t(q).transpose(0, 1)                                                   # (H, Tq, D)
    kt = t(k).transpose(0, 1).repeat_interleave(H // Hkv, 0)                   # (H, L, D)
    vt = t(v).transpose(0, 1).repeat_interleave(H // Hkv, 0)
    o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=torch.from_numpy(mask), scale=scale)
    return o.transpose(0, 1).numpy()


@VALUES
@given(seed=st.integers(0, 2**32 - 1), hd=heads(), batch=token_batch(), window=st.sampled_from([0, 0, 1, 2, 3]),
       scale=st.sampled_from([None, 1.0, 0.25]))
def test_causal_attention_vs_sdpa(seed, hd, batch, window, scale):
    H, Hkv, D = hd
    _, sid, pos = batch
    rng = np.random.default_rng(seed)
    T = len(sid)
    q, k, v = rand(rng, (T, H, D), "float32"), rand(rng, (T, Hkv, D), "float32"), rand(rng, (T, Hkv, D), "float32")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    (o,) = ref("causal_attention", q, k, v, pos, sid, scale=scale, sliding_window=window)
    want = _sdpa(q, k, v, pos, sid, pos, sid, scale, window)
    np.testing.assert_allclose(o, want, rtol=1e-5, atol=1e-5)


def test_causal_attention_gqa_groups_by_consecutive_heads():
    """Query head h reads KV head h // (H / Hkv): heads 0,1 -> kv 0 and heads 2,3 -> kv 1."""
    rng = np.random.default_rng(0)
    T, D = 4, 3
    q = rand(rng, (T, 4, D), "float32")
    k, v = rand(rng, (T, 2, D), "float32"), rand(rng, (T, 2, D), "float32")
    pos, sid = np.arange(T), np.zeros(T, np.int64)
    (o,) = ref("causal_attention", q, k, v, pos, sid, scale=0.5)
    for h in range(4):
        (oh,) = ref("causal_attention", q[:, h:h + 1].copy(), k[:, h // 2:h // 2 + 1].copy(),
                    v[:, h // 2:h // 2 + 1].copy(), pos, sid, scale=0.5)
        np.testing.assert_allclose(o[:, h], oh[:, 0], rtol=1e-6)


# -- paged KV: writes in shuffled pages, then attention over pages == causal attention -----

def _nan_cache(n_pages, ps, Hkv, D):
    """Unwritten slots hold NaN, so reading one would show in the result."""
    return np.full((n_pages, ps, Hkv, D), np.nan, np.float32), np.full((n_pages, ps, Hkv, D), np.nan, np.float32)


@st.composite
def full_sequences(draw):
    """Several sequences of lengths 1..8, all tokens in one interleaved batch (prefill)."""
    n = draw(st.integers(1, 3))
    lens = draw(st.lists(st.integers(1, 8), min_size=n, max_size=n))
    seqs = [(s, 0, L) for s, L in enumerate(lens)]
    sid = np.concatenate([np.full(L, s) for s, L in enumerate(lens)]).astype(np.int64)
    pos = np.concatenate([np.arange(L) for L in lens]).astype(np.int64)
    order = np.asarray(draw(st.permutations(range(len(sid)))), np.int64)
    return seqs, sid[order], pos[order]


@VALUES
@given(seed=st.integers(0, 2**32 - 1), hd=heads(), batch=full_sequences(), ps=st.integers(1, 4),
       window=st.sampled_from([0, 0, 2, 3]), data=st.data())
def test_paged_prefill_equals_causal(seed, hd, batch, ps, window, data):
    H, Hkv, D = hd
    seqs, sid, pos = batch
    rng = np.random.default_rng(seed)
    T = len(sid)
    q, k, v = rand(rng, (T, H, D), "float32"), rand(rng, (T, Hkv, D), "float32"), rand(rng, (T, Hkv, D), "float32")
    table, n_pages = page_layout(data.draw, seqs, ps)
    kc, vc = _nan_cache(n_pages, ps, Hkv, D)
    kc2, vc2 = ref("kv_cache_write", kc, vc, k, v, pos, sid, table)
    assert kc2 is kc and vc2 is vc                       # outputs alias the cache inputs
    (o,) = ref("paged_attention", q, kc2, vc2, pos, sid, table, scale=0.5, sliding_window=window)
    (want,) = ref("causal_attention", q, k, v, pos, sid, scale=0.5, sliding_window=window)
    np.testing.assert_allclose(o, want, rtol=1e-6, atol=1e-6)


@VALUES
@given(seed=st.integers(0, 2**32 - 1), hd=heads(), batch=full_sequences(), ps=st.integers(1, 4),
       window=st.sampled_from([0, 2]), data=st.data())
def test_paged_chunked_and_decode_equal_causal(seed, hd, batch, ps, window, data):
    """Each sequence is fed in chunks (chunked prefill down to single-token decode steps), the
    steps of different sequences mixed into shared batches; every row's paged result equals
    the causal attention over the whole sequence."""
    H, Hkv, D = hd
    seqs, _, _ = batch
    rng = np.random.default_rng(seed)
    lens = {s: L for s, _, L in seqs}
    Q = {s: rand(rng, (L, H, D), "float32") for s, L in lens.items()}
    K = {s: rand(rng, (L, Hkv, D), "float32") for s, L in lens.items()}
    V = {s: rand(rng, (L, Hkv, D), "float32") for s, L in lens.items()}
    table, n_pages = page_layout(data.draw, seqs, ps)
    kc, vc = _nan_cache(n_pages, ps, Hkv, D)
    done = {s: 0 for s in lens}
    while pending := [s for s in lens if done[s] < lens[s]]:
        rows = []          # (seq, position) in this step's batch
        for s in data.draw(st.sets(st.sampled_from(pending), min_size=1), label="sequences this step"):
            left = lens[s] - done[s]
            n = left - data.draw(st.integers(0, left - 1), label="tokens held back")   # 1 = decode
            rows += [(s, p) for p in range(done[s], done[s] + n)]
            done[s] += n
        rows = [rows[i] for i in data.draw(st.permutations(range(len(rows))), label="order")]
        sid = np.array([s for s, _ in rows], np.int64)
        pos = np.array([p for _, p in rows], np.int64)
        q = np.stack([Q[s][p] for s, p in rows])
        k = np.stack([K[s][p] for s, p in rows])
        v = np.stack([V[s][p] for s, p in rows])
        kc, vc = ref("kv_cache_write", kc, vc, k, v, pos, sid, table)
        (o,) = ref("paged_attention", q, kc, vc, pos, sid, table, scale=0.7, sliding_window=window)
        for i, (s, p) in enumerate(rows):
            L = lens[s]
            (full,) = ref("causal_attention", Q[s], K[s], V[s], np.arange(L), np.zeros(L, np.int64),
                          scale=0.7, sliding_window=window)
            np.testing.assert_allclose(o[i], full[p], rtol=1e-6, atol=1e-6)


@VALUES
@given(seed=st.integers(0, 2**32 - 1), hd=heads(), batch=token_batch(max_past=8), ps=st.integers(1, 4),
       dt=st.sampled_from(["float16", "bfloat16"]), data=st.data())
def test_paged_attention_vs_sdpa_low_precision_cache(seed, hd, batch, ps, dt, data):
    """Mixed batch (decode rows and prefill chunks of several sequences) over a bf16/f16 cache:
    paged attention == SDPA over the cache contents rounded to the cache dtype."""
    H, Hkv, D = hd
    seqs, sid, pos = batch
    rng = np.random.default_rng(seed)
    table, n_pages = page_layout(data.draw, seqs, ps)
    kc = np.zeros((n_pages, ps, Hkv, D), rand(rng, (1,), dt).dtype)
    vc = np.zeros_like(kc)
    kh = {s: rand(rng, (past + new, Hkv, D), "float32") for s, past, new in seqs}
    vh = {s: rand(rng, (past + new, Hkv, D), "float32") for s, past, new in seqs}
    fill_cache(kc, vc, kh, vh, seqs, table)
    q = rand(rng, (len(sid), H, D), "float32")
    (o,) = ref("paged_attention", q, kc, vc, pos, sid, table, scale=0.5)
    kall = np.concatenate([kh[s] for s, _, _ in seqs]).astype(kc.dtype).astype(np.float32)
    vall = np.concatenate([vh[s] for s, _, _ in seqs]).astype(kc.dtype).astype(np.float32)
    ksid = np.concatenate([np.full(p + n, s) for s, p, n in seqs])
    kpos = np.concatenate([np.arange(p + n) for s, p, n in seqs])
    want = _sdpa(q, kall, vall, pos, sid, kpos, ksid, 0.5, 0)
    np.testing.assert_allclose(o, want, rtol=1e-5, atol=1e-5)


def test_kv_cache_write_slots():
    """Position p of sequence s lands in page page_table[s, p // PS] at offset p % PS."""
    ps, Hkv, D = 2, 1, 1
    table = np.array([[3, 0, 0], [1, 2, 4]], np.int32)
    kc, vc = np.zeros((5, ps, Hkv, D), np.float32), np.zeros((5, ps, Hkv, D), np.float32)
    pos = np.array([0, 1, 0, 1, 2, 3, 4], np.int32)
    sid = np.array([0, 0, 1, 1, 1, 1, 1], np.int32)
    k = np.arange(1, 8, dtype=np.float32).reshape(7, 1, 1)
    ref("kv_cache_write", kc, vc, k, -k, pos, sid, table)
    assert kc[3, :, 0, 0].tolist() == [1, 2]
    assert kc[1, :, 0, 0].tolist() == [3, 4] and kc[2, :, 0, 0].tolist() == [5, 6]
    assert kc[4, :, 0, 0].tolist() == [7, 0] and kc[0].sum() == 0
    np.testing.assert_array_equal(vc, -kc)
