"""The quantized prompt GEMM (reft/backends/cuda/qgemm.py), without a GPU: every quantized format
compiles for sm_80 and sm_90a with HMMA (mma.sync), ldmatrix and cp.async in its SASS, 0 spills and
0 stack; launches of tiny and 1B-sized weights pass arch.check_launch; bad requests fail with one
line.

A numpy model of the kernel (`qgemm_model`) replays its index arithmetic with the builder's
constants: which thread dequantizes which 8 values of which weight row into which shared-memory
slot (the GLU row arrangement included), the cp.async A tile, the ldmatrix row addresses, and
where each accumulator fragment lands in `out`; ldmatrix and mma.sync m16n8k16 are emulated from
the fragment layouts of the PTX ISA. It is compared with the float reference of linear /
linear_glu on the dequantized weight.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cuda.bindings")

from test_gemv import bf16_values, decode_unit, load_unit, random_weight, weight_values  # noqa: E402

from reft.backends.cuda import arch as archs  # noqa: E402
from reft.backends.cuda import toolchain  # noqa: E402
from reft.backends.cuda.gemv import FORMATS, GemvError  # noqa: E402
from reft.backends.cuda.kernel import cdiv  # noqa: E402
from reft.backends.cuda.qgemm import WIDE_N, choose_qtile, qgemm_kernel  # noqa: E402
from reft.ir.ops.core import _gelu_tanh, _silu  # noqa: E402

pytestmark = pytest.mark.skipif(not toolchain.available(), reason="NVRTC / CUDA headers not installed")

ARCHS = ["sm_80", "sm_90a"]
QDTYPES = [d for d, f in FORMATS.items() if f.quantized]


def small_k(wdtype: str) -> int:
    return 256 if FORMATS[wdtype].k_multiple == 256 else 64


def _variants():
    """(arch, wdtype, dtype, N, K, epilogue, bias, residual, out_dtype) of every compiled kernel."""
    out = []
    for arch in ARCHS:
        for wd in QDTYPES:
            k = small_k(wd)
            out.append((arch, wd, "bfloat16", 64, k, "none", True, True, "float32"))
            out.append((arch, wd, "bfloat16", 64, k, "silu", False, False, "half"))
        for wd in ("q8_0", "q4_k"):
            out.append((arch, wd, "float16", 64, small_k(wd), "gelu_tanh", True, False, "float16"))
            for n, k, ep in ((2048, 2048, "none"), (8192, 2048, "silu"), (128256, 2048, "none")):   # 1B
                out.append((arch, wd, "bfloat16", n, k, ep, False, n == 2048, "float32" if ep == "none" else "half"))
    return out


VARIANTS = _variants()


def build(v):
    arch, wd, dt, n, k, ep, bias, res, od = v
    return qgemm_kernel(arch, wd, dt, K=k, N=n, epilogue=ep, bias=bias, residual=res, out_dtype=od)


@pytest.fixture(scope="session")
def qcompiled():
    out = {}
    for arch in ARCHS:
        ks = [build(v) for v in VARIANTS if v[0] == arch]
        out.update({(arch, name): c for name, c in toolchain.compile_kernels(ks, arch, jobs=2).items()})
    return out


@pytest.mark.parametrize("v", VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_compiles_with_tensor_cores_within_limits(qcompiled, v):
    k = build(v)
    c = qcompiled[(v[0], k.name)]
    r = c.resources
    a = archs.get(v[0])
    assert r.spill_stores == 0 and r.spill_loads == 0 and r.stack == 0, (k.name, r)
    assert r.smem == choose_qtile(v[0], v[3], v[5] != "none").smem() and k.smem == 0
    assert archs.blocks_per_sm(a, k.threads, r.registers, r.smem) >= 2   # __launch_bounds__(threads, 2)
    assert c.source.startswith("// qgemm_")
    for M in (9, 64, 512, 4096):
        grid = k.launch_grid({"M": M, "N": v[3], "K": v[4]})
        archs.check_launch(a, k.name, k.block, grid, k.smem, r.registers, r.smem)
    if v[3] == 64 and v[5] == "none":   # one SASS listing per format and arch
        ops = toolchain.sass_opcodes(toolchain.sass(c.cubin))
        assert {"HMMA", "LDSM", "LDGSTS", "BAR"} <= ops, ops


TINY = [(64, 64), (64, 128), (64, 320), (512, 64), (192, 64), (96, 64)]      # (N, K)
ONE_B = [(2048, 2048), (512, 2048), (3072, 2048), (8192, 2048), (2048, 8192), (128256, 2048)]


@pytest.mark.parametrize("arch", list(archs.ARCHS))
def test_tiles_and_launches_fit_the_arch(arch):
    a = archs.get(arch)
    for wd in QDTYPES:
        for n, k in TINY + ONE_B:
            if k % FORMATS[wd].k_multiple:
                continue
            for ep in ("none", "silu"):
                t = choose_qtile(arch, n, ep != "none")
                kern = qgemm_kernel(arch, wd, "bfloat16", K=k, N=n, epilogue=ep)
                assert kern.threads == t.threads and t.smem() <= a.static_smem
                assert t.bn == (128 if (2 * n if ep != "none" else n) >= WIDE_N else 64)
                for M in (9, 512, 8192):
                    grid = kern.launch_grid({"M": M, "N": n, "K": k})
                    assert grid == (cdiv(n, t.bn // (2 if ep != "none" else 1)), cdiv(M, t.bm), 1)
                    regs = min(a.regs_per_thread, 65536 // (2 * t.threads))   # __launch_bounds__(threads, 2)
                    archs.check_launch(a, kern.name, kern.block, grid, kern.smem, regs, t.smem())


@pytest.mark.parametrize("kw,match", [
    (dict(wdtype="bfloat16"), "not quantized"),
    (dict(wdtype="q2_k"), "unsupported weight dtype"),
    (dict(wdtype="int8", K=40), "multiple of 32"),
    (dict(wdtype="q4_k", K=64), "multiple of 256"),
    (dict(dtype="float32"), "activation dtype"),
    (dict(epilogue="swiglu"), "unknown epilogue"),
    (dict(out_dtype="bfloat16", dtype="float16"), "out_dtype"),
    (dict(N=-1), "N must be"),
])
def test_bad_requests_fail_with_one_line(kw, match):
    args = dict(arch="sm_90a", wdtype="q8_0", dtype="bfloat16", K=64, N=64) | kw
    with pytest.raises(GemvError) as e:
        qgemm_kernel(args.pop("arch"), args.pop("wdtype"), args.pop("dtype"), **args)
    assert match in str(e.value) and "\n" not in str(e.value)


# -- a numpy model of the kernel's index arithmetic, with ldmatrix / mma.sync per the PTX ISA ------
LANES = np.arange(32)


def ldmatrix_x4(smem: np.ndarray, addr: np.ndarray) -> np.ndarray:
    """regs[lane, j, e]: lane l gives the address (element index) of row l % 8 of matrix l // 8;
    thread t receives elements 2 (t % 4) + e of row t // 4 of each matrix j."""
    src = 8 * np.arange(4)[None, :] + (LANES // 4)[:, None]                     # (32, 4)
    at = addr[src][..., None] + 2 * (LANES % 4)[:, None, None] + np.arange(2)   # (32, 4, 2)
    assert np.all(addr % 8 == 0), "ldmatrix rows must be 16-byte aligned"
    return smem[at]


def mma_m16n8k16(c: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """c[lane, 4] += A . B with the .row.col fragment layouts: a[lane, 4 regs, 2], b[lane, 2 regs, 2]."""
    g, tg = LANES // 4, LANES % 4
    A, B = np.full((16, 16), np.nan), np.full((16, 8), np.nan)
    for e in (0, 1):
        A[g, 2 * tg + e], A[g + 8, 2 * tg + e] = a[:, 0, e], a[:, 1, e]
        A[g, 8 + 2 * tg + e], A[g + 8, 8 + 2 * tg + e] = a[:, 2, e], a[:, 3, e]
        B[2 * tg + e, g], B[8 + 2 * tg + e, g] = b[:, 0, e], b[:, 1, e]
    assert not np.isnan(A).any() and not np.isnan(B).any()
    D = A @ B
    for e in (0, 1):
        c[:, e] += D[g, 2 * tg + e]
        c[:, 2 + e] += D[g + 8, 2 * tg + e]


def qgemm_model(kern, wbytes: np.ndarray, A: np.ndarray, bias=None, residual=None, bxs=None) -> np.ndarray:
    """out[M, N] as qgemm.cu.j2 computes it, in float64 (only column blocks `bxs` if given)."""
    p = dict(kern.params)
    fmt = FORMATS[p["wdtype"]]
    K, N, RB, al = p["K"], p["N"], p["row_bytes"], p["align"]
    BM, BN, BK_ = p["bm"], p["bn"], p["bk"]
    WN, THREADS, LDS = BN // 32, 64 * BN // 32, BK_ + 8
    glu, act = p["act"] != 0, {1: _silu, 2: _gelu_tanh}.get(p["act"])
    TN = BN // 2 if glu else BN
    UNITS, ACH, KT = BN * (BK_ // 8) // THREADS, BM * (BK_ // 8) // THREADS, K // BK_
    M = A.shape[0]
    mem = np.zeros(wbytes.size + 16, np.uint8)
    mem[:wbytes.size] = wbytes.reshape(-1)
    out = np.full((M, N), np.nan)
    gx, gy, _ = kern.launch_grid({"M": M, "N": N, "K": K})
    for bx in (range(gx) if bxs is None else bxs):
        for by in range(gy):
            m0, c0 = by * BM, bx * TN
            a_s, w_s = np.full((2, BM * LDS), np.nan), np.full((2, BN * LDS), np.nan)
            units = []   # (tile row, k unit, row byte offset or None)
            for tid in range(THREADS):
                for i in range(UNITS):
                    idx = tid + i * THREADS
                    r, uk = idx // (BK_ // 8), idx % (BK_ // 8)
                    col = c0 + 16 * (r // 32) + r % 16 if glu else c0 + r
                    wrow = ((r // 16) & 1) * N + col if glu else col
                    units.append((r, uk, wrow * RB if col < N else None))

            def load_a(kt, buf):
                for tid in range(THREADS):
                    for i in range(ACH):
                        idx = tid + i * THREADS
                        r, kc = idx // (BK_ // 8), 8 * (idx % (BK_ // 8))
                        v = A[m0 + r, kt * BK_ + kc:kt * BK_ + kc + 8] if m0 + r < M else np.zeros(8)
                        a_s[buf, r * LDS + kc:r * LDS + kc + 8] = v

            def fill_w(kt, buf):
                for r, uk, row in units:
                    v = np.zeros(8)
                    if row is not None:
                        k = kt * BK_ + 8 * uk
                        sub = (k % fmt.bv) // 8
                        words = load_unit(fmt, al, mem, row + fmt.head + k // fmt.bv * fmt.bb, sub)
                        q, d, mo = decode_unit(fmt, words, sub)
                        if fmt.row_scale:
                            d = float(np.frombuffer(bytes(mem[row:row + 4]), np.float32)[0])
                        v = d * np.array(q, float) + mo
                    w_s[buf, r * LDS + 8 * uk:r * LDS + 8 * uk + 8] = v

            acc = np.zeros((2 * WN, 32, 2, 4, 4))   # [warp][lane][mi][nj][e]
            load_a(0, 0)
            fill_w(0, 0)
            for kt in range(KT):
                cur = kt & 1
                if kt + 1 < KT:
                    load_a(kt + 1, cur ^ 1)
                for warp in range(2 * WN):
                    wm, wn = warp & 1, warp >> 1
                    for kk in range(0, BK_, 16):
                        af = [ldmatrix_x4(a_s[cur],
                                          (32 * wm + 16 * mi + (LANES & 15)) * LDS + kk + 8 * (LANES >> 4))
                              for mi in range(2)]
                        bf = []
                        for pp in range(2):
                            t = ldmatrix_x4(w_s[cur], (32 * wn + 16 * pp + 8 * (LANES >> 4) + (LANES & 7)) * LDS
                                            + kk + 8 * ((LANES >> 3) & 1))
                            bf += [t[:, 0:2], t[:, 2:4]]
                        for mi in range(2):
                            for nj in range(4):
                                mma_m16n8k16(acc[warp, :, mi, nj], af[mi], bf[nj])
                if kt + 1 < KT:
                    fill_w(kt + 1, cur ^ 1)
            for warp in range(2 * WN):
                wm, wn = warp & 1, warp >> 1
                for lane in range(32):
                    qr, qc = lane >> 2, 2 * (lane & 3)
                    for mi in range(2):
                        for hh in range(2):
                            m = m0 + 32 * wm + 16 * mi + qr + 8 * hh
                            if m >= M:
                                continue
                            for nj in range(2 if glu else 4):
                                col = c0 + 16 * wn + 8 * nj + qc if glu else c0 + 32 * wn + 8 * nj + qc
                                for e in range(2):
                                    if col + e >= N:
                                        continue
                                    v = acc[warp, lane, mi, nj, 2 * hh + e]
                                    if bias is not None:
                                        v += bias[col + e]
                                    if glu:
                                        up = acc[warp, lane, mi, nj + 2, 2 * hh + e]
                                        if bias is not None:
                                            up += bias[N + col + e]
                                        v = act(v) * up
                                    if residual is not None:
                                        v += residual[m, col + e]
                                    assert np.isnan(out[m, col + e]), "two threads store one element"
                                    out[m, col + e] = v
    return out


@pytest.mark.parametrize("wdtype", QDTYPES)
def test_model_of_the_kernel_reproduces_linear(wdtype):
    """Every quantized format: ragged M and N tiles, plain with bias and residual, and GLU."""
    rng = np.random.default_rng(5)
    k = {"q4_k": 512, "q5_k": 256, "q6_k": 256, "int4_g128": 352, "int4_g64": 160}.get(wdtype, 96)
    for n, M, ep in ((40, 70, "none"), (40, 20, "silu")):
        rows = 2 * n if ep != "none" else n
        w = random_weight(wdtype, rows, k, seed=7)
        A = bf16_values(rng, (M, k))
        bias = rng.standard_normal(rows)
        res = rng.standard_normal((M, n)) if ep == "none" else None
        kern = qgemm_kernel("sm_80", wdtype, "bfloat16", K=k, N=n, epilogue=ep, bias=True, residual=ep == "none")
        got = qgemm_model(kern, w, A, bias, res)
        y = A @ weight_values(wdtype, w, k).T + bias
        ref = y + res if ep == "none" else _silu(y[:, :n]) * y[:, n:]
        assert not np.isnan(got).any(), "an output element is never stored"
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_model_wide_tile_and_gelu():
    """BN = 128 (8 warps) with the GLU row arrangement, on a tile boundary-straddling N."""
    rng = np.random.default_rng(6)
    n, k, M = WIDE_N // 2 + 24, 64, 9
    kern = qgemm_kernel("sm_90a", "q8_0", "bfloat16", K=k, N=n, epilogue="gelu_tanh")
    assert dict(kern.params)["bn"] == 128 and kern.threads == 256
    w = random_weight("q8_0", 2 * n, k, seed=8)
    A = bf16_values(rng, (M, k))
    tn = dict(kern.params)["bn"] // 2
    bxs = [cdiv(n, tn) - 2, cdiv(n, tn) - 1]   # the model is slow in Python: the last two column blocks
    got = qgemm_model(kern, w, A, bxs=bxs)
    y = A @ weight_values("q8_0", w, k).T
    ref = _gelu_tanh(y[:, :n]) * y[:, n:]
    cols = slice(bxs[0] * tn, n)
    assert np.isnan(got[:, :cols.start]).all()
    np.testing.assert_allclose(got[:, cols], ref[:, cols], rtol=1e-6, atol=1e-6)
