"""The paged-attention kernels (reft/backends/cuda/attention.py), checked without a GPU: every
instantiation compiles with NVRTC for sm_80 and sm_90a in bf16 and fp16 with 0 spills and 0 stack,
within the arch's register and shared-memory limits; launch geometry passes check_launch for small and
large batches and contexts; the SASS holds tensor-core MMAs and cp.async; the decode split choice is
unit-tested. Two numpy models replay the kernels' algorithms (prefill's per-tile sequence passes and
masks; decode's page splits, per-warp online softmax, warp merge and combine, with the same split
functions the builders use) and are checked against paged_attention's numpy reference.
"""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("cuda.bindings")

from reft.backends.cuda import arch as archs  # noqa: E402
from reft.backends.cuda import attention as A  # noqa: E402
from reft.backends.cuda import toolchain  # noqa: E402
from reft.backends.cuda.kernel import evaluate  # noqa: E402
from reft.ir import ops  # noqa: E402

needs_nvrtc = pytest.mark.skipif(not toolchain.available(), reason="NVRTC / CUDA headers not installed")

# (heads, kv_heads, head_dim, page_size): tiny test models, a 1B model, an 8B-shaped one
CONFIGS = {"d24": (4, 2, 24, 16), "d32": (8, 4, 32, 32), "d40": (6, 2, 40, 16), "d64": (32, 8, 64, 16),
           "d128": (32, 8, 128, 32)}
# odd shapes, compiled for sm_80 bf16 only: MHA at d96, 7 heads per KV head, MQA with 32 heads, 128-key pages
EXTRA = {"mha96": (12, 12, 96, 16), "g7": (14, 2, 64, 16), "mqa": (32, 1, 128, 128)}
TARGETS = [("sm_80", "bfloat16"), ("sm_80", "float16"), ("sm_90a", "bfloat16"), ("sm_90a", "float16")]
WINDOWS = (0, 96)


def build(arch, dtype, cfg, window, softcap=0.0):
    h, kvh, d, ps = cfg
    kw = dict(heads=h, kv_heads=kvh, head_dim=d, page_size=ps, sliding_window=window, scale=1 / math.sqrt(d),
              softcap=softcap)
    return [A.prefill_kernel(arch, dtype, **kw), *A.decode_kernels(arch, dtype, **kw)]


@pytest.fixture(scope="module")
def compiled():
    """(arch, dtype, config, window) -> [(Kernel, Compiled)] for prefill, decode split, combine."""
    wanted = {(a, dt, c, w): build(a, dt, CONFIGS[c], w) for a, dt in TARGETS for c in CONFIGS for w in WINDOWS}
    wanted.update({("sm_80", "bfloat16", c, 0): build("sm_80", "bfloat16", EXTRA[c], 0) for c in EXTRA})
    wanted[("sm_89", "bfloat16", "d64", 96)] = build("sm_89", "bfloat16", CONFIGS["d64"], 96)
    for arch in ("sm_80", "sm_90a"):   # Gemma 2: soft-capped scores, a window on every other layer
        wanted[(arch, "bfloat16", "softcap", 96)] = build(arch, "bfloat16", (8, 4, 128, 16), 96, softcap=50.0)
    out = {}
    for arch in {k[0] for k in wanted}:
        ks = [k for key, kk in wanted.items() if key[0] == arch for k in kk]
        out.update(toolchain.compile_kernels(ks, arch, jobs=2))
    return {key: [(k, out[k.name]) for k in kk] for key, kk in wanted.items()}


ALL_KEYS = ([(a, dt, c, w) for a, dt in TARGETS for c in CONFIGS for w in WINDOWS]
            + [("sm_80", "bfloat16", c, 0) for c in EXTRA] + [("sm_89", "bfloat16", "d64", 96)]
            + [(a, "bfloat16", "softcap", 96) for a in ("sm_80", "sm_90a")])


