"""Attention kernels of the cuda backend: `paged_attention` over the KV-cache pages.

q [T, H, D], kc/vc [NP, PS, KVH, D] and out [T, H, D] are in the plan's half dtype; positions and
seq_ids int32 [T], page_table int32 [S, MP]. Both kernels use mma.sync m16n8k16 (inline PTX, so no
CuTe instantiation: each compiles in about a second) with fp32 accumulation and an exp2-domain
online softmax; head dims that are not a multiple of 16 are zero-padded to the MMA k-size in shared
memory, and query heads of one KV head share the MMA rows (GQA: a K/V tile is read once per group).
`softcap` > 0 soft-caps the scores before the mask as the op's reference does (Gemma 2).

- prefill_kernel: flash-attention style for any T. A block owns 64 rows = TQ consecutive tokens x GB
  heads and makes one pass over the keys per distinct sequence among its tokens (found from seq_ids
  in the kernel), so every packing order, chunked prefill included, is correct; key tiles beyond a
  pass's causal/window range are never visited, and only tiles that straddle it are masked.
- decode_kernels: flash-decoding for small T. Each token's keys are split into page-aligned,
  balanced shares; the split count follows from T and MP at launch (`decode_splits`, the same formula
  in the grid expression and the kernels): enough blocks to fill the GPU twice for one token, at least
  `MIN_SPLIT_KEYS` keys per split. A token whose keys fit one split is written directly; otherwise the
  combine kernel merges the fp32 partials in the workspace. Both kernels take the same workspace
  buffer (same expression), launched in order.

Arguments, in order: q, kc, vc, positions, seq_ids, page_table, out[, workspace] (pointers), then
T (tokens), MP (page-table width), S (sequences) and NP (pages in the pool; page ids outside [0, NP)
read as zeros). A token with a sequence id outside [0, S) or a position outside [0, MP * PS) gets
zeros.
"""
from __future__ import annotations

import hashlib
import math

from ...errors import ReftError
from . import arch as archs
from .kernel import Arg, Kernel, cdiv, with_params

BM = 64                # prefill: accumulator rows per block (4 warps x 16)
BN = 64                # keys per shared-memory tile
THREADS = 128
MAX_HEADS_PER_BLOCK = 16   # one m16 tile of query heads per KV head
MIN_SPLIT_KEYS = 128   # decode: fewer keys per split cost more in partials than they save
MAX_SPLITS = 256
HEAD_DIMS = range(8, 129, 8)
DTYPES = {"bfloat16": "bf16", "float16": "f16"}
# SMs of the parts each arch is sized for (A100, L40S-class, H100/H200): the decode split target
LOG2E = math.log2(math.e)


class AttentionConfigError(ReftError):
    pass


def _args(workspace: bool) -> tuple[Arg, ...]:
    ptrs = ["q", "kc", "vc", "positions", "seq_ids", "page_table", "out"] + (["workspace"] if workspace else [])
    return tuple(Arg(n, "ptr") for n in ptrs) + tuple(Arg(n, "i32") for n in ("T", "MP", "S", "NP"))


def heads_per_block(heads: int, kv_heads: int) -> int:
    """Query heads of one KV head that share a block's MMA rows: the largest divisor of H / KVH <= 16."""
    g = heads // kv_heads
    return max(d for d in range(1, min(g, MAX_HEADS_PER_BLOCK) + 1) if g % d == 0)


def padded_head_dim(head_dim: int) -> int:
    return cdiv(head_dim, 16) * 16


def _check(arch, dtype, heads, kv_heads, head_dim, page_size, sliding_window, scale, softcap) -> archs.Arch:
    a = arch if isinstance(arch, archs.Arch) else archs.get(arch)
    if dtype not in DTYPES:
        raise AttentionConfigError(f"cuda attention: dtype must be bfloat16 or float16, got {dtype!r}")
    if not (isinstance(heads, int) and isinstance(kv_heads, int) and kv_heads > 0 and heads > 0
            and heads % kv_heads == 0):
        raise AttentionConfigError(f"cuda attention: {heads} query heads are not a multiple of {kv_heads} KV heads")
    if head_dim not in HEAD_DIMS:
        raise AttentionConfigError(f"cuda attention: head_dim must be a multiple of 8 up to 128, got {head_dim}")
    if not (isinstance(page_size, int) and page_size >= 1):
        raise AttentionConfigError(f"cuda attention: page_size must be a positive integer, got {page_size!r}")
    if not (isinstance(sliding_window, int) and sliding_window >= 0):
        raise AttentionConfigError(f"cuda attention: sliding_window must be >= 0, got {sliding_window!r}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise AttentionConfigError(f"cuda attention: scale must be a positive finite number, got {scale!r}")
    if not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap >= 0):
        raise AttentionConfigError(f"cuda attention: softcap must be a finite number >= 0, got {softcap!r}")
    return a


def _f32(x: float) -> str:
    return f"{float(x):.9e}f"


def _common(dtype, heads, kv_heads, head_dim, page_size, sliding_window, scale, softcap) -> dict:
    dp = padded_head_dim(head_dim)
    if softcap:   # Gemma 2: softcap * tanh(s * scale / softcap)
        score = dict(softcap=_f32(softcap), cap_pre=_f32(scale / softcap), cap_post=_f32(softcap * LOG2E))
    else:
        score = dict(softcap="", sc=_f32(scale * LOG2E))
    return dict(dtype=dtype, heads=heads, kv_heads=kv_heads, gb=heads_per_block(heads, kv_heads), head_dim=head_dim,
                dp=dp, lds=dp + 8, page_size=page_size, window=sliding_window, threads=THREADS, **score)


