"""The memory-bound cuda kernels (reft/backends/cuda/elementwise.py), checked without a GPU: every
builder compiles with NVRTC for sm_80 and sm_90a at the tiny test models' and a 1B model's sizes
(bfloat16 and float16 where the dtype matters), with no spills and no stack frame, within the
arch's register and shared-memory limits, at launch geometries the arch accepts; the builders'
sizing and validation; the embedding's dequantization source, compiled for the host, against
reft's numpy formats; and a numpy model of the sample kernel's selection against the host sampler.
"""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

pytest.importorskip("cuda.bindings")

from reft.backends.cuda import arch as archs  # noqa: E402
from reft.backends.cuda import elementwise as E  # noqa: E402
from reft.backends.cuda import toolchain  # noqa: E402
from reft.errors import ReftError  # noqa: E402
from reft.ir.quantized import dequantize_rows, quantize_weight  # noqa: E402
from reft.ir.types import QUANT_DTYPES, row_bytes  # noqa: E402
from reft.runtime.sampler import Sampler, SamplingParams  # noqa: E402

pytestmark = pytest.mark.skipif(not toolchain.available(), reason="NVRTC / CUDA headers not installed")

ARCHS = ("sm_80", "sm_90a")
HALVES = ("bfloat16", "float16")
HIDDEN = (64, 2048)                 # tiny test models, a 1B model
VOCAB = (512, 128256)
# (heads, kv_heads, head_dim, rotary_dim, qk_norm, bias): tiny models' shapes and the 1B model's
QKV = [(4, 2, 24, 24, False, False), (8, 4, 32, 16, False, True), (4, 2, 40, 40, True, False),
       (4, 2, 16, 8, True, False), (4, 4, 64, 64, True, True), (32, 8, 64, 64, False, False)]
KV = [(2, 24, 16), (2, 40, 16), (4, 32, 16), (8, 64, 16)]   # (kv_heads, head_dim, page_size)


def build(arch: str) -> list:
    ks = []
    for h in HIDDEN:
        for res in (False, True):
            for out in ("float32", *HALVES):
                ks.append(E.rms_norm_kernel(arch, hidden=h, eps=1e-5, residual=res, out_dtype=out))
            ks.append(E.rms_norm_kernel(arch, hidden=h, eps=1e-6, residual=res, out_dtype="bfloat16", offset=1.0))
        for table in ("float32", *HALVES, *E.EMBED_FORMATS):
            if h % 256 == 0 or not table.endswith("_k"):
                ks.append(E.embedding_kernel(arch, table_dtype=table, hidden=h))
    for dt in HALVES:
        for heads, kvh, d, rot, norm, bias in QKV:
            ks.append(E.qkv_post_kernel(arch, dt, heads=heads, kv_heads=kvh, head_dim=d, rotary_dim=rot,
                                        qk_norm=norm, eps=1e-6, bias=bias))
        # Gemma's (1 + w) q/k norms; Phi-3's partial longrope
        ks.append(E.qkv_post_kernel(arch, dt, heads=4, kv_heads=2, head_dim=16, rotary_dim=16, qk_norm=True,
                                    eps=1e-6, bias=False, offset=1.0))
        ks.append(E.qkv_post_kernel(arch, dt, heads=4, kv_heads=4, head_dim=16, rotary_dim=8, qk_norm=False,
                                    eps=1e-6, bias=False, longrope=(6, 1.19)))
        for kvh, d, ps in KV:
            ks.append(E.kv_write_kernel(arch, dt, kv_heads=kvh, head_dim=d, page_size=ps))
        ks.append(E.take_rows_kernel(arch, width=2048, dtype=dt))
    ks += [E.add_kernel(arch), E.seq_extent_kernel(arch)]
    ks += [E.take_rows_kernel(arch, width=v) for v in VOCAB]
    ks += [E.cast_kernel(arch, a, b) for a in E.FLOAT_TYPES for b in E.FLOAT_TYPES if a != b]
    for v in (*VOCAB, 50257):       # 50257: rows not a multiple of 4 values (scalar loads)
        ks += [E.argmax_kernel(arch, vocab=v), E.sample_kernel(arch, vocab=v)]
    return ks


