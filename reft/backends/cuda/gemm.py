"""Prompt-sized GEMM kernels: out[M, N] = epilogue(A[M, K] . W[N, K]^T), half in, fp32 accumulate.

A is the half activation, row-major [M, K]; W the weight, row-major [N, K] ("TN": the IR's layout,
never relaid). M (tokens), N and K are runtime ints; K must be a multiple of 8 (16-byte rows for
cp.async/TMA) and A, W 16-byte aligned; ragged M, N and K tiles are predicated (cp.async zero-fill
on sm_80/sm_89, TMA's out-of-bounds zero fill on sm_90a; stores are bounds-checked).

Design choices:
- sm_80 / sm_89 (gemm_sm80.cu.j2): CuTe's SM80_16x8x16 F32 mma.sync atom and ldmatrix.x4 atom
  called directly over a warp grid (the fragment and lane mappings are spelled out in the template:
  CuTe's TiledMMA/TiledCopy partitioning cost 4x the compile time, ~17 s against ~4 s), a
  cp.async multi-stage smem pipeline (one __syncthreads per k-tile), K-major smem rows of 128 bytes
  swizzled with CuTe's Swizzle<3,3,3> so that cp.async stores and ldmatrix loads are conflict-free.
- sm_90a (gemm_sm90.cu.j2): CuTe GMMA (wgmma) atoms through a TiledMMA, reading 128B-swizzled smem
  (GMMA::Layout_K_SW128_Atom) that TMA fills (TMA's 128B swizzle writes that very layout); one
  full-barrier (mbarrier with transaction bytes) per stage, one warpgroup per 64 rows of the tile,
  one wgmma batch left in flight; thread 0 issues the TMA loads of the stage the previous k-tile
  freed, after a __syncthreads. Not warp-specialized.
- GLU (epilogue "silu" / "gelu_tanh", weight [2N, K]): each stage holds two B tiles, the gate
  rows n0.. and the up rows N+n0.., multiplied into two accumulators the thread owns element for
  element, so act(gate) * up needs no data exchange and W keeps its layout. The CTA then covers
  tile.bn / 2 output columns.
- Epilogue: + bias (fp32, [N]; [2N] for GLU: gate then up), GLU, + residual (fp32 [M, N], may be
  the same buffer as out), store fp32 or half; pairs of adjacent columns stored as one vector when
  N is even.
- Tiles depend on the arch and the M bucket only ("small": M <= 64, "large"), not on N or K, so
  that every linear of a plan shares one instantiation per (bucket, epilogue): each takes seconds
  to compile (sm_80 ~4 s, sm_90a ~6 s). `bucket_for(M)` picks the bucket at run time.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import ReftError
from . import arch as archs
from .kernel import Arg, Kernel, TmaSpec, with_params

# dtype -> (CUDA type, CuTe type, name part, MMA atom part)
HALF = {"bfloat16": ("__nv_bfloat16", "cute::bfloat16_t", "bf16", "BF16"),
        "float16": ("__half", "cute::half_t", "f16", "F16")}
OUT = ("float32", "half")
EPILOGUES = {"none": 0, "silu": 1, "gelu_tanh": 2}
SMALL_M = 64                  # the small bucket serves M <= SMALL_M
SM90_ALIGN = 1024             # 128B-swizzled TMA/wgmma tiles start on a 1024-byte boundary


class GemmError(ReftError):
    pass


@dataclass(frozen=True)
class Tile:
    """One CTA's work: bm rows x bn weight rows per k-tile of bk, `stages` smem stages."""
    bm: int
    bn: int                   # W rows per stage (GLU: gate bn/2 + up bn/2)
    bk: int
    stages: int
    threads: int
    instr: str                # "mma.sync" or "wgmma"
    warps_m: int = 2          # mma.sync warp grid
    warps_n: int = 2

    def smem(self, elem: int = 2) -> int:
        tiles = self.stages * (self.bm + self.bn) * self.bk * elem
        if self.instr == "wgmma":   # + one mbarrier per stage + alignment slack
            return tiles + 8 * self.stages + SM90_ALIGN
        return tiles

    def text(self, glu: bool) -> str:
        n = f"(2x{self.bn // 2})" if glu else str(self.bn)
        load = "TMA" if self.instr == "wgmma" else "cp.async"
        return f"{self.bm}x{n}x{self.bk} {self.stages}-stage {self.instr} {load}"


_TILES = {
    ("sm_80", "small"): Tile(64, 64, 64, 4, 128, "mma.sync"),
    ("sm_80", "large"): Tile(128, 128, 64, 3, 256, "mma.sync", 2, 4),
    ("sm_89", "small"): Tile(64, 64, 64, 4, 128, "mma.sync"),
    ("sm_89", "large"): Tile(128, 128, 64, 3, 256, "mma.sync", 2, 4),
    ("sm_90a", "small"): Tile(64, 64, 64, 6, 128, "wgmma"),
    ("sm_90a", "large"): Tile(128, 128, 64, 4, 256, "wgmma"),
}


def buckets() -> list[str]:
    return ["small", "large"]


def bucket_for(M: int) -> str:
    """The problem-size bucket of a GEMM with M rows (tokens)."""
    if M < 1:
        raise GemmError(f"gemm: M must be >= 1, got {M}")
    return "small" if M <= SMALL_M else "large"