@needs_nvrtc
@pytest.mark.parametrize("key", ALL_KEYS, ids=lambda k: "-".join(map(str, k)))
def test_kernels_compile_within_the_arch_limits(compiled, key):
    a = archs.get(key[0])
    for k, c in compiled[key]:
        r = c.resources
        assert r.spill_stores == 0 and r.spill_loads == 0 and r.stack == 0, (k.name, r)
        assert r.registers <= a.regs_per_thread, (k.name, r)
        assert archs.blocks_per_sm(a, k.threads, r.registers, k.smem + r.smem) >= 1, (k.name, r)
        assert k.smem + r.smem <= a.smem_per_block and r.smem <= a.static_smem
        assert c.source.startswith("// attention_") and k.name.startswith("attn_")
        assert [x.name for x in k.args][:7] == ["q", "kc", "vc", "positions", "seq_ids", "page_table", "out"]


@needs_nvrtc
@pytest.mark.parametrize("key", ALL_KEYS, ids=lambda k: "-".join(map(str, k)))
def test_launch_geometry_fits_for_small_and_large_batches(compiled, key):
    a = archs.get(key[0])
    ps = {**CONFIGS, **EXTRA, "softcap": (8, 4, 128, 16)}[key[2]][3]
    for T in (1, 16, 512):
        for MP in (1, 8192 // ps):
            values = {"T": T, "MP": MP, "S": 64, "NP": 4096}
            for k, c in compiled[key]:
                archs.check_launch(a, k.name, k.block, k.launch_grid(values), k.smem, c.resources.registers,
                                   c.resources.smem)
                assert evaluate(k.workspace, values) >= 0


@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_sass_uses_tensor_cores_and_cp_async(compiled, arch):
    for k, c in compiled[(arch, "bfloat16", "d64", 96)][:2]:
        ops_ = toolchain.sass_opcodes(toolchain.sass(c.cubin))
        assert {"HMMA", "LDGSTS", "LDSM"} <= ops_, (k.name, sorted(ops_))


# -- builder logic -----------------------------------------------------------------------------------

def test_heads_per_block_and_padding():
    assert [A.heads_per_block(h, kv) for h, kv in ((4, 2), (32, 8), (14, 2), (32, 1), (48, 1), (12, 12))] == \
        [2, 4, 7, 16, 16, 1]
    assert [A.padded_head_dim(d) for d in (24, 32, 40, 64, 96, 128)] == [32, 32, 48, 64, 96, 128]
    assert A.prefill_tokens_per_block(32, 8) == 16 and A.prefill_tokens_per_block(14, 2) == 9


def test_split_count_follows_batch_context_and_sms():
    for arch in ("sm_80", "sm_90a"):
        minp, target = A.decode_split_params(arch, 32, 8, 16)
        assert minp == A.MIN_SPLIT_KEYS // 16
        # one token over a long context fills the GPU about twice
        assert 2 * archs.get(arch).sms <= (32 // 4) * A.decode_splits(1, 8192 // 16, minp, target) < \
            2 * archs.get(arch).sms + 32 // 4
        # a short page table or a big batch needs fewer splits
        assert A.decode_splits(1, 4, minp, target) == 1
        assert A.decode_splits(64, 512, minp, target) == 1
        for T in (1, 2, 3, 16, 33, 512):
            for MP in (1, 7, 8, 64, 512, 4096):
                n = A.decode_splits(T, MP, minp, target)
                assert 1 <= n <= target <= A.MAX_SPLITS
                k = A.decode_kernels(arch, "bfloat16", heads=32, kv_heads=8, head_dim=64, page_size=16,
                                     sliding_window=0, scale=0.125)
                vals = {"T": T, "MP": MP, "S": 4, "NP": 64}
                assert k[0].launch_grid(vals) == (T, 8, n)
                assert evaluate(k[0].workspace, vals) == (T * 32 * n * 66 * 4 if n > 1 else 0)
                assert k[1].workspace == k[0].workspace


@pytest.mark.parametrize("window", [0, 1, 50, 300])
@pytest.mark.parametrize("page_size", [1, 16, 32])
def test_split_plan_partitions_the_keys_into_page_aligned_shares(window, page_size):
    minp = max(1, A.MIN_SPLIT_KEYS // page_size)
    for nsplit in (1, 2, 5, 64):
        for p in (0, 1, 15, 16, 127, 128, 129, 1000, 4095):
            lo, hi, spans = A.split_plan(p, window, page_size, minp, nsplit)
            assert hi == p and lo == (max(0, p - window + 1) if window else 0)
            assert 1 <= len(spans) <= nsplit
            assert spans[0][0] == lo and spans[-1][1] == p
            for (a, b), (c, _) in zip(spans, spans[1:]):
                assert a <= b and c == b + 1 and c % page_size == 0
            if len(spans) > 1:   # every share but the last is a whole number of >= minp pages
                pps = (spans[0][1] + 1) // page_size - lo // page_size
                assert pps >= minp


@pytest.mark.parametrize("kw,msg", [
    (dict(dtype="float32"), "bfloat16 or float16"),
    (dict(heads=6, kv_heads=4), "not a multiple"),
    (dict(head_dim=100), "head_dim"),
    (dict(head_dim=136), "head_dim"),
    (dict(page_size=0), "page_size"),
    (dict(sliding_window=-1), "sliding_window"),
    (dict(scale=float("nan")), "scale"),
    (dict(softcap=-1.0), "softcap"),
])
def test_bad_configurations_are_one_line_errors(kw, msg):
    args = dict(dtype="bfloat16", heads=8, kv_heads=4, head_dim=64, page_size=16, sliding_window=0, scale=0.125)
    args.update(kw)
    dtype = args.pop("dtype")
    for builder in (A.prefill_kernel, A.decode_kernels):
        with pytest.raises(A.AttentionConfigError, match=msg):
            builder("sm_80", dtype, **args)
    with pytest.raises(Exception, match="unknown CUDA architecture"):
        A.prefill_kernel("sm_70", "bfloat16", heads=8, kv_heads=4, head_dim=64, page_size=16, sliding_window=0,
                         scale=0.125)


def test_names_are_unique_per_instantiation():
    kw = dict(heads=8, kv_heads=4, head_dim=64, page_size=16, sliding_window=0)
    names = {k.name for s in (0.125, 0.1) for dt in ("bfloat16", "float16") for arch in ("sm_80", "sm_90a")
             for k in [A.prefill_kernel(arch, dt, scale=s, **kw), *A.decode_kernels(arch, dt, scale=s, **kw)]}
    # per (scale, dtype): one prefill kernel (arch-independent), a decode and a combine per arch (their
    # split ceiling follows the SM count)
    assert len(names) == 2 * 2 * (1 + 2 + 2)


# -- numpy models of the kernels' algorithms, against the op's reference ------------------------------

LOG2E = math.log2(math.e)


def _round(x: np.ndarray, dtype) -> np.ndarray:
    return x.astype(dtype).astype(np.float32) if dtype is not None else x


def _gather(cache, table, s, keys, lo, hi):
    """Cache rows [len(keys), KVH, D] of sequence s; keys outside [lo, hi] (or on a bad page) are zero,
    as the kernels' zero-filled cp.async."""
    rows = np.zeros((len(keys),) + cache.shape[2:], np.float32)
    for i, j in enumerate(keys):
        if lo <= j <= hi:
            pg = table[s, j // cache.shape[1]]
            if 0 <= pg < cache.shape[0]:
                rows[i] = cache[pg, j % cache.shape[1]]
    return rows


def _scores(qk, scale, softcap):
    """att_score: raw q . k to the exp2 domain, soft-capped first when softcap > 0."""
    if softcap:
        return np.float32(softcap * LOG2E) * np.tanh(qk * np.float32(scale / softcap))
    return qk * np.float32(scale * LOG2E)


def _online(m, l, o, s, v, pdtype):
    """One key tile of the kernels' exp2-domain online softmax; rows x keys scores s (masked -inf)."""
    mx = np.maximum(m, s.max(axis=1))
    base = np.where(mx == -np.inf, 0, mx)
    corr = np.exp2(m - base)
    p = np.exp2(s - base[:, None])
    return mx, l * corr + p.sum(1), o * corr[:, None] + _round(p, pdtype) @ v


def prefill_model(q, kc, vc, pos, sid, table, *, kv_heads, scale, window, S, softcap=0.0, pdtype=None):
    """attention_prefill.cu.j2's algorithm: tiles of TQ tokens x GB heads, one pass per distinct sequence
    of the tile (order of first appearance), BN-key tiles from lo // BN * BN to hi, masks skipped on
    tiles every valid row sees whole."""
    T, H, D = q.shape
    ps, MP, G = kc.shape[1], table.shape[1], H // kv_heads
    gb = A.heads_per_block(H, kv_heads)
    tq = A.BM // gb
    out = np.zeros((T, H, D), np.float32)
    for t0 in range(0, T, tq):
        toks = list(range(t0, min(t0 + tq, T)))
        tseq = [int(sid[t]) if 0 <= sid[t] < S and 0 <= pos[t] and pos[t] // ps < MP else -1 for t in toks]
        passes = []
        for s in dict.fromkeys(x for x in tseq if x >= 0):
            ps_ = [int(pos[t]) for t, x in zip(toks, tseq) if x == s]
            lo = min(max(0, p - window + 1) if window else 0 for p in ps_)
            passes.append((s, lo, max(ps_), min(ps_), tseq.count(s) == len(toks)))
        for h0 in range(0, H, gb):
            kvh = h0 // G
            rows = [(i, t, h0 + g) for i, t in enumerate(toks) for g in range(gb)]
            Q = np.stack([q[t, h].astype(np.float32) for _, t, h in rows])
            rseq = np.array([tseq[i] for i, _, _ in rows])
            rpos = np.array([int(pos[t]) for _, t, _ in rows])
            m, l, o = np.full(len(rows), -np.inf, np.float32), np.zeros(len(rows), np.float32), 0 * Q
            for s, lo, hi, qmin, whole in passes:
                rlo = np.where(rseq == s, np.maximum(0, rpos - window + 1) if window else 0, 1)
                rhi = np.where(rseq == s, rpos, 0)
                for k0 in range(lo // A.BN * A.BN, hi + 1, A.BN):
                    keys = np.arange(k0, k0 + A.BN)
                    K = _gather(kc, table, s, keys, lo, hi)[:, kvh]
                    V = _gather(vc, table, s, keys, lo, hi)[:, kvh]
                    full = whole and k0 + A.BN - 1 <= qmin and (window == 0 or k0 >= hi - window + 1)
                    keep = full | ((keys[None] >= rlo[:, None]) & (keys[None] <= rhi[:, None]))
                    m, l, o = _online(m, l, o, np.where(keep, _scores(Q @ K.T, scale, softcap), -np.inf), V,
                                      pdtype)
            for r, (_, t, h) in enumerate(rows):
                out[t, h] = o[r] / l[r] if l[r] > 0 else 0
    return out


def decode_model(q, kc, vc, pos, sid, table, *, kv_heads, scale, window, S, minp, target, softcap=0.0,
                 pdtype=None):
    """attention_decode.cu.j2's algorithm: nsplit from (T, MP), each token's keys split by split_plan,
    per split BN-key tiles from the first page's first key, each of 4 warps 16 keys of a tile with its own
    online softmax, warps merged, and the splits combined by their maxima."""
    T, H, D = q.shape
    ps, MP, G = kc.shape[1], table.shape[1], H // kv_heads
    nw = A.THREADS // 32
    kwarp = A.BN // nw
    nsplit = A.decode_splits(T, MP, minp, target)
    out = np.zeros((T, H, D), np.float32)
    for t in range(T):
        s, p = int(sid[t]), int(pos[t])
        if not (0 <= s < S and 0 <= p and p // ps < MP):
            continue
        lo, hi, spans = A.split_plan(p, window, ps, minp, nsplit)
        kvh = np.arange(H) // G
        Q = q[t].astype(np.float32)
        parts = []
        for kbeg, kend in spans:
            kt0 = kbeg // ps * ps
            warps = [(np.full(H, -np.inf, np.float32), np.zeros(H, np.float32), np.zeros((H, D), np.float32))
                     for _ in range(nw)]
            for k0 in range(kt0, kend + 1, A.BN):
                for w in range(nw):
                    keys = np.arange(k0 + w * kwarp, k0 + (w + 1) * kwarp)
                    if keys[0] > kend or keys[-1] < kbeg:
                        continue
                    K = _gather(kc, table, s, keys, kbeg, kend)[:, kvh]    # (keys, H, D)
                    V = _gather(vc, table, s, keys, kbeg, kend)[:, kvh]
                    sco = _scores(np.einsum("hd,khd->hk", Q, K), scale, softcap)
                    sco = np.where((keys >= kbeg) & (keys <= kend), sco, -np.inf)
                    m, l, o = warps[w]
                    mx = np.maximum(m, sco.max(1))
                    base = np.where(mx == -np.inf, 0, mx)
                    corr, pr = np.exp2(m - base), np.exp2(sco - base[:, None])
                    warps[w] = (mx, l * corr + pr.sum(1),
                                o * corr[:, None] + np.einsum("hk,khd->hd", _round(pr, pdtype), V))
            M = np.max([w[0] for w in warps], axis=0)
            base = np.where(M == -np.inf, 0, M)
            f = [np.exp2(w[0] - base) for w in warps]
            parts.append((M, sum(fi * w[1] for fi, w in zip(f, warps)),
                          sum(fi[:, None] * w[2] for fi, w in zip(f, warps))))
        if len(parts) == 1:
            M, L, O = parts[0]
            out[t] = O / L[:, None]
            continue
        M = np.max([x[0] for x in parts], axis=0)
        f = [np.exp2(x[0] - M) for x in parts]
        L = sum(fi * x[1] for fi, x in zip(f, parts))
        out[t] = sum(fi[:, None] * x[2] for fi, x in zip(f, parts)) / L[:, None]
    return out


def random_batch(rng, *, heads, kv_heads, head_dim, page_size, chunks, S, dtype, shuffle=True):
    """A packed batch of (sequence, first position, tokens) chunks over a shuffled page pool; the cache
    holds every sequence's keys up to its chunk's end (earlier ones as if cached by previous steps)."""
    ctx = {s: p0 + n for s, p0, n in chunks}
    MP = max(-(-c // page_size) for c in ctx.values()) + 1
    NP = S * MP + 3
    perm = rng.permutation(NP)
    table = np.full((S, MP), NP + 7, np.int32)   # pages past a context hold ids outside the pool
    for s, c in ctx.items():
        n = -(-c // page_size)
        table[s, :n] = perm[s * MP:s * MP + n]
    kc = rng.standard_normal((NP, page_size, kv_heads, head_dim)).astype(dtype)
    vc = rng.standard_normal((NP, page_size, kv_heads, head_dim)).astype(dtype)
    pos = np.concatenate([np.arange(p0, p0 + n) for _, p0, n in chunks]).astype(np.int32)
    sid = np.concatenate([np.full(n, s) for s, _, n in chunks]).astype(np.int32)
    if shuffle:
        order = rng.permutation(len(pos))
        pos, sid = pos[order], sid[order]
    q = rng.standard_normal((len(pos), heads, head_dim)).astype(dtype)
    return q, kc, vc, pos, sid, table


def reference(q, kc, vc, pos, sid, table, scale, window, softcap=0.0):
    d = ops.get("paged_attention")
    attrs = {"scale": scale, "sliding_window": window}
    if softcap:
        attrs["softcap"] = softcap
    return d.ref([q, kc, vc, pos, sid, table], d.full_attrs(attrs))[0]


BATCHES = {
    "prefill": [(0, 0, 150)],
    "chunked+decode": [(1, 40, 70), (0, 200, 1), (3, 17, 1), (2, 0, 33)],
    "decode": [(s, p, 1) for s, p in enumerate([0, 5, 63, 64, 200, 333, 1023, 15])],
    "long-decode": [(0, 700, 1), (2, 129, 1)],
}


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("window", [0, 37])
@pytest.mark.parametrize("shape", [(4, 2, 24, 16), (6, 2, 40, 32), (32, 1, 16, 16)], ids=["g2", "g3", "mqa"])
def test_prefill_model_matches_the_reference(batch, window, shape):
    h, kvh, d, ps = shape
    rng = np.random.default_rng(hash((batch, window, shape)) % 2**32)
    chunks = BATCHES[batch]
    S = max(s for s, _, _ in chunks) + 2
    args = random_batch(rng, heads=h, kv_heads=kvh, head_dim=d, page_size=ps, chunks=chunks, S=S, dtype=np.float32)
    got = prefill_model(*args, kv_heads=kvh, scale=d ** -0.5, window=window, S=S)
    np.testing.assert_allclose(got, reference(*args, d ** -0.5, window), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("window", [0, 37, 300])
@pytest.mark.parametrize("shape", [(4, 2, 24, 16), (8, 2, 32, 32), (6, 6, 16, 1)], ids=["g2", "g4", "mha-ps1"])
def test_decode_model_matches_the_reference(batch, window, shape):
    h, kvh, d, ps = shape
    rng = np.random.default_rng(hash((batch, window, shape, 1)) % 2**32)
    chunks = BATCHES[batch]
    S = max(s for s, _, _ in chunks) + 2
    args = random_batch(rng, heads=h, kv_heads=kvh, head_dim=d, page_size=ps, chunks=chunks, S=S, dtype=np.float32)
    want = reference(*args, d ** -0.5, window)
    for minp, target in [A.decode_split_params("sm_90a", h, kvh, ps), (1, 64), (3, 200)]:
        got = decode_model(*args, kv_heads=kvh, scale=d ** -0.5, window=window, S=S, minp=minp, target=target)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"minp={minp} target={target}")


@pytest.mark.parametrize("dtype,pdtype,tol", [(np.float16, np.float16, 4e-3),
                                              (ml_dtypes.bfloat16, ml_dtypes.bfloat16, 3e-2)])
def test_models_in_half_precision_stay_close_to_the_reference(dtype, pdtype, tol):
    """Half inputs, probabilities rounded to the half type before P.V as the kernels do."""
    rng = np.random.default_rng(7)
    chunks = BATCHES["chunked+decode"]
    args = random_batch(rng, heads=8, kv_heads=2, head_dim=32, page_size=16, chunks=chunks, S=5, dtype=dtype)
    want = reference(*args, 32 ** -0.5, 0).astype(np.float32)
    got = prefill_model(*args, kv_heads=2, scale=32 ** -0.5, window=0, S=5, pdtype=pdtype)
    np.testing.assert_allclose(got, want, atol=tol)
    got = decode_model(*args, kv_heads=2, scale=32 ** -0.5, window=0, S=5, minp=1, target=5, pdtype=pdtype)
    np.testing.assert_allclose(got, want, atol=tol)


def test_models_give_zeros_for_invalid_tokens():
    rng = np.random.default_rng(3)
    q, kc, vc, pos, sid, table = random_batch(rng, heads=4, kv_heads=2, head_dim=16, page_size=16,
                                              chunks=[(0, 0, 5), (1, 3, 2)], S=2, dtype=np.float32)
    sid[1], pos[3] = 9, table.shape[1] * 16   # a sequence id past S, a position past the page table
    for got in (prefill_model(q, kc, vc, pos, sid, table, kv_heads=2, scale=0.25, window=0, S=2),
                decode_model(q, kc, vc, pos, sid, table, kv_heads=2, scale=0.25, window=0, S=2, minp=1, target=4)):
        assert not got[1].any() and not got[3].any() and got[0].any()


@pytest.mark.skipif("softcap" not in ops.get("paged_attention").full_attrs({"scale": 1.0}),
                    reason="paged_attention has no softcap attribute")
@pytest.mark.parametrize("window", [0, 37])
def test_models_with_soft_capped_scores_match_the_reference(window):
    rng = np.random.default_rng(11)
    chunks = BATCHES["chunked+decode"]
    args = random_batch(rng, heads=8, kv_heads=4, head_dim=32, page_size=16, chunks=chunks, S=5, dtype=np.float32)
    args[0][:] *= 8   # large scores, so that the cap matters
    want = reference(*args, 32 ** -0.5, window, softcap=5.0)
    assert not np.allclose(want, reference(*args, 32 ** -0.5, window), atol=1e-2)
    got = prefill_model(*args, kv_heads=4, scale=32 ** -0.5, window=window, S=5, softcap=5.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    got = decode_model(*args, kv_heads=4, scale=32 ** -0.5, window=window, S=5, minp=1, target=8, softcap=5.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
