"""The CuTe GEMM kernels (reft/backends/cuda/gemm.py): the instantiations a Llama-shaped plan uses
compile for sm_80 and sm_90a in bf16 and fp16, both M buckets, within the arch limits, with tensor
core instructions in their SASS; launch geometry for token counts 1 .. 4096 on 1B-model shapes;
tile sizing and builder validation."""
import itertools

import pytest

pytest.importorskip("cuda.bindings")

from reft.backends.cuda import arch as archs  # noqa: E402
from reft.backends.cuda import gemm, toolchain  # noqa: E402
from reft.backends.cuda.kernel import cdiv  # noqa: E402
from reft.errors import ReftError  # noqa: E402

needs_nvrtc = pytest.mark.skipif(not (toolchain.available() and toolchain.has_cutlass()),
                                 reason="NVRTC or the CUTLASS headers are not installed")

DTYPES = ("bfloat16", "float16")
# what a Llama-shaped plan instantiates per (arch, dtype, bucket): lm_head / qkv (plain fp32 out),
# o_proj / down_proj (residual add; with bias for the families that have one), gate_up (SiLU-GLU, half out)
VARIANTS = {"plain": dict(), "bias_res": dict(bias=True, residual=True),
            "glu": dict(epilogue="silu", out_dtype="half")}
# one sm_89 instantiation: the large tile in its 99 KiB of smem, and the gelu_tanh epilogue
SM89 = [("sm_89", "bfloat16", "large", dict(epilogue="gelu_tanh", out_dtype="half"))]
# (N, K) of a Llama-3.2-1B layer and head: qkv, o_proj, gate_up (N = intermediate), down, lm_head
SHAPES_1B = [(3072, 2048), (2048, 2048), (8192, 2048), (2048, 8192), (128256, 2048)]
SHAPES_TINY = [(64 + 2 * 32, 64), (64, 64), (176, 64), (64, 176), (512, 64), (96, 96)]


def plan(arch: str) -> list[tuple]:
    if arch == "sm_89":
        return SM89
    return [(arch, dt, b, v) for dt in DTYPES for b in gemm.buckets() for v in VARIANTS.values()]


def build(spec: tuple):
    arch, dtype, bucket, kw = spec
    return gemm.gemm_kernel(arch, dtype, bucket=bucket, nodes=("test",), **kw)


@pytest.fixture(scope="module")
def compiled():
    """arch -> [(Kernel, Compiled)]: every instantiation compiled once, one compile_kernels call per arch."""
    out = {}
    for a in ("sm_80", "sm_90a", "sm_89"):
        ks = [build(s) for s in plan(a)]
        res = toolchain.compile_kernels(ks, a, jobs=2)
        out[a] = [(k, res[k.name]) for k in ks]
    return out


@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a", "sm_89"])
def test_resources_within_limits(compiled, arch):
    a = archs.get(arch)
    for k, c in compiled[arch]:
        r = c.resources
        assert r.spill_stores == 0 and r.spill_loads == 0 and r.stack == 0, (k.name, r)
        assert r.registers <= a.regs_per_thread and r.registers * k.threads <= a.regs_per_sm, (k.name, r)
        assert k.smem + r.smem <= a.smem_per_block, (k.name, k.smem, r)
        assert archs.blocks_per_sm(a, k.threads, r.registers, k.smem + r.smem) >= 1, k.name


@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a", "sm_89"])
def test_tensor_core_sass(compiled, arch):
    want = {"HGMMA", "UTMALDG", "SYNCS"} if archs.get(arch).wgmma else {"HMMA", "LDGSTS", "LDSM"}
    for k, c in compiled[arch]:
        ops = toolchain.sass_opcodes(toolchain.sass(c.cubin))
        assert want <= ops, (k.name, want - ops)
        assert "STL" not in ops and "LDL" not in ops, k.name   # no local-memory traffic


@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a", "sm_89"])
def test_launch_geometry(compiled, arch):
    a = archs.get(arch)
    by_name = {k.name: (k, c) for k, c in compiled[arch]}
    for M, (N, K) in itertools.product((1, 17, 64, 65, 512, 4096), SHAPES_1B + SHAPES_TINY):
        for _, dtype, bucket, kw in plan(arch):
            if bucket != gemm.bucket_for(M):
                continue
            k, c = by_name[build((arch, dtype, bucket, kw)).name]
            grid = k.launch_grid({"M": M, "N": N, "K": K})
            p = dict(k.params)
            assert grid == (cdiv(N, p["tn"]), cdiv(M, p["bm"]), 1)
            archs.check_launch(a, k.name, k.block, grid, k.smem, c.resources.registers, c.resources.smem)


@needs_nvrtc
def test_source_names_template_and_nodes(compiled):
    """The rendered source names its template and IR nodes; what NVRTC compiles (and caches) is the
    same source without the node comment, shared by every node that uses the instantiation."""
    k, c = compiled["sm_80"][0]
    assert c.source.startswith(f"// {k.name}: templates/gemm_sm80.cu.j2")
    assert "IR nodes: test" in k.render() and "IR nodes: test" not in c.source
    assert k.render().replace("IR nodes: test", "IR nodes: -") == c.source