@pytest.fixture(scope="module", params=ARCHS)
def compiled(request):
    """(arch, kernels, name -> Compiled), compiled once per arch (and cached on disk by toolchain)."""
    arch = request.param
    ks = build(arch)
    return arch, ks, toolchain.compile_kernels(ks, arch, jobs=2)


def test_every_kernel_compiles_without_spills_or_stack(compiled):
    arch, ks, out = compiled
    a = archs.get(arch)
    assert set(out) == {k.name for k in ks}
    for k in ks:
        r = out[k.name].resources
        assert (r.spill_stores, r.spill_loads, r.stack) == (0, 0, 0), (k.name, r)
        assert r.registers <= a.regs_per_thread and r.registers * k.threads <= a.regs_per_sm, (k.name, r)
        assert r.smem + k.smem <= a.static_smem, (k.name, r)
        assert archs.blocks_per_sm(a, k.threads, r.registers, r.smem + k.smem) >= 1, k.name
        assert out[k.name].source.startswith("// ")


def _ints(k, rows: int) -> dict:
    """Integer arguments of kernel k for a batch of `rows` tokens (rows of logits)."""
    vals = {"M": rows, "T": rows, "R": rows, "MP": 4096, "vocab": 128256}
    vals["n"] = rows * 8192         # a [rows, 8192] add or cast
    return {a.name: vals[a.name] for a in k.args if a.kind == "i32"}


@pytest.mark.parametrize("rows", [1, 7, 512, 8192])
def test_launch_geometry_fits_the_arch(compiled, rows):
    arch, ks, out = compiled
    for k in ks:
        r = out[k.name].resources
        archs.check_launch(archs.get(arch), k.name, k.block, k.launch_grid(_ints(k, rows)), k.smem, r.registers, r.smem)


def test_grids_cover_every_row(compiled):
    _, ks, _ = compiled
    for k in ks:
        if k.name.startswith("rms_norm"):
            lay = dict(k.params)
            for m in (1, 3, 4, 5, 8193):
                assert k.launch_grid({"M": m})[0] * lay["rows"] >= m
                assert (k.launch_grid({"M": m})[0] - 1) * lay["rows"] < m
        if k.name.startswith("kv_write"):
            per = dict(k.params)["per_token"]
            for t in (1, 3, 1000):
                assert k.launch_grid({"T": t, "MP": 1})[0] * k.threads >= t * per
        if k.name.startswith("seq_extent"):
            for t in (1, 255, 256, 257, 8192):
                assert k.launch_grid({"T": t})[0] * k.threads >= t > (k.launch_grid({"T": t})[0] - 1) * k.threads
        if k.name.startswith(("add", "cast")):
            for n in (1, 1023, 1024, 1025, 8192 * 2048):
                g = k.launch_grid({"n": n})[0]
                assert g * k.threads * E.FLAT_ITEMS >= n > (g - 1) * k.threads * E.FLAT_ITEMS
        if k.name.startswith("take_rows"):
            p = dict(k.params)
            assert k.launch_grid({"R": 3})[1] * k.threads >= p["chunks"]
            assert p["chunks"] * p["vec_bytes"] == p["width"] * (4 if p["src_type"] == "float" else 2)


def test_vector_accesses_in_the_sass(compiled):
    """The 1B model's norms and KV write move 128-bit vectors (local memory would have shown as a
    stack frame above)."""
    arch, ks, out = compiled
    for name in ("rms_norm_h2048_f32_e3727c5ac", "rms_norm_add_h2048_bf16_e3727c5ac", "kv_write_bf16_kv8d64p16"):
        text = toolchain.sass(out[name].cubin)
        assert "LDG.E.128" in text and ("STG.E.128" in text or "STG.E.64" in text), name