def _name(kind: str, params: dict) -> str:
    p = params
    digest = hashlib.sha1(repr(sorted(p.items())).encode()).hexdigest()[:8]
    return (f"attn_{kind}_{DTYPES[p['dtype']]}_h{p['heads']}kv{p['kv_heads']}d{p['head_dim']}p{p['page_size']}"
            f"w{p['window']}_{digest}")


def _smem_rows_bytes(rows: int, params: dict) -> int:
    return rows * params["lds"] * 2


# -- prefill ---------------------------------------------------------------------------------------

def prefill_tokens_per_block(heads: int, kv_heads: int) -> int:
    return BM // heads_per_block(heads, kv_heads)


def prefill_kernel(arch, dtype, *, heads, kv_heads, head_dim, page_size, sliding_window, scale, softcap=0.0,
                   nodes=()) -> Kernel:
    _check(arch, dtype, heads, kv_heads, head_dim, page_size, sliding_window, scale, softcap)
    p = _common(dtype, heads, kv_heads, head_dim, page_size, sliding_window, scale, softcap)
    tq = BM // p["gb"]
    p.update(bm=BM, bn=BN, tq=tq)
    return Kernel(
        name=_name("prefill", p), template="attention_prefill.cu.j2", args=_args(False), block=(THREADS, 1, 1),
        grid=(f"cdiv(T, {tq})", str(heads // p["gb"]), "1"), params=with_params(**p),
        smem=_smem_rows_bytes(BM + 2 * BN, p),
        tile=f"{tq} tokens x {p['gb']} heads x {BN}-key tiles, mma.sync m16n8k16, head dim {head_dim}->{p['dp']}",
        nodes=tuple(nodes))


# -- decode ----------------------------------------------------------------------------------------

def decode_split_params(arch, heads: int, kv_heads: int, page_size: int) -> tuple[int, int]:
    """(minp, target): pages per split at least, and the split count that gives one token about two
    blocks per SM."""
    a = arch if isinstance(arch, archs.Arch) else archs.get(arch)
    groups = heads // heads_per_block(heads, kv_heads)
    minp = max(1, MIN_SPLIT_KEYS // page_size)
    target = max(1, min(MAX_SPLITS, cdiv(2 * a.sms, groups)))
    return minp, target


def decode_splits(T: int, MP: int, minp: int, target: int) -> int:
    """Splits per token at launch (the decode grid's z; the kernels compute the same)."""
    return max(1, min(cdiv(MP, minp), cdiv(target, T)))


def split_plan(position: int, window: int, page_size: int, minp: int, nsplit: int) -> tuple[int, int, list]:
    """(lo, hi, [(first key, last key) per split]) for a token at `position`, as the kernels split it."""
    lo = max(0, position - window + 1) if window > 0 else 0
    pfirst = lo // page_size
    npages = position // page_size - pfirst + 1
    pps = max(minp, cdiv(npages, nsplit))
    n = cdiv(npages, pps)
    spans = []
    for sp in range(n):
        kt0 = (pfirst + sp * pps) * page_size
        spans.append((max(lo, kt0), min(position, kt0 + pps * page_size - 1)))
    return lo, position, spans


def decode_kernels(arch, dtype, *, heads, kv_heads, head_dim, page_size, sliding_window, scale, softcap=0.0,
                   nodes=()) -> list[Kernel]:
    a = _check(arch, dtype, heads, kv_heads, head_dim, page_size, sliding_window, scale, softcap)
    p = _common(dtype, heads, kv_heads, head_dim, page_size, sliding_window, scale, softcap)
    minp, target = decode_split_params(a, heads, kv_heads, page_size)
    p.update(minp=minp, target=target)
    nsplit = f"max(1, min(cdiv(MP, {minp}), cdiv({target}, T)))"
    # fp32 partial outputs + (max, sum) per (token, head, split); none when there is a single split
    workspace = f"T * {heads * (head_dim + 2) * 4} * {nsplit} * min(1, {nsplit} - 1)"
    split = dict(p, part="split", bn=BN)
    combine = dict(p, part="combine")
    groups = heads // p["gb"]
    return [
        Kernel(name=_name("decode", split), template="attention_decode.cu.j2", args=_args(True),
               block=(THREADS, 1, 1), grid=("T", str(groups), nsplit), params=with_params(**split),
               smem=_smem_rows_bytes(16 + 4 * BN, p), workspace=workspace,
               tile=f"{p['gb']} heads x {BN}-key tiles, <= {target} splits of >= {minp} pages, mma.sync m16n8k16",
               nodes=tuple(nodes)),
        Kernel(name=_name("combine", combine), template="attention_decode.cu.j2", args=_args(True),
               block=(THREADS, 1, 1), grid=(f"cdiv(T * {heads}, {THREADS // 32})", "1", "1"),
               params=with_params(**combine), workspace=workspace,
               tile=f"merge <= {target} split partials, a warp per (token, head)", nodes=tuple(nodes)),
    ]