def choose_tile(arch: str, bucket: str, N: int | None = None, K: int | None = None) -> Tile:
    """The tile of `bucket` on `arch`; N and K (when known) are checked against what the kernels
    support. The tile itself does not depend on them (one instantiation per bucket)."""
    a = archs.get(arch)
    if bucket not in buckets():
        raise GemmError(f"gemm: unknown bucket {bucket!r}; choose one of {', '.join(buckets())}")
    if N is not None and N < 1:
        raise GemmError(f"gemm: N must be >= 1, got {N}")
    if K is not None and (K < 8 or K % 8):
        raise GemmError(f"gemm: K must be a positive multiple of 8 (16-byte rows), got {K}")
    tile = _TILES[(a.name, bucket)]
    if tile.smem() > a.smem_per_block:
        raise GemmError(f"gemm: tile {tile.text(False)} needs {tile.smem()} bytes of shared memory, "
                        f"more than {a.name}'s {a.smem_per_block}")
    return tile


def gemm_kernel(arch: str, dtype: str, *, bucket: str = "large", epilogue: str = "none", bias: bool = False,
                residual: bool = False, out_dtype: str = "float32", nodes=()) -> Kernel:
    """out[M, N] = epilogue(A[M, K] . W[N, K]^T) for M in `bucket`.

    Args, in order: A (half [M, K]), W (half [N, K]; [2N, K] for GLU), [bias (fp32 [N]; [2N] for
    GLU)], [residual (fp32 [M, N])], out ([M, N], out_dtype: "float32" or "half" = dtype), M, N
    (output columns), K (a multiple of 8); on sm_90a then tmA, tmW (TMA descriptors of A and W).
    epilogue: "none", or "silu" / "gelu_tanh" for out = act(gate) * up.
    """
    a = archs.get(arch)
    if dtype not in HALF:
        raise GemmError(f"gemm: dtype must be bfloat16 or float16, got {dtype!r}")
    if epilogue not in EPILOGUES:
        raise GemmError(f"gemm: unknown epilogue {epilogue!r}; choose one of {', '.join(EPILOGUES)}")
    if out_dtype not in OUT and out_dtype != dtype:
        raise GemmError(f"gemm: out_dtype must be float32 or the compute dtype {dtype}, got {out_dtype!r}")
    out_half = out_dtype != "float32"
    tile = choose_tile(a.name, bucket)
    glu = epilogue != "none"
    tn = tile.bn // 2 if glu else tile.bn
    htype, ctype, short, mma_dtype = HALF[dtype]
    out_ctype = htype if out_half else "float"

    args = [Arg("A", "ptr"), Arg("W", "ptr")]
    args += [Arg("bias", "ptr")] if bias else []
    args += [Arg("residual", "ptr")] if residual else []
    args += [Arg("out", "ptr"), Arg("M", "i32"), Arg("N", "i32"), Arg("K", "i32")]
    params = dict(htype=htype, ctype=ctype, out_ctype=out_ctype, bm=tile.bm, tn=tn, nb=2 if glu else 1, bk=tile.bk,
                  stages=tile.stages, threads=tile.threads, bias=int(bias), residual=int(residual),
                  act=EPILOGUES[epilogue], tile=tile.text(glu))
    tmaps = ()
    if a.wgmma:
        template = "gemm_sm90.cu.j2"
        params["mma_atom"] = f"SM90_64x{tn}x16_F32{mma_dtype}{mma_dtype}_SS<GMMA::Major::K, GMMA::Major::K>"
        params["warpgroups"] = tile.bm // 64
        params["align"] = SM90_ALIGN
        args += [Arg("tmA", "tmap"), Arg("tmW", "tmap")]
        tm_a = TmaSpec("A", dtype, dims=("K", "M"), strides=("K*2",), box=(tile.bk, tile.bm))
        if glu:   # (k, row, gate|up): one box brings gate rows n0.. and up rows N+n0.. together
            tm_w = TmaSpec("W", dtype, dims=("K", "N", "2"), strides=("K*2", "N*K*2"), box=(tile.bk, tn, 2))
        else:
            tm_w = TmaSpec("W", dtype, dims=("K", "N"), strides=("K*2",), box=(tile.bk, tn))
        tmaps = (("tmA", tm_a), ("tmW", tm_w))
    else:
        template = "gemm_sm80.cu.j2"
        params["mma_atom"] = f"SM80_16x8x16_F32{mma_dtype}{mma_dtype}F32_TN"
        params["warps_m"], params["warps_n"] = tile.warps_m, tile.warps_n
    name = (f"gemm_{a.name.replace('_', '')}_{short}_{bucket}_{epilogue}{'_bias' if bias else ''}"
            f"{'_res' if residual else ''}_out{short if out_half else 'f32'}")
    return Kernel(name=name, template=template, args=tuple(args), block=(tile.threads, 1, 1),
                  grid=(f"cdiv(N, {tn})", f"cdiv(M, {tile.bm})", "1"), params=with_params(**params),
                  smem=tile.smem(), tile=tile.text(glu), heavy=True, tmaps=tmaps, nodes=tuple(nodes))