def test_argument_lists_are_the_lowering_contract():
    a = "sm_80"
    names = lambda k: [(x.name, x.kind) for x in k.args]   # noqa: E731
    assert names(E.rms_norm_kernel(a, hidden=64, eps=1e-6, residual=False, out_dtype="bfloat16")) == [
        ("x", "ptr"), ("w", "ptr"), ("y", "ptr"), ("M", "i32")]
    assert names(E.rms_norm_kernel(a, hidden=64, eps=1e-6, residual=True, out_dtype="float32")) == [
        ("x", "ptr"), ("r", "ptr"), ("w", "ptr"), ("sum", "ptr"), ("y", "ptr"), ("M", "i32")]
    assert names(E.embedding_kernel(a, table_dtype="q8_0", hidden=64)) == [
        ("ids", "ptr"), ("table", "ptr"), ("out", "ptr"), ("T", "i32"), ("vocab", "i32")]
    assert names(E.qkv_post_kernel(a, "float16", heads=4, kv_heads=2, head_dim=64, rotary_dim=64, qk_norm=True,
                                   eps=1e-6, bias=True)) == [
        ("qkv", "ptr"), ("bias", "ptr"), ("q_norm", "ptr"), ("k_norm", "ptr"), ("positions", "ptr"),
        ("inv_freq", "ptr"), ("q", "ptr"), ("k", "ptr"), ("v", "ptr"), ("T", "i32")]
    assert [x.name for x in E.qkv_post_kernel(a, "float16", heads=4, kv_heads=2, head_dim=64, rotary_dim=64,
                                              qk_norm=False, eps=1e-6, bias=False).args] == [
        "qkv", "positions", "inv_freq", "q", "k", "v", "T"]
    assert [x.name for x in E.qkv_post_kernel(a, "float16", heads=4, kv_heads=2, head_dim=64, rotary_dim=32,
                                              qk_norm=True, eps=1e-6, bias=False, offset=1.0,
                                              longrope=(4096, 1.19)).args] == [
        "qkv", "q_norm", "k_norm", "positions", "extent", "inv_freq", "inv_freq_long", "q", "k", "v", "T"]
    assert [x.name for x in E.seq_extent_kernel(a).args] == ["positions", "seq_ids", "extent", "T"]
    assert [x.name for x in E.kv_write_kernel(a, "bfloat16", kv_heads=2, head_dim=64, page_size=16).args] == [
        "kc", "vc", "k", "v", "positions", "seq_ids", "page_table", "T", "MP"]
    assert [x.name for x in E.add_kernel(a).args] == ["a", "b", "out", "n"]
    assert [x.name for x in E.take_rows_kernel(a, width=10).args] == ["x", "rows", "out", "R"]
    assert [x.name for x in E.cast_kernel(a, "float32", "bfloat16").args] == ["x", "out", "n"]
    assert [x.name for x in E.argmax_kernel(a, vocab=512).args] == ["logits", "ids", "R"]
    assert [x.name for x in E.sample_kernel(a, vocab=512).args] == [
        "logits", "temperature", "top_k", "top_p", "u", "ids", "R"]


# -- sizing ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hidden", [1, 3, 6, 64, 96, 512, 513, 576, 896, 960, 2048, 3072, 4096, 5120, 8192, 16384])
def test_norm_layout_covers_the_row_within_the_limits(hidden):
    lay = E.norm_layout(hidden)
    nv = hidden // lay["vec"]
    assert hidden % lay["vec"] == 0 and lay["vec"] in (1, 2, 4)
    assert lay["tpr"] * lay["items"] >= nv > lay["tpr"] * (lay["items"] - 1)
    assert lay["items"] <= 4 and lay["tpr"] % 32 == 0
    assert lay["tpr"] * lay["rows"] <= 1024 and (lay["rows"] == 1 or lay["tpr"] == 32)


def test_threads_and_tiles():
    assert E.sample_kernel("sm_90a", vocab=128256).block == (1024, 1, 1)
    assert E.sample_kernel("sm_90a", vocab=512).block == (512, 1, 1)
    assert E.argmax_kernel("sm_90a", vocab=512).block == (64, 1, 1)
    k = E.rms_norm_kernel("sm_90a", hidden=2048, eps=1e-5, residual=True, out_dtype="bfloat16", nodes=("node 7: x",))
    assert k.grid == ("M", "1", "1") and "block of 128 per row" in k.tile and "// node 7: x" in k.render()
    k = E.rms_norm_kernel("sm_90a", hidden=64, eps=1e-5, residual=False, out_dtype="float32")
    assert k.grid == ("cdiv(M, 4)", "1", "1") and k.block == (128, 1, 1)
    # an instantiation's name holds everything its source depends on
    a = E.rms_norm_kernel("sm_80", hidden=64, eps=1e-5, residual=False, out_dtype="float32")
    b = E.rms_norm_kernel("sm_80", hidden=64, eps=1e-6, residual=False, out_dtype="float32")
    assert a.name != b.name
    assert E.take_rows_kernel("sm_80", width=3, dtype="float16").params == E.take_rows_kernel(
        "sm_80", width=3, dtype="float16").params