# -- sizing and validation: no compiler needed ---------------------------------------------------
def test_bucket_for():
    assert [gemm.bucket_for(m) for m in (1, 17, 64, 65, 512, 4096)] == ["small"] * 3 + ["large"] * 3
    assert set(gemm.buckets()) == {"small", "large"}
    with pytest.raises(ReftError, match="M must be >= 1"):
        gemm.bucket_for(0)


@pytest.mark.parametrize("arch,bucket", list(itertools.product(archs.ARCHS, ["small", "large"])))
def test_choose_tile_fits_arch(arch, bucket):
    a = archs.get(arch)
    t = gemm.choose_tile(arch, bucket, 2048, 8192)
    assert t.smem() <= a.smem_per_block and t.threads <= a.threads_per_block
    assert t.bk == 64 and t.bn % 32 == 0 and t.bm % 16 == 0
    if a.wgmma:
        assert t.instr == "wgmma" and t.bm % 64 == 0 and t.threads == 128 * (t.bm // 64)
    else:
        assert t.instr == "mma.sync" and t.threads == 32 * t.warps_m * t.warps_n
        assert t.bm % (16 * t.warps_m) == 0 and (t.bn // 2) % (16 * t.warps_n) == 0   # GLU halves too
    # the small bucket's M tile covers it in one row of CTAs
    assert (t.bm >= gemm.SMALL_M) if bucket == "small" else t.bm >= 128


def test_choose_tile_rejects():
    with pytest.raises(ReftError, match="multiple of 8"):
        gemm.choose_tile("sm_80", "large", 2048, 2050)
    with pytest.raises(ReftError, match="N must be >= 1"):
        gemm.choose_tile("sm_80", "large", 0, 64)
    with pytest.raises(ReftError, match="unknown bucket"):
        gemm.choose_tile("sm_80", "huge", 64, 64)
    with pytest.raises(ReftError, match="unknown CUDA architecture"):
        gemm.choose_tile("sm_70", "large", 64, 64)


def test_builder_rejects():
    with pytest.raises(ReftError, match="dtype must be bfloat16 or float16"):
        gemm.gemm_kernel("sm_80", "float32")
    with pytest.raises(ReftError, match="unknown epilogue"):
        gemm.gemm_kernel("sm_80", "bfloat16", epilogue="relu")
    with pytest.raises(ReftError, match="out_dtype"):
        gemm.gemm_kernel("sm_80", "bfloat16", out_dtype="float16")
    with pytest.raises(ReftError, match="unknown bucket"):
        gemm.gemm_kernel("sm_90a", "bfloat16", bucket="medium")


def test_args_grid_and_tma():
    k = gemm.gemm_kernel("sm_80", "bfloat16", bias=True, residual=True)
    assert [(a.name, a.kind) for a in k.args] == [("A", "ptr"), ("W", "ptr"), ("bias", "ptr"), ("residual", "ptr"),
                                                  ("out", "ptr"), ("M", "i32"), ("N", "i32"), ("K", "i32")]
    assert k.heavy and k.tile == "128x128x64 3-stage mma.sync cp.async" and k.tmaps == ()
    assert k.launch_grid({"M": 4096, "N": 2048, "K": 2048}) == (16, 32, 1)

    g = gemm.gemm_kernel("sm_90a", "float16", epilogue="silu", out_dtype="half")
    assert [a.name for a in g.args] == ["A", "W", "out", "M", "N", "K", "tmA", "tmW"]
    assert g.tile == "128x(2x64)x64 4-stage wgmma TMA"
    assert g.launch_grid({"M": 17, "N": 8192, "K": 2048}) == (128, 1, 1)   # 64 output columns per CTA
    tm = dict(g.tmaps)
    assert tm["tmA"].tensor == "A" and tm["tmA"].dims == ("K", "M") and tm["tmA"].box == (64, 128)
    # gate and up rows of W[2N, K] as one (K, N, 2) tensor: one box brings both halves
    assert tm["tmW"].dims == ("K", "N", "2") and tm["tmW"].strides == ("K*2", "N*K*2")
    assert tm["tmW"].box == (64, 64, 2) and tm["tmW"].swizzle == 128
    assert g.smem <= archs.get("sm_90a").smem_per_block


def test_names_unique_per_instantiation():
    combos = list(itertools.product(["sm_80", "sm_89", "sm_90a"], DTYPES, gemm.buckets(), gemm.EPILOGUES,
                                    [False, True], [False, True], ["float32", "half"]))
    ks = [gemm.gemm_kernel(a, d, bucket=b, epilogue=e, bias=bi, residual=r, out_dtype=o)
          for a, d, b, e, bi, r, o in combos]
    assert len({k.name for k in ks}) == len(combos)
    # "half" and the compute dtype's own name are one instantiation
    assert gemm.gemm_kernel("sm_80", "float16", out_dtype="half") == gemm.gemm_kernel("sm_80", "float16",
                                                                                      out_dtype="float16")
