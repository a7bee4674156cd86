"""The decode GEMV (reft/backends/cuda/gemv.py), without a GPU: every weight dtype compiles for sm_80
and sm_90a with the epilogues a Llama plan uses, within the arch limits (0 spills, 0 stack);
launches of tiny and 1B-sized weights pass arch.check_launch; the split-K / rows-per-block
choices respect the arch limits; bad requests fail with one line.

A numpy model of the kernel's per-lane loop (`decode_unit`, `gemv_model`: which bytes each lane's
cp.async window holds, which words it reads at which alignment, how it decodes them and where
its activations sit in the staged chunk), driven by the builder's own constants, reconstructs
the GEMV from raw weight bytes and is compared with reft.ir.quantized.dequantize_rows.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cuda.bindings")

from reft.backends.cuda import arch as archs  # noqa: E402
from reft.backends.cuda import toolchain  # noqa: E402
from reft.backends.cuda.gemv import (FORMATS, STATIC_SMEM, GemvError, gemv_kernel, plan_gemv,  # noqa: E402
                                     row_variants)
from reft.backends.cuda.kernel import cdiv  # noqa: E402
from reft.ir.quantized import dequantize_rows, quantize_weight  # noqa: E402
from reft.ir.types import QUANT_DTYPES, row_bytes  # noqa: E402

pytestmark = pytest.mark.skipif(not toolchain.available(), reason="NVRTC / CUDA headers not installed")

ARCHS = ["sm_80", "sm_90a"]
WDTYPES = list(FORMATS)
KQUANTS = ("q4_k", "q5_k", "q6_k")


def small_k(wdtype: str) -> int:
    return 256 if wdtype in KQUANTS else 64


# -- compiled instantiations, once per session ------------------------------------------------------
def _variants():
    """(arch, wdtype, adtype, N, K, epilogue, bias, residual, out_dtype) of every compiled GEMV."""
    out = []
    for arch in ARCHS:
        for wd in WDTYPES:
            k = small_k(wd)
            out.append((arch, wd, "bfloat16", 64, k, "none", False, True, "float32"))   # + residual
            out.append((arch, wd, "bfloat16", 64, k, "silu", True, False, "half"))      # gate/up + bias
        for wd in ("bfloat16", "float16", "q8_0", "q4_k"):
            k = small_k(wd)
            out.append((arch, wd, "float16", 64, k, "none", True, False, "float32"))
            out.append((arch, wd, "float16", 64, k, "gelu_tanh", False, False, "float16"))
        for wd in ("bfloat16", "q4_k"):   # 1B shapes: gate/up, down (+ residual), lm_head
            for n, k, ep, res in ((8192, 2048, "silu", False), (2048, 8192, "none", True),
                                  (128256, 2048, "none", False)):
                out.append((arch, wd, "bfloat16", n, k, ep, False, res, "half" if ep != "none" else "float32"))
    return out


VARIANTS = _variants()


def build(v):
    arch, wd, ad, n, k, ep, bias, res, od = v
    return gemv_kernel(arch, wd, ad, K=k, N=n, epilogue=ep, bias=bias, residual=res, out_dtype=od)


@pytest.fixture(scope="session")
def compiled():
    out = {}
    for arch in ARCHS:
        ks = [build(v) for v in VARIANTS if v[0] == arch]
        out.update({(arch, name): c for name, c in toolchain.compile_kernels(ks, arch, jobs=2).items()})
    return out


def vid(v):
    return "-".join(str(x) for x in v)


@pytest.mark.parametrize("v", VARIANTS, ids=vid)
def test_compiles_within_limits(compiled, v):
    k = build(v)
    c = compiled[(v[0], k.name)]
    r = c.resources
    a = archs.get(v[0])
    assert r.spill_stores == 0 and r.spill_loads == 0 and r.stack == 0, (k.name, r)
    assert r.registers <= 65536 // (k.threads * dict(k.params)["min_blocks"]), r   # __launch_bounds__ held
    p = plan_gemv(v[0], FORMATS[v[1]], v[4], v[3], v[5] != "none")
    assert r.smem == p.smem() <= STATIC_SMEM and k.smem == 0   # the launcher's accounting is ptxas's
    assert archs.blocks_per_sm(a, k.threads, r.registers, r.smem) >= 1
    assert c.source.startswith("// gemv_") and "IR nodes" in c.source.splitlines()[1]
    grid = k.launch_grid({"M": 8, "N": v[3], "K": v[4]})
    archs.check_launch(a, k.name, k.block, grid, k.smem, r.registers, r.smem)


@pytest.mark.parametrize("arch", ARCHS)
def test_sass_streams_weights_with_cp_async(compiled, arch):
    v = next(v for v in VARIANTS if v[0] == arch and v[1] == "q4_k")
    ops = toolchain.sass_opcodes(toolchain.sass(compiled[(arch, build(v).name)].cubin))
    assert {"LDGSTS", "SHFL", "BAR"} <= ops, ops


# -- sizing, launch geometry and validation -------------------------------------------------------
TINY = [(64, 64), (64, 128), (64, 320), (512, 64), (192, 64), (96, 64)]      # (N, K) of tiny test models
ONE_B = [(2048, 2048), (512, 2048), (3072, 2048), (8192, 2048), (2048, 8192), (128256, 2048)]


@pytest.mark.parametrize("arch", list(archs.ARCHS))
@pytest.mark.parametrize("wdtype", WDTYPES)
def test_launch_geometry_fits_the_arch(arch, wdtype):
    a = archs.get(arch)
    fmt = FORMATS[wdtype]
    for n, k in TINY + ONE_B:
        if k % fmt.k_multiple:
            continue
        for ep in ("none", "silu"):
            kern = gemv_kernel(arch, wdtype, "bfloat16", K=k, N=n, epilogue=ep)
            p = plan_gemv(arch, fmt, k, n, ep != "none")
            regs = 65536 // (kern.threads * p.min_blocks)   # the most __launch_bounds__ allows
            grid = kern.launch_grid({"M": 1, "N": n, "K": k})
            archs.check_launch(a, kern.name, kern.block, grid, kern.smem, min(regs, a.regs_per_thread), p.smem())
            assert grid[0] * p.cols >= n and (grid[0] - 1) * p.cols < n   # every column, no empty block
            assert archs.blocks_per_sm(a, kern.threads, min(regs, 255), p.smem()) >= 1


@pytest.mark.parametrize("arch", list(archs.ARCHS))
def test_split_k_fills_the_gpu_only_when_rows_are_few(arch):
    sms = archs.get(arch).sms
    fmt = FORMATS["bfloat16"]
    wide = plan_gemv(arch, fmt, 2048, 128256, False)   # lm_head: rows enough
    assert wide.splits == 1 and wide.groups == 8 and wide.threads == 256
    few = plan_gemv(arch, fmt, 8192, 2048, False)      # down_proj: 1024 warp rows < 16 per SM
    assert few.splits > 1 and cdiv(2048, few.opw) * few.splits >= sms * 8
    tiny = plan_gemv(arch, fmt, 64, 64, False)         # one step of K: nothing to split
    assert tiny.splits == 1 and cdiv(64, tiny.cols) >= 4
    for p in (wide, few, tiny):
        assert p.warps * 32 <= archs.get(arch).threads_per_block and p.smem() <= STATIC_SMEM
        assert p.chunk >= p.step and p.stages >= 2
        for rows, cs in ((r, p.chunk_steps(r, 8192)) for r in row_variants(8)):
            assert rows * cs * p.step <= p.max_rows * p.chunk   # the staged chunk fits its buffer


def test_every_format_plans_within_static_smem():
    for wd, fmt in FORMATS.items():
        for glu in (False, True):
            for arch in archs.ARCHS:
                p = plan_gemv(arch, fmt, 8192, 64, glu)
                assert p.smem() <= STATIC_SMEM and p.window * 16 >= p.step // fmt.bv * fmt.bb


def test_formats_match_the_ir_blocks():
    for wd, fmt in FORMATS.items():
        if fmt.dense:
            continue
        bv, bb = QUANT_DTYPES[wd]
        if wd == "int8":
            assert (fmt.head, fmt.bv, fmt.bb) == (bb, 8, 8)
        else:
            assert (fmt.bv, fmt.bb) == (bv, bb)
        for k in (256, 512, 2048):
            assert fmt.row_bytes(k) == row_bytes(wd, k)


@pytest.mark.parametrize("kw,match", [
    (dict(wdtype="q3_k"), "unsupported weight dtype"),
    (dict(adtype="float32"), "activation dtype"),
    (dict(wdtype="q4_k", K=64), "multiple of 256"),
    (dict(wdtype="q8_0", K=48), "multiple of 32"),
    (dict(wdtype="int8", K=12), "multiple of 8"),
    (dict(wdtype="int4_g128", K=80), "multiple of 32"),
    (dict(N=0), "N must be"),
    (dict(epilogue="relu"), "unknown epilogue"),
    (dict(out_dtype="float16"), "out_dtype"),
    (dict(max_rows=9), "max_rows"),
    (dict(arch="sm_70"), "unknown CUDA architecture"),
])
def test_bad_requests_fail_with_one_line(kw, match):
    args = dict(arch="sm_80", wdtype="bfloat16", adtype="bfloat16", K=64, N=64) | kw
    with pytest.raises(Exception) as e:
        gemv_kernel(args.pop("arch"), args.pop("wdtype"), args.pop("adtype"), **args)
    assert match in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, GemvError) or "architecture" in match


# -- a numpy model of the device-side index arithmetic -------------------------------------------
def ld16(buf, p):
    assert p % 2 == 0, f"16-bit read at odd address {p}"
    return int(buf[p]) | int(buf[p + 1]) << 8


def ld32(buf, p, aligned4):
    if aligned4:
        assert p % 4 == 0, f"32-bit read at {p}, claimed 4-byte aligned"
        return int.from_bytes(bytes(buf[p:p + 4]), "little")
    return ld16(buf, p) | ld16(buf, p + 2) << 16


def h2f(bits):
    return float(np.array([bits & 0xFFFF], np.uint16).view(np.float16)[0])


def u8x4(x, zero):
    return [((x >> (8 * i)) & 0xFF) - zero for i in range(4)]


def spread4(b):
    return ((b & 15) * 0x00204081) & 0x01010101


def load_unit(fmt, al, buf, b, sub):
    """WF::load: the words of unit `sub` of the block at byte b of buf (al: block alignment)."""
    F = dict(fmt.fields)
    a4 = lambda off: al % 4 == 0 and off % 4 == 0   # noqa: E731  (WF::A4)
    dt = fmt.dtype
    if fmt.dense:
        assert b % 16 == 0
        return [ld32(buf, b + 4 * i, True) for i in range(fmt.words)]
    if dt == "q8_0":
        return [ld16(buf, b + F["d"]), ld32(buf, b + F["qs"] + 8 * sub, a4(F["qs"])),
                ld32(buf, b + F["qs"] + 8 * sub + 4, a4(F["qs"] + 4))]
    if dt == "q4_0":
        return [ld16(buf, b + F["d"]), ld32(buf, b + F["qs"] + 8 * (sub & 1), a4(F["qs"])),
                ld32(buf, b + F["qs"] + 8 * (sub & 1) + 4, a4(F["qs"] + 4))]
    if dt == "q4_1" or dt.startswith("int4_g"):
        o = F["qs"] + 16 * (sub >> 2) + 8 * (sub & 1)
        return [ld32(buf, b + F["dm"], a4(F["dm"])), ld32(buf, b + o, a4(F["qs"])),
                ld32(buf, b + o + 4, a4(F["qs"] + 4))]
    if dt == "q5_0":
        return [ld16(buf, b + F["d"]), ld32(buf, b + F["qh"], a4(F["qh"])),
                ld32(buf, b + F["qs"] + 8 * (sub & 1), a4(F["qs"])),
                ld32(buf, b + F["qs"] + 8 * (sub & 1) + 4, a4(F["qs"] + 4))]
    if dt == "q5_1":
        return [ld32(buf, b + F["dm"], a4(F["dm"])), ld32(buf, b + F["qh"], a4(F["qh"])),
                ld32(buf, b + F["qs"] + 8 * (sub & 1), a4(F["qs"])),
                ld32(buf, b + F["qs"] + 8 * (sub & 1) + 4, a4(F["qs"] + 4))]
    if dt in ("q4_k", "q5_k"):
        sb = sub >> 2
        o = F["qs"] + 32 * (sb >> 1) + 8 * (sub & 3)
        w = [ld32(buf, b + F["dm"], a4(F["dm"])), ld32(buf, b + F["sc"], a4(F["sc"])),
             ld32(buf, b + F["sc"] + 4, a4(F["sc"] + 4)), ld32(buf, b + F["sc"] + 8, a4(F["sc"] + 8)),
             ld32(buf, b + o, a4(F["qs"])), ld32(buf, b + o + 4, a4(F["qs"] + 4))]
        if dt == "q5_k":
            w += [ld32(buf, b + F["qh"] + 8 * (sub & 3), a4(F["qh"])),
                  ld32(buf, b + F["qh"] + 8 * (sub & 3) + 4, a4(F["qh"] + 4))]
        return w
    if dt == "q6_k":
        h, j, l0 = sub >> 4, (sub >> 2) & 3, 8 * (sub & 3)
        ql = b + F["ql"] + 64 * h + 32 * (j & 1) + l0
        qh = b + F["qh"] + 32 * h + l0
        return [ld32(buf, ql, a4(F["ql"])), ld32(buf, ql + 4, a4(F["ql"] + 4)), ld32(buf, qh, a4(F["qh"])),
                ld32(buf, qh + 4, a4(F["qh"] + 4)), ld16(buf, b + F["sc"] + ((sub >> 1) & ~1)), ld16(buf, b + F["d"])]
    if dt == "int8":
        return [ld32(buf, b + F["qs"], a4(F["qs"])), ld32(buf, b + F["qs"] + 4, a4(F["qs"] + 4))]
    raise AssertionError(dt)


def decode_unit(fmt, w, sub):
    """WF::decode: (q[8], d, m) with the unit's values d * q + m."""
    dt = fmt.dtype
    if dt == "bfloat16":
        return [float(np.array([(x << 16) & 0xFFFFFFFF, x & 0xFFFF0000], np.uint32).view(np.float32)[i])
                for x in w for i in (0, 1)], 1.0, 0.0
    if dt == "float16":
        return [h2f(x >> s) for x in w for s in (0, 16)], 1.0, 0.0
    if dt == "float32":
        return list(np.array(w, np.uint32).view(np.float32).astype(float)), 1.0, 0.0
    if dt in ("q8_0", "int8"):
        x = w[1:] if dt == "q8_0" else w
        q = u8x4(x[0] ^ 0x80808080, 128) + u8x4(x[1] ^ 0x80808080, 128)
        return q, (h2f(w[0]) if dt == "q8_0" else 1.0), 0.0
    if dt == "q4_0":
        sh = 4 * (sub >> 1)
        return u8x4((w[1] >> sh) & 0x0F0F0F0F, 8) + u8x4((w[2] >> sh) & 0x0F0F0F0F, 8), h2f(w[0]), 0.0
    if dt == "q4_1" or dt.startswith("int4_g"):
        sh = 4 * ((sub >> 1) & 1)
        return (u8x4((w[1] >> sh) & 0x0F0F0F0F, 0) + u8x4((w[2] >> sh) & 0x0F0F0F0F, 0), h2f(w[0]), h2f(w[0] >> 16))
    if dt in ("q5_0", "q5_1"):
        sh, zero = 4 * (sub >> 1), 16 if dt == "q5_0" else 0
        hb = (w[1] >> (8 * sub)) & 0xFF
        q = (u8x4(((w[2] >> sh) & 0x0F0F0F0F) | (spread4(hb) << 4), zero)
             + u8x4(((w[3] >> sh) & 0x0F0F0F0F) | (spread4(hb >> 4) << 4), zero))
        return (q, h2f(w[0]), 0.0) if dt == "q5_0" else (q, h2f(w[0]), h2f(w[0] >> 16))
    if dt in ("q4_k", "q5_k"):
        sb = sub >> 2
        sh = 4 * (sb & 1)
        c0, c1 = (w[4] >> sh) & 0x0F0F0F0F, (w[5] >> sh) & 0x0F0F0F0F
        if dt == "q5_k":
            c0 |= ((w[6] >> sb) & 0x01010101) << 4
            c1 |= ((w[7] >> sb) & 0x01010101) << 4
        jb = 8 * (sb & 3)
        s_lo, m_lo = (w[1] >> jb) & 0xFF, (w[2] >> jb) & 0xFF
        if sb < 4:
            sc, mn = s_lo & 63, m_lo & 63
        else:
            s_hi = (w[3] >> jb) & 0xFF
            sc, mn = (s_hi & 15) | ((s_lo >> 6) << 4), (s_hi >> 4) | ((m_lo >> 6) << 4)
        return u8x4(c0, 0) + u8x4(c1, 0), h2f(w[0]) * sc, -(h2f(w[0] >> 16) * mn)
    if dt == "q6_k":
        j = (sub >> 2) & 3
        shl, shh = 4 * (j >> 1), 2 * j
        q = (u8x4(((w[0] >> shl) & 0x0F0F0F0F) | (((w[2] >> shh) & 0x03030303) << 4), 32)
             + u8x4(((w[1] >> shl) & 0x0F0F0F0F) | (((w[3] >> shh) & 0x03030303) << 4), 32))
        sc = int(np.array([(w[4] >> (8 * ((sub >> 1) & 1))) & 0xFF], np.uint8).view(np.int8)[0])
        return q, h2f(w[5]) * sc, 0.0
    raise AssertionError(dt)