@pytest.mark.parametrize("call,message", [
    (lambda: E.rms_norm_kernel("sm_70", hidden=64, eps=1e-5, residual=False, out_dtype="float32"), "unknown CUDA"),
    (lambda: E.rms_norm_kernel("sm_80", hidden=32768, eps=1e-5, residual=False, out_dtype="float32"), "exceeds"),
    (lambda: E.rms_norm_kernel("sm_80", hidden=0, eps=1e-5, residual=False, out_dtype="float32"), "positive"),
    (lambda: E.rms_norm_kernel("sm_80", hidden=64, eps=1e-5, residual=False, out_dtype="int8"), "out_dtype"),
    (lambda: E.rms_norm_kernel("sm_80", hidden=64, eps=float("nan"), residual=False, out_dtype="float32"), "eps"),
    (lambda: E.embedding_kernel("sm_80", table_dtype="int32", hidden=64), "not supported"),
    (lambda: E.embedding_kernel("sm_80", table_dtype="q4_k", hidden=64), "multiple of 256"),
    (lambda: E.embedding_kernel("sm_80", table_dtype="q8_0", hidden=48), "multiple of 32"),
    (lambda: E.qkv_post_kernel("sm_80", "float32", heads=4, kv_heads=2, head_dim=64, rotary_dim=64, qk_norm=False,
                               eps=1e-6, bias=False), "bfloat16 or float16"),
    (lambda: E.qkv_post_kernel("sm_80", "bfloat16", heads=4, kv_heads=3, head_dim=64, rotary_dim=64, qk_norm=False,
                               eps=1e-6, bias=False), "multiple"),
    (lambda: E.qkv_post_kernel("sm_80", "bfloat16", heads=4, kv_heads=2, head_dim=64, rotary_dim=66, qk_norm=False,
                               eps=1e-6, bias=False), "rotary_dim"),
    (lambda: E.qkv_post_kernel("sm_80", "bfloat16", heads=4, kv_heads=2, head_dim=64, rotary_dim=31, qk_norm=False,
                               eps=1e-6, bias=False), "even"),
    (lambda: E.qkv_post_kernel("sm_80", "bfloat16", heads=4, kv_heads=2, head_dim=512, rotary_dim=64, qk_norm=False,
                               eps=1e-6, bias=False), "head_dim"),
    (lambda: E.qkv_post_kernel("sm_80", "bfloat16", heads=4, kv_heads=2, head_dim=64, rotary_dim=64, qk_norm=False,
                               eps=1e-6, bias=False, neox=False), "rotate-half"),
    (lambda: E.qkv_post_kernel("sm_80", "bfloat16", heads=4, kv_heads=2, head_dim=64, rotary_dim=64, qk_norm=False,
                               eps=1e-6, bias=False, offset=1.0), "needs q/k norms"),
    (lambda: E.qkv_post_kernel("sm_80", "bfloat16", heads=4, kv_heads=2, head_dim=64, rotary_dim=64, qk_norm=False,
                               eps=1e-6, bias=False, longrope=(0, 1.0)), "longrope"),
    (lambda: E.kv_write_kernel("sm_80", "float32", kv_heads=2, head_dim=64, page_size=16), "bfloat16 or float16"),
    (lambda: E.kv_write_kernel("sm_80", "float16", kv_heads=2, head_dim=64, page_size=0), "page_size"),
    (lambda: E.take_rows_kernel("sm_80", width=0), "width"),
    (lambda: E.take_rows_kernel("sm_80", width=8, dtype="int64"), "dtype"),
    (lambda: E.cast_kernel("sm_80", "float32", "float32"), "both float32"),
    (lambda: E.cast_kernel("sm_80", "float32", "uint8"), "dtype"),
    (lambda: E.sample_kernel("sm_80", vocab=1 << 24), "exceeds"),
    (lambda: E.argmax_kernel("sm_80", vocab=0), "positive"),
])
def test_builders_reject_what_they_cannot_build(call, message):
    with pytest.raises(ReftError, match=message) as e:
        call()
    assert "\n" not in str(e.value)


# -- embedding dequantization, compiled for the host ---------------------------------------------------

