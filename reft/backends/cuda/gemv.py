"""Decode GEMV: out[m, n] = epilogue(sum_k A[m, k] W[n, k]) for 1-8 token rows, any weight dtype.

Weights are read as the IR stores them: dense bfloat16 / float16 / float32 rows, or uint8 rows of
quantized blocks (reft/ir/quantized.py), byte for byte. The kernel is bandwidth-bound, so it is
built around streaming W once:

- Every format is decoded in units of 8 consecutive values: lane l of a warp handles values
  8l .. 8l+7 of each 256-value slice of K, so its activations are one 16-byte read and the same
  decode (quant_formats.cuh.j2, struct WF) serves the GEMV and the quantized prompt GEMM. A unit
  dequantizes to d * q + m (one scale and offset per unit, q exact small integers in fp32);
  the GEMV multiplies q with the activations and applies d and m once per unit (m through the
  activations' sum). Activations stay float (no llama.cpp int8/int16 rounding); fp32 FMA.
- A warp owns `wr` weight rows (2: two output columns, or for GLU the gate and the up row of one
  column) and streams each row's bytes for a step of `unroll` x 256 values into its own shared
  memory window with 16-byte cp.async copies of the aligned 16-byte chunks that cover them (block
  sizes like q8_0's 34 bytes are not 16-byte aligned), `stages` steps in flight; lanes then
  decode from shared memory.
- Activations are staged once per block in shared memory as half, in chunks of K when the rows do
  not fit (`chunk` values per row at `max_rows` rows; proportionally more for fewer rows). The
  kernel is instantiated for 1, 2, 4 and max_rows rows and dispatches on the runtime M (grid.y
  runs more than max_rows rows in groups, each streaming W again).
- Split-K is inside the block: `splits` warps share a row group and take interleaved steps of K;
  their partial sums meet in shared memory. The builder raises `splits` while the grid has fewer
  than WARPS_PER_SM warps per SM and K has steps to share, so small N still fills the GPU with no
  global workspace, no atomics and a deterministic sum order.

Kernel args: A (half [M, K]), W (weight rows; [2N, K] for GLU), [bias fp32 [N] ([2N] for GLU)],
[residual fp32 [M, N], may alias out], out ([M, N] float32 or half), M, N (output columns), K.
N and K are compile-time constants of the instantiation (weights are fixed); the int args feed the
grid. W and A 16-byte aligned; W's last aligned 16-byte chunk may be read past the row end (never
past the 16-byte chunk that holds the last byte, so never into another page).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ...errors import ReftError
from ...ir.types import row_bytes as ir_row_bytes
from . import arch as archs
from .kernel import Arg, Kernel, cdiv, with_params

HALF = {"bfloat16": "bf16", "float16": "f16"}   # the compute dtype -> its short name
EPILOGUES = {"none": 0, "silu": 1, "gelu_tanh": 2}   # silu / gelu_tanh: GLU, out = act(gate) * up

# streaming multiprocessors of the usual part of each arch (A100, L40-class, H100/H200): how many
# warps the grid needs before K is split
WARPS_PER_SM = 16        # resident warps per SM the split-K choice aims for
BLOCK_WARPS = 8          # warps per block when rows allow
MAX_SPLITS = 8
MIN_WARPS = 16           # resident warps per SM the register budget allows (128 registers a thread)
STEP_BYTES = 640         # about this many bytes of one row per warp step
ACT_CHUNK = 1024         # activation values per row staged at once, at max_rows rows
STATIC_SMEM = 48 * 1024  # everything is static shared memory (no opt-in attribute needed)


class GemvError(ReftError):
    pass


@dataclass(frozen=True)
class WeightFormat:
    """How the bytes of one weight row are laid out, in the terms the decode (quant_formats.cuh.j2)
    uses: `bv` values per block of `bb` bytes after `head` bytes of row header; each 8-value unit
    of a block reads `words` 32-bit words. fields: (name, byte offset in the block)."""
    dtype: str
    bv: int
    bb: int
    words: int
    fields: tuple = ()
    head: int = 0
    dense: bool = False
    offset: bool = False       # w = d * q + m (else d * q)
    row_scale: bool = False    # int8: a float32 scale per row, at byte 0 of the row
    k_multiple: int = 8        # K must be a multiple of this

    @property
    def quantized(self) -> bool:
        return not self.dense

    def row_bytes(self, K: int) -> int:
        if self.dense:
            return K * self.bb // self.bv
        return ir_row_bytes(self.dtype, K)

    def block_align(self, K: int) -> int:
        """Alignment (<= 16) of every block start in W, given 16-byte aligned W."""
        return math.gcd(16, self.row_bytes(K), self.bb, self.head)

    def bytes_per_value(self) -> float:
        return self.bb / self.bv

    def check_k(self, K: int, who: str) -> None:
        if not isinstance(K, int) or K < self.k_multiple or K % self.k_multiple:
            raise GemvError(f"{who}: {self.dtype} weights need K to be a positive multiple of "
                            f"{self.k_multiple}, got {K}")


def _formats() -> dict[str, WeightFormat]:
    f = {
        "bfloat16": WeightFormat("bfloat16", 8, 16, 4, dense=True),
        "float16": WeightFormat("float16", 8, 16, 4, dense=True),
        "float32": WeightFormat("float32", 8, 32, 8, dense=True),
        "q8_0": WeightFormat("q8_0", 32, 34, 3, (("d", 0), ("qs", 2)), k_multiple=32),
        "q4_0": WeightFormat("q4_0", 32, 18, 3, (("d", 0), ("qs", 2)), k_multiple=32),
        "q4_1": WeightFormat("q4_1", 32, 20, 3, (("dm", 0), ("qs", 4)), offset=True, k_multiple=32),
        "q5_0": WeightFormat("q5_0", 32, 22, 4, (("d", 0), ("qh", 2), ("qs", 6)), k_multiple=32),
        "q5_1": WeightFormat("q5_1", 32, 24, 4, (("dm", 0), ("qh", 4), ("qs", 8)), offset=True, k_multiple=32),
        "q4_k": WeightFormat("q4_k", 256, 144, 6, (("dm", 0), ("sc", 4), ("qs", 16)), offset=True,
                             k_multiple=256),
        "q5_k": WeightFormat("q5_k", 256, 176, 8, (("dm", 0), ("sc", 4), ("qh", 16), ("qs", 48)), offset=True,
                             k_multiple=256),
        "q6_k": WeightFormat("q6_k", 256, 210, 6, (("ql", 0), ("qh", 128), ("sc", 192), ("d", 208)),
                             k_multiple=256),
        "int8": WeightFormat("int8", 8, 8, 2, (("qs", 0),), head=4, row_scale=True),
    }
    for g in (32, 64, 128):
        f[f"int4_g{g}"] = WeightFormat(f"int4_g{g}", g, 4 + g // 2, 3, (("dm", 0), ("qs", 4)), offset=True,
                                       k_multiple=32)
    return f


FORMATS = _formats()


def weight_format(wdtype: str, who: str) -> WeightFormat:
    try:
        return FORMATS[wdtype]
    except KeyError:
        raise GemvError(f"{who}: unsupported weight dtype {wdtype!r}; choose one of {', '.join(FORMATS)}") from None


def format_params(fmt: WeightFormat, K: int) -> dict:
    """What quant_formats.cuh.j2 is rendered with."""
    return dict(wdtype=fmt.dtype, bv=fmt.bv, bb=fmt.bb, head=fmt.head, nwords=fmt.words, fields=fmt.fields,
                align=fmt.block_align(K), dense=int(fmt.dense), offset=int(fmt.offset), row_scale=int(fmt.row_scale))


def check_common(who: str, wdtype: str, adtype: str, K: int, N: int, epilogue: str, out_dtype: str) -> WeightFormat:
    fmt = weight_format(wdtype, who)
    if adtype not in HALF:
        raise GemvError(f"{who}: activation dtype must be bfloat16 or float16, got {adtype!r}")
    fmt.check_k(K, who)
    if not isinstance(N, int) or N < 1:
        raise GemvError(f"{who}: N must be a positive int, got {N!r}")
    if epilogue not in EPILOGUES:
        raise GemvError(f"{who}: unknown epilogue {epilogue!r}; choose one of {', '.join(EPILOGUES)}")
    if out_dtype not in ("float32", "half", adtype):
        raise GemvError(f"{who}: out_dtype must be float32 or the compute dtype {adtype}, got {out_dtype!r}")
    return fmt


@dataclass(frozen=True)
class GemvPlan:
    """One block's work: `groups` x `splits` warps; each warp `wr` weight rows (`opw` output
    columns) over the steps j = split, split + splits, ... of `step` values of K."""
    opw: int
    wr: int
    groups: int
    splits: int
    unroll: int
    stages: int
    window: int       # 16-byte chunks of one row's staged bytes per step
    chunk: int        # activation values per row staged at once, at max_rows rows
    max_rows: int
    min_blocks: int   # __launch_bounds__ blocks per SM: the register budget

    @property
    def warps(self) -> int:
        return self.groups * self.splits

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def cols(self) -> int:
        """Output columns per block."""
        return self.groups * self.opw

    @property
    def step(self) -> int:
        return 256 * self.unroll

    def chunk_steps(self, rows: int, K: int) -> int:
        """Steps of K per activation chunk when `rows` (<= max_rows) rows are staged."""
        return max(1, min(cdiv(K, self.step), self.max_rows * self.chunk // (rows * self.step)))

    def smem(self) -> int:
        return (self.warps * self.stages * self.wr * self.window * 16 + self.max_rows * self.chunk * 2
                + self.warps * self.wr * self.max_rows * 4)

    def text(self) -> str:
        return (f"{self.groups}x{self.splits} warps (rows x k-splits), {self.wr} rows/warp, "
                f"{self.step} values/step, {self.stages} stages")


def window_chunks(fmt: WeightFormat, step: int) -> int:
    """16-byte chunks that cover one row's bytes of one step, at any 16-byte misalignment."""
    return (step // fmt.bv * fmt.bb + 15 + 15) // 16


def plan_gemv(arch: str, fmt: WeightFormat, K: int, N: int, glu: bool, max_rows: int = 8) -> GemvPlan:
    """Rows per warp and block, split-K and pipeline depth for an N x K weight on `arch`."""
    a = archs.get(arch)
    sms = a.sms
    opw, wr = (1, 2) if glu else (2, 2)
    unroll = min(4, max(1, round(STEP_BYTES / (256 * fmt.bytes_per_value()))))
    warp_rows = cdiv(N, opw)
    steps = cdiv(K, 256 * unroll)
    splits = 1
    while splits < MAX_SPLITS and warp_rows * splits < sms * WARPS_PER_SM and steps >= 2 * splits:
        splits *= 2
    groups = max(1, BLOCK_WARPS // splits)
    while groups > 1 and cdiv(warp_rows, groups) < sms:
        groups //= 2
    for stages in (3, 2):
        for u in range(unroll, 0, -1):
            for chunk in (ACT_CHUNK, ACT_CHUNK // 2, ACT_CHUNK // 4):
                chunk = max(256 * u, min(chunk, cdiv(K, 256 * u) * 256 * u))
                p = GemvPlan(opw, wr, groups, splits, u, stages, window_chunks(fmt, 256 * u), chunk, max_rows,
                             max(1, MIN_WARPS // (groups * splits)))
                if p.smem() <= STATIC_SMEM:
                    return p
    raise GemvError(f"gemv: no tiling of a {fmt.dtype} [{N}, {K}] weight fits {STATIC_SMEM} bytes of shared memory")


def row_variants(max_rows: int) -> list[int]:
    """Instantiated row counts: powers of two below max_rows, and max_rows."""
    return sorted({r for r in (1, 2, 4) if r < max_rows} | {max_rows})


def gemv_kernel(arch: str, wdtype: str, adtype: str, *, K: int, N: int, epilogue: str = "none", bias: bool = False,
                residual: bool = False, out_dtype: str = "float32", max_rows: int = 8, nodes=()) -> Kernel:
    """out[M, N] = epilogue(A[M, K] . W^T) for M <= max_rows (grid.y runs more rows in groups of max_rows).

    Args, in order: A (half [M, K], row-major), W (wdtype rows [N, K]; [2N, K] for GLU: gate rows
    [0, N), up rows [N, 2N)), [bias (fp32 [N]; [2N] for GLU)], [residual (fp32 [M, N]; may be
    out)], out ([M, N]: float32, or half = adtype), M, N (output columns), K.
    epilogue: "none", or "silu" / "gelu_tanh" for out = act(gate) * up.
    """
    who = "gemv"
    a = archs.get(arch)
    fmt = check_common(who, wdtype, adtype, K, N, epilogue, out_dtype)
    if not isinstance(max_rows, int) or not 1 <= max_rows <= 8:
        raise GemvError(f"{who}: max_rows must be 1..8, got {max_rows!r}")
    glu = epilogue != "none"
    plan = plan_gemv(a.name, fmt, K, N, glu, max_rows)
    out_half = out_dtype != "float32"
    short = HALF[adtype]
    variants = row_variants(max_rows)
    args = [Arg("A", "ptr"), Arg("W", "ptr")]
    args += [Arg("bias", "ptr")] if bias else []
    args += [Arg("residual", "ptr")] if residual else []
    args += [Arg("out", "ptr"), Arg("M", "i32"), Arg("N", "i32"), Arg("K", "i32")]
    params = dict(format_params(fmt, K), htype=adtype, act_bf16=int(adtype == "bfloat16"),
                  out_half=int(out_half), K=K, N=N, row_bytes=fmt.row_bytes(K),
                  max_rows=max_rows, variants=tuple((r, plan.chunk_steps(r, K)) for r in variants),
                  groups=plan.groups, splits=plan.splits, opw=plan.opw, wr=plan.wr, unroll=plan.unroll,
                  stages=plan.stages, window=plan.window, chunk=plan.chunk, act=EPILOGUES[epilogue],
                  bias=int(bias), residual=int(residual), min_blocks=plan.min_blocks, tile=plan.text())
    name = (f"gemv_{a.name.replace('_', '')}_{wdtype}_{short}_{N}x{K}_{epilogue}{'_bias' if bias else ''}"
            f"{'_res' if residual else ''}_out{short if out_half else 'f32'}_r{max_rows}")
    return Kernel(name=name, template="gemv.cu.j2", args=tuple(args), block=(plan.threads, 1, 1),
                  grid=(f"cdiv(N, {plan.cols})", f"cdiv(M, {max_rows})", "1"), params=with_params(**params), smem=0,
                  tile=plan.text(), nodes=tuple(nodes))
