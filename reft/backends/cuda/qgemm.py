"""Quantized prompt GEMM: out[M, N] = epilogue(A[M, K] . dequant(W)^T) for M > 8 tokens.

W stays in its stored blocks (uint8 rows, reft/ir/quantized.py); each k-tile of W is dequantized
into shared memory as half, then multiplied on the tensor cores. Design choices:

- Plain CUDA with inline PTX (mma.sync m16n8k16 with fp32 accumulators, ldmatrix.x4, cp.async),
  not CuTe: one instantiation per weight format and shape compiles in well under a second,
  against ~30 s for a CuTe sm_80 GEMM. mma.sync runs on sm_80, sm_89 and sm_90a alike.
- Tile BM=64 x BN (64 or 128 weight rows) x BK=32, warps 2 x BN/32, each warp 32 x 32. A goes
  global -> shared with cp.async (zero-filled past M), W through registers: a thread reads the raw
  words of its two 8-value units of the next k-tile before the MMAs of the current one and
  decodes them (quant_formats.cuh.j2, the decode the GEMV uses) into the other shared buffer
  after, so both loads overlap the math; one __syncthreads per k-tile. Shared rows are padded to
  BK + 8 halves (80 bytes), so ldmatrix reads are free of bank conflicts.
- GLU: the tile's rows are arranged so that each warp's n8 tiles 0-1 are gate rows and 2-3 the up
  rows of the same 16 output columns; a thread then holds gate and up of each of its outputs.
- Epilogue as the GEMM's (gemm.py): + bias (fp32 [N]; [2N] for GLU), GLU, + residual (fp32
  [M, N], may be out), store fp32 or half, adjacent column pairs as one vector when N is even.
- BN = 128 when W has at least WIDE_N rows (enough column tiles to fill the GPU), else 64.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import arch as archs
from .gemv import EPILOGUES, HALF, GemvError, check_common, format_params
from .kernel import Arg, Kernel, with_params

BM = 64
BK = 32
WIDE_N = 4096


@dataclass(frozen=True)
class QTile:
    bm: int
    bn: int        # weight rows per tile (GLU: gate bn/2 + up bn/2)
    bk: int

    @property
    def warps_n(self) -> int:
        return self.bn // 32

    @property
    def threads(self) -> int:
        return 64 * self.warps_n   # warps 2 (M) x warps_n, 32 x 32 each

    def smem(self) -> int:
        """Static shared memory: two buffers of the A and W tiles, rows padded by 8 halves."""
        return 2 * (self.bm + self.bn) * (self.bk + 8) * 2

    def text(self, glu: bool) -> str:
        n = f"(2x{self.bn // 2})" if glu else str(self.bn)
        return f"{self.bm}x{n}x{self.bk} mma.sync, W dequantized to smem, 2 buffers"


def choose_qtile(arch: str, N: int, glu: bool) -> QTile:
    archs.get(arch)
    rows = 2 * N if glu else N
    return QTile(BM, 128 if rows >= WIDE_N else 64, BK)


def qgemm_kernel(arch: str, wdtype: str, dtype: str, *, K: int, N: int, epilogue: str = "none", bias: bool = False,
                 residual: bool = False, out_dtype: str = "float32", nodes=()) -> Kernel:
    """out[M, N] = epilogue(A[M, K] . W^T) for a quantized W.

    Args, in order: A (half = dtype, [M, K] row-major), W (uint8 rows of wdtype: [N, K]; [2N, K]
    for GLU), [bias (fp32 [N]; [2N] for GLU)], [residual (fp32 [M, N]; may be out)], out ([M, N]:
    float32, or half = dtype), M, N (output columns), K (a multiple of 32 and of the format's block).
    epilogue: "none", or "silu" / "gelu_tanh" for out = act(gate) * up.
    """
    who = "qgemm"
    a = archs.get(arch)
    fmt = check_common(who, wdtype, dtype, K, N, epilogue, out_dtype)
    if fmt.dense:
        raise GemvError(f"{who}: weight dtype {wdtype} is not quantized (dense weights use gemm)")
    if K % BK:
        raise GemvError(f"{who}: K must be a multiple of {BK}, got {K}")
    glu = epilogue != "none"
    tile = choose_qtile(a.name, N, glu)
    out_half = out_dtype != "float32"
    short = HALF[dtype]
    args = [Arg("A", "ptr"), Arg("W", "ptr")]
    args += [Arg("bias", "ptr")] if bias else []
    args += [Arg("residual", "ptr")] if residual else []
    args += [Arg("out", "ptr"), Arg("M", "i32"), Arg("N", "i32"), Arg("K", "i32")]
    tn = tile.bn // 2 if glu else tile.bn
    params = dict(format_params(fmt, K), htype=dtype, mma=short, act_bf16=int(dtype == "bfloat16"),
                  out_half=int(out_half), K=K, N=N, row_bytes=fmt.row_bytes(K), bm=tile.bm,
                  bn=tile.bn, bk=tile.bk, act=EPILOGUES[epilogue], bias=int(bias), residual=int(residual),
                  tile=tile.text(glu))
    name = (f"qgemm_{a.name.replace('_', '')}_{wdtype}_{short}_{N}x{K}_{epilogue}{'_bias' if bias else ''}"
            f"{'_res' if residual else ''}_out{short if out_half else 'f32'}")
    return Kernel(name=name, template="qgemm.cu.j2", args=tuple(args), block=(tile.threads, 1, 1),
                  grid=(f"cdiv(N, {tn})", f"cdiv(M, {tile.bm})", "1"), params=with_params(**params), smem=0,
                  tile=tile.text(glu), nodes=tuple(nodes))