HOST_SHIM = r"""
#include <cstdio>
#include <cstring>
#include <vector>
#define __device__
#define __forceinline__ inline
struct __half { unsigned short x; };
inline __half __ushort_as_half(unsigned short v) { return __half{v}; }
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.x, 2); return (float)f; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
"""

HOST_MAIN = r"""
int main(int argc, char** argv) {
    int n = 0;
    std::sscanf(argv[1], "%d", &n);
    std::vector<unsigned char> raw((size_t)n * ROW_BYTES);
    std::FILE* f = std::fopen(argv[2], "rb");
    if (std::fread(raw.data(), 1, raw.size(), f) != raw.size()) return 1;
    std::fclose(f);
    std::vector<float> out((size_t)n * H);
    for (int r = 0; r < n; ++r)
        for (int j = 0; j < H; ++j) out[(size_t)r * H + j] = dequant(raw.data() + (size_t)r * ROW_BYTES, j);
    f = std::fopen(argv[3], "wb");
    std::fwrite(out.data(), 4, out.size(), f);
    std::fclose(f);
    return 0;
}
"""


def _random_rows(fmt: str, n: int, k: int, rng) -> np.ndarray:
    from reft.ir.quantized import GGML_NAMES

    if fmt in GGML_NAMES:
        from quant_blocks import random_blocks

        return random_blocks(GGML_NAMES[fmt], n * k // QUANT_DTYPES[fmt][0], rng).reshape(n, row_bytes(fmt, k))
    return quantize_weight(rng.normal(0, 2, (n, k)).astype(np.float32), fmt)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a host C++ compiler")
@pytest.mark.parametrize("fmt,hidden", [(f, h) for f in E.EMBED_FORMATS for h in (256, 320, 64)
                                        if h % 256 == 0 or not f.endswith("_k")])
def test_embedding_dequantization_matches_the_numpy_formats(fmt, hidden, tmp_path):
    """The template's dequant(row, j), compiled for the host with the intrinsics as plain float
    operations, gives reft's numpy values bit for bit (320 = 2 x 128 + 64: int4_g128's short group)."""
    k = E.embedding_kernel("sm_80", table_dtype=fmt, hidden=hidden)
    src = k.render()
    body = src[src.index("namespace {") + len("namespace {"):src.index("}  // namespace")]
    (tmp_path / "dq.cpp").write_text(HOST_SHIM + body + HOST_MAIN)
    subprocess.run(["g++", "-std=c++17", "-O1", "-ffp-contract=off", "-o", str(tmp_path / "dq"),
                    str(tmp_path / "dq.cpp")], check=True, capture_output=True)
    rng = np.random.default_rng(hidden)
    raw = _random_rows(fmt, 5, hidden, rng)
    (tmp_path / "in.bin").write_bytes(raw.tobytes())
    subprocess.run([str(tmp_path / "dq"), "5", str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], check=True)
    got = np.fromfile(tmp_path / "out.bin", np.float32).reshape(5, hidden)
    want = dequantize_rows(raw, fmt, hidden)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


# -- the sample kernel's selection: a numpy model of its algorithm against the host sampler ----------

MASS = np.float32(2.0 ** E.SAMPLE_MASS_BITS)
LEVELS = ((21, 2048), (10, 2048), (0, 1024))   # (shift, bins) of the radix digits


NEG_INF_KEY = np.uint32(~np.uint32(0xFF800000))


def _keys(x: np.ndarray, nan_high: bool) -> np.ndarray:
    """The kernel's order-preserving keys: -0 is +0; a NaN above everything (argmax) or as -inf."""
    x = np.where(x == 0, np.float32(0), x).astype(np.float32)
    b = x.view(np.uint32)
    k = np.where(b & 0x80000000, ~b, b | 0x80000000).astype(np.uint32)
    return np.where(np.isnan(x), np.uint32(0xFFFFFFFF) if nan_high else NEG_INF_KEY, k)


class KernelModel:
    """The sample kernel's steps on one row, in numpy: keys, 40-bit fixed-point weights, three radix
    levels with histograms scanned from the top, ties resolved in index order. (The kernel's shared
    list of top-k candidates only changes where the set is read from, not what is selected.)"""

    def __init__(self, logits: np.ndarray, temp: float):
        self.x = np.asarray(logits, np.float32)
        self.keys = _keys(self.x, nan_high=False)
        self.idx = np.arange(self.x.size)
        best = (self.keys.astype(np.uint64) << np.uint64(32)) | (np.uint64(0xFFFFFFFF) - self.idx.astype(np.uint64))
        self.top = int(np.uint64(0xFFFFFFFF) - (best.max() & np.uint64(0xFFFFFFFF)))
        t = np.float32(temp)
        with np.errstate(invalid="ignore", over="ignore"):
            e = np.exp((_value_vec(self.keys) - _value_vec(self.keys[self.top])) / t).astype(np.float32)
        self.w = np.where(e > 0, np.floor(e * MASS), 0).astype(np.uint64)

    def member(self, tau: int, cut: int) -> np.ndarray:
        return (self.keys > tau) | ((self.keys == tau) & (self.idx < cut))

    def select(self, inset: np.ndarray, mode: str, param: float) -> tuple[int, int] | None:
        w = np.ones(self.x.size, np.uint64) if mode == "count" else self.w
        prefix, fixed, target = 0, 0, 0
        for level, (shift, nb) in enumerate(LEVELS):
            m = inset & ((self.keys & np.uint32(fixed)) == prefix)
            hist = np.zeros(nb, np.uint64)
            np.add.at(hist, (self.keys[m] >> np.uint32(shift)) & np.uint32(nb - 1), w[m])
            desc = hist[::-1]
            cum = np.cumsum(desc, dtype=np.uint64)
            if level == 0:
                total = int(cum[-1])
                if total == 0:
                    return None
                target = {"count": lambda: int(param), "top_p": lambda: int(np.ceil(np.float64(param) * total)),
                          "draw": lambda: int(np.floor(np.float64(param) * total)) + 1}[mode]()
                target = min(max(target, 1), total)
            pos = int(np.argmax(cum >= np.uint64(target)))
            target -= int(cum[pos] - desc[pos])
            prefix |= (nb - 1 - pos) << shift
            fixed |= (nb - 1) << shift
        wt = 1 if mode == "count" else int(self.w[self.keys == prefix][0])
        j = (target - 1) // wt
        ties = np.flatnonzero(self.keys == prefix)
        return prefix, int(ties[inset[ties]].min()) if j == 0 else int(ties[j])

    def sample(self, top_k: int, top_p: float, u: float) -> int:
        V = self.x.size
        u = min(max(float(np.float32(u)), 0.0), float.fromhex("0x1.fffffep-1"))
        use_k, use_p = 0 < top_k < V, np.float32(top_p) < 1
        if not use_k and not use_p:
            total = int(self.w.sum(dtype=np.uint64))
            target = min(int(np.floor(u * total)) + 1, total)
            return int(np.argmax(np.cumsum(self.w, dtype=np.uint64) >= np.uint64(target)))
        c = np.ones(V, bool)
        if use_k:
            tau, last = self.select(c, "count", top_k)
            c = self.member(tau, last + 1)
        n = c
        if use_p:
            got = self.select(c, "top_p", float(np.float32(top_p)))
            if got is None:
                return self.top
            n = self.member(got[0], got[1] + 1)
        got = self.select(n, "draw", u)
        return self.top if got is None else got[1]


def _value_vec(keys: np.ndarray) -> np.ndarray:
    return np.where(keys & 0x80000000, keys & 0x7FFFFFFF, ~keys).astype(np.uint32).view(np.float32)


def model_token(logits, temp, top_k, top_p, u) -> int:
    if not temp > 0:
        k = _keys(np.asarray(logits, np.float32), nan_high=True)
        return int(np.argmax(k))
    return KernelModel(logits, temp).sample(top_k, top_p, u)


def host_token(logits, temp, top_k, top_p, u) -> int:
    s = Sampler(SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=0.0))
    s.rng = type("FixedU", (), {"random": lambda self: float(np.float32(u))})()
    return s(np.asarray(logits, np.float32))