def random_weight(wdtype: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """uint8[n, row_bytes] (or a dense float array) of a random weight in `wdtype`."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    if FORMATS[wdtype].dense:
        return w.astype({"bfloat16": np.float32, "float16": np.float16, "float32": np.float32}[wdtype])
    if wdtype in KQUANTS:   # no reference quantizer: random bytes with small float16 scales
        fmt = FORMATS[wdtype]
        raw = rng.integers(0, 256, (n, fmt.row_bytes(k)), dtype=np.uint8)
        blocks = raw.reshape(n, -1, fmt.bb)
        for off in ((208,) if wdtype == "q6_k" else (0, 2)):
            d = rng.uniform(0.0005, 0.005, blocks.shape[:2]).astype(np.float16)
            blocks[:, :, off:off + 2] = d[..., None].view(np.uint8)
        return raw
    return quantize_weight(w, wdtype)


def weight_bytes(wdtype: str, w: np.ndarray) -> np.ndarray:
    """The bytes the kernel reads: rows of blocks, or dense values (bfloat16: the top halves)."""
    if wdtype == "bfloat16":
        return np.ascontiguousarray(w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(w.shape[0], -1)
    return np.ascontiguousarray(w).view(np.uint8).reshape(w.shape[0], -1)


def weight_values(wdtype: str, w: np.ndarray, k: int) -> np.ndarray:
    if wdtype == "bfloat16":
        return (w.view(np.uint32) & 0xFFFF0000).view(np.float32).astype(np.float64)
    if FORMATS[wdtype].dense:
        return w.astype(np.float64)
    return dequantize_rows(w, wdtype, k).astype(np.float64)


def gemv_model(kern, wbytes: np.ndarray, A: np.ndarray) -> np.ndarray:
    """What the kernel computes, step by step as gemv.cu.j2 does, in float64 (out: [M, N] before
    the epilogue's bias/activation; GLU returns (gate, up))."""
    p = dict(kern.params)
    fmt = FORMATS[p["wdtype"]]
    K, N, RB, al = p["K"], p["N"], p["row_bytes"], p["align"]
    G, S, OPW, WR, maxr = p["groups"], p["splits"], p["opw"], p["wr"], p["max_rows"]
    STEP, WIN = 256 * p["unroll"], 16 * p["window"]
    glu = p["act"] != 0
    nsteps = cdiv(K, STEP)
    mem = np.zeros(wbytes.size + 16, np.uint8)   # W at a 16-byte aligned address, readable to its end chunk
    mem[:wbytes.size] = wbytes.reshape(-1)
    M = A.shape[0]
    res = np.zeros((2 if glu else 1, M, N))
    blocks = cdiv(N, G * OPW)
    assert kern.launch_grid({"M": M, "N": N, "K": K})[:2] == (blocks, cdiv(M, maxr))
    for m0 in range(0, M, maxr):   # grid.y
        rows = min(M - m0, maxr)
        MR, CS = next((r, cs) for r, cs in p["variants"] if rows <= r)
        CSV = CS * STEP
        for blk in range(blocks):
            acc = np.zeros((G * S, WR, MR))
            state = {}
            for warp in range(G * S):
                g, s = divmod(warp, S)
                col0 = blk * G * OPW + g * OPW
                cols = [col0 if glu else col0 + r for r in range(WR)]
                base = [((r * N + col0) if glu else col0 + r) * RB for r in range(WR)]
                rs = [np.frombuffer(bytes(mem[b:b + 4]), np.float32)[0] if fmt.row_scale else 1.0 for b in base]
                state[warp] = dict(s=s, ok=[c < N for c in cols], base=base, rs=rs, j=s)
            for c0 in range(0, nsteps, CS):
                c1 = min(c0 + CS, nsteps)
                kc0 = c0 * STEP
                kcn = min(c1 * STEP, K) - kc0
                act = np.zeros(MR * CSV)
                for q in range(MR * (CSV // 8)):
                    m, kk = q // (CSV // 8), 8 * (q % (CSV // 8))
                    if m < rows and kk < kcn:
                        act[m * CSV + kk:m * CSV + kk + 8] = A[m0 + m, kc0 + kk:kc0 + kk + 8]
                for warp, st in state.items():
                    while st["j"] < c1:
                        j = st["j"]
                        k0 = j * STEP
                        b0 = fmt.head + k0 // fmt.bv * fmt.bb
                        b1 = RB if k0 + STEP >= K else fmt.head + (k0 + STEP) // fmt.bv * fmt.bb
                        for r in range(WR):
                            if not st["ok"][r]:
                                continue
                            a0, a1 = (st["base"][r] + b0) & ~15, (st["base"][r] + b1 + 15) & ~15
                            assert (a1 - a0) // 16 <= WIN // 16, "window too small"
                            win = np.zeros(WIN, np.uint8)
                            win[:a1 - a0] = mem[a0:a1]
                            for u in range(STEP // 256):
                                for lane in range(32):
                                    k = k0 + 256 * u + 8 * lane
                                    if k >= K:
                                        continue
                                    assert kc0 <= k and k + 8 <= kc0 + CSV
                                    sub = (k % fmt.bv) // 8
                                    at = ((st["base"][r] + b0) & 15) + (k // fmt.bv - k0 // fmt.bv) * fmt.bb
                                    q, d, mo = decode_unit(fmt, load_unit(fmt, al, win, at, sub), sub)
                                    for m in range(MR):
                                        a = act[m * CSV + k - kc0:m * CSV + k - kc0 + 8]
                                        acc[warp, r, m] += d * np.dot(q, a) + mo * a.sum()
                        st["j"] += S
            for warp, st in state.items():
                acc[warp] *= np.array(st["rs"])[:, None]
            for cc in range(G * OPW):
                col = blk * G * OPW + cc
                gg, o = divmod(cc, OPW)
                if col >= N:
                    continue
                for m in range(rows):
                    res[0, m0 + m, col] = sum(acc[gg * S + k, 0 if glu else o, m] for k in range(S))
                    if glu:
                        res[1, m0 + m, col] = sum(acc[gg * S + k, 1, m] for k in range(S))
    return res if glu else res[0]


def bf16_values(rng, shape) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return (x.view(np.uint32) & 0xFFFF0000).view(np.float32).astype(np.float64)


@pytest.mark.parametrize("wdtype", WDTYPES)
def test_model_of_the_lane_loop_reconstructs_the_matmul(wdtype):
    """Every format family: the kernel's windows, offsets, word reads and decode give x . W^T."""
    rng = np.random.default_rng(1)
    k = {"q4_k": 512, "q5_k": 512, "q6_k": 512, "int4_g128": 352, "int4_g64": 352}.get(wdtype, 288)
    for n, M, ep in ((13, 3, "none"), (6, 8, "silu"), (5, 11, "none")):   # ragged blocks, GLU, M > max_rows
        rows = 2 * n if ep != "none" else n
        w = random_weight(wdtype, rows, k, seed=n)
        A = bf16_values(rng, (M, k))
        kern = gemv_kernel("sm_90a", wdtype, "bfloat16", K=k, N=n, epilogue=ep)
        got = gemv_model(kern, weight_bytes(wdtype, w), A)
        ref = A @ weight_values(wdtype, w, k).T
        if ep != "none":
            ref = np.stack([ref[:, :n], ref[:, n:]])
        # tolerance: the reference dequantizes in float32
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_model_covers_split_k_and_chunked_activations():
    """A plan with k-splits and several activation chunks per step sequence (1B down_proj-like)."""
    rng = np.random.default_rng(2)
    k, n = 2048, 24
    for wdtype in ("q8_0", "bfloat16"):
        kern = gemv_kernel("sm_90a", wdtype, "bfloat16", K=k, N=n)
        p = dict(kern.params)
        assert p["splits"] > 1 and dict(p["variants"])[8] * 256 * p["unroll"] < k
        w = random_weight(wdtype, n, k, seed=3)
        A = bf16_values(rng, (8, k))
        got = gemv_model(kern, weight_bytes(wdtype, w), A)
        np.testing.assert_allclose(got, A @ weight_values(wdtype, w, k).T, rtol=1e-6, atol=1e-6)


def pipeline_trace(nsteps: int, S: int, s: int, CS: int, STAGES: int) -> list[int]:
    """The cp.async pipeline of one warp as gemv.cu.j2 runs it (issue / commit / wait_group, chunk
    loop): checks that compute(t) reads a slot holding step t's landed copies, that no copy is in
    flight into a slot being read, and returns the steps computed in order."""
    slots, pending, done = {}, [], []   # slot -> step landed there; groups in flight: [(slot, step)]

    def issue(t, slot):
        j = s + S * t
        pending.append([(slot, t)] if j < nsteps else [])   # one commit group

    def wait(n):
        while len(pending) > n:
            for slot, t in pending.pop(0):
                slots[slot] = t

    for p in range(STAGES - 1):
        issue(p, p)
    t, j = 0, s
    for c0 in range(0, nsteps, CS):
        c1 = min(c0 + CS, nsteps)
        while j < c1:
            nxt = (t + STAGES - 1) % STAGES
            assert slots.get(nxt, -1) < t, "a slot is refilled before its step was computed"
            issue(t + STAGES - 1, nxt)
            wait(STAGES - 1)
            assert slots.get(t % STAGES) == t and all(sl != t % STAGES for g in pending for sl, _ in g)
            done.append(j)
            j += S
            t += 1
    wait(0)
    return done


@pytest.mark.parametrize("STAGES", [2, 3])
def test_pipeline_model_visits_each_step_once_with_landed_data(STAGES):
    for nsteps in (1, 2, 5, 8, 33):
        for S in (1, 2, 4, 8):
            for CS in (1, 2, 3, 8, 64):
                steps = sorted(j for s in range(S) for j in pipeline_trace(nsteps, S, s, CS, STAGES))
                assert steps == list(range(nsteps))