def _cases(rng, n: int, V: int, ties: bool = False):
    for _ in range(n):
        x = rng.normal(0, rng.choice([1.0, 3.0, 8.0]), V).astype(np.float32)
        if ties:
            x = (np.round(x * 2) / 2).astype(np.float32)
        yield x, float(rng.choice([0.5, 0.75, 1.0, 1.5])), float(rng.random())


def test_model_matches_the_host_sampler_without_filters():
    rng = np.random.default_rng(0)
    for x, t, u in _cases(rng, 150, 512):
        assert model_token(x, t, 0, 1.0, u) == host_token(x, t, 0, 1.0, u)
    for x, t, u in _cases(rng, 50, 1000, ties=True):
        assert model_token(x, t, 0, 1.0, u) == host_token(x, t, 0, 1.0, u)


@pytest.mark.parametrize("top_k,top_p", [(0, 0.5), (0, 0.9), (0, 0.95), (1, 0.9), (5, 0.8), (40, 0.95),
                                         (300, 0.9), (3000, 0.99)])
def test_model_matches_the_host_sampler_with_top_p(top_k, top_p):
    rng = np.random.default_rng(top_k * 7 + int(top_p * 100))
    for x, t, u in _cases(rng, 60, 4096):
        assert model_token(x, t, top_k, top_p, u) == host_token(x, t, top_k, top_p, u), (top_k, top_p, t, u)


def test_model_matches_the_host_sampler_on_equal_logits():
    """Equal logits: the host's stable sort puts the lower index first (top_p without top_k)."""
    rng = np.random.default_rng(3)
    for x, t, u in _cases(rng, 120, 512, ties=True):
        assert model_token(x, t, 0, 0.9, u) == host_token(x, t, 0, 0.9, u)


@pytest.mark.parametrize("top_k", [1, 2, 40, 400])
def test_model_with_top_k_alone_draws_from_the_host_candidates_in_decreasing_order(top_k):
    """With top_k alone the host draws in np.argpartition's order; the kernel draws the same
    candidates, with the same weights, in decreasing order (see sample.cu.j2)."""
    rng = np.random.default_rng(top_k)
    for x, t, u in _cases(rng, 40, 2048):
        s = Sampler(SamplingParams(temperature=t, top_k=top_k, top_p=1.0, min_p=0.0))
        ids, probs = s.distribution(x)
        order = np.lexsort((ids, -x[ids]))
        cdf = np.cumsum(probs[order])
        want = ids[order][min(int(np.searchsorted(cdf, float(np.float32(u)) * cdf[-1], side="right")), ids.size - 1)]
        assert model_token(x, t, top_k, 1.0, u) == want


def test_model_greedy_is_numpy_argmax():
    x = np.array([1.0, 3.0, -0.0, 3.0, 0.0], np.float32)
    assert model_token(x, 0.0, 40, 0.9, 0.5) == host_token(x, 0.0, 40, 0.9, 0.5) == 1
    x = np.array([1.0, np.nan, 7.0, np.nan], np.float32)
    assert model_token(x, 0.0, 0, 1.0, 0.5) == int(np.argmax(x)) == 1
    x = np.array([-0.0, 0.0, -1.0], np.float32)
    assert model_token(x, 0.0, 0, 1.0, 0.0) == int(np.argmax(x)) == 0


def test_model_edge_cases():
    x = np.array([0.0, -np.inf, 2.0, np.nan, 2.0], np.float32)
    m = KernelModel(x, 1.0)
    assert m.top == 2 and m.w[1] == 0 and m.w[3] == 0 and m.w[2] == m.w[4] == int(MASS)
    for u in (0.0, 0.3, 0.7, 0.999999):
        tok = model_token(x, 1.0, 0, 1.0, u)
        assert tok in (0, 2, 4)
        assert model_token(x, 1.0, 2, 1.0, u) in (2, 4)      # the two equal largest logits
    assert model_token(x, 1.0, 1, 1.0, 0.9) == 2             # top_k = 1 takes the lower index of a tie
    assert model_token(x, 1.0, 0, 0.01, 0.9) == 2            # a tiny top_p keeps the top token
    assert model_token(x, 1.0, 0, 1.0, 1.0) in (0, 2, 4)     # u = 1 is clamped below 1


@pytest.mark.parametrize("top_k", [1, 3, 17, 100, 511])
def test_model_top_k_set_takes_the_lowest_indices_of_equal_logits(top_k):
    x = np.random.default_rng(top_k).integers(-3, 4, 512).astype(np.float32)   # many equal logits
    m = KernelModel(x, 1.0)
    tau, last = m.select(np.ones(x.size, bool), "count", top_k)
    c = m.member(tau, last + 1)
    order = np.lexsort((np.arange(x.size), -x))
    assert c.sum() == top_k and set(np.flatnonzero(c)) == set(order[:top_k])
