"""Builders of the memory-bound "small" kernels: RMSNorm (+ residual; scale w or offset + w),
embedding gather (float and quantized tables), the q/k/v epilogue of the fused projection (bias,
per-head q/k RMSNorm, rotary incl. longrope), paged-KV write, add / take_rows / cast / seq_extent,
and sampling on the device (argmax; temperature, top-k, top-p and a host-given uniform number, so
only token ids come back to the host).

Design choices:
- Sizes that shape the code (hidden, head_dim, rotary_dim, page size, vocabulary, row width) are
  template constants; the token/row count is the one runtime int, and grids are expressions of it.
  Index arithmetic (vector widths, threads per row, items per thread) is decided here.
- Every pointer is assumed 16-byte aligned (the arena's 64-byte offsets, the allocator's bases);
  vector widths follow from the row sizes, which are checked here.
- Norms keep the row in registers (one read of x): a warp per row up to 512 values, a block above.
- Numerics follow the ops' numpy references: y = (x * inv) * w with inv = 1 / sqrt(mean + eps);
  rotary angles are float32 pos * inv_freq as the reference rounds them, their sine and cosine
  evaluated accurately (reduction mod 2 pi in double, sincospi: no large-argument slow path, so no
  stack frame); dequantized values are formed in the numpy formats' operation order.
- Out-of-range indices (token ids >= vocab, negative rows, positions past the page table) write
  zeros or nothing instead of reading out of bounds; the references raise there.
- Sampling picks the token the host sampler (reft/runtime/sampler.py) picks for the same uniform
  number; the rule and its one deviation are written down in templates/sample.cu.j2.
"""
from __future__ import annotations

import numpy as np

from ...errors import ReftError
from ...ir.types import QUANT_DTYPES, row_bytes
from . import arch as archs
from .kernel import Arg, Kernel, cdiv, pow2_at_least, with_params

HALF_TYPES = {"bfloat16": "__nv_bfloat16", "float16": "__half"}
FLOAT_TYPES = {"float32": "float", **HALF_TYPES}
SHORT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
MAX_HIDDEN = 16384          # norms hold a row in registers: at most 4 float4 per thread at 1024 threads
MAX_HEAD_DIM = 256
MAX_VOCAB = 1 << 23         # sampling masses are 40-bit fixed point summed in 64 bits
SAMPLE_LIST = 2048          # top-k candidates kept in shared memory when top_k <= this
SAMPLE_MASS_BITS = 40


class ElementwiseError(ReftError):
    pass


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ElementwiseError(msg)


def _arch(arch: str) -> archs.Arch:
    return archs.get(arch)


def _half(dtype: str, what: str) -> str:
    _check(dtype in HALF_TYPES, f"{what}: dtype must be bfloat16 or float16, got {dtype!r}")
    return HALF_TYPES[dtype]


def _positive(what: str, **dims) -> None:
    for k, v in dims.items():
        _check(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0,
               f"{what}: {k} must be a positive int, got {v!r}")


def _f32_literal(x: float) -> str:
    """C++ float literal of x rounded to float32, exactly (hex float)."""
    return f"{float(np.float32(x)).hex()}f"


def _bits(x: float) -> str:
    """x rounded to float32, as 8 hex digits (a kernel name's tag for a float constant)."""
    return f"{int(np.float32(x).view(np.uint32)):08x}"


def _eps_tag(eps: float) -> str:
    return "e" + _bits(eps)


def _vec(n: int) -> int:
    return 4 if n % 4 == 0 else 2 if n % 2 == 0 else 1


def _ptrs(*names: str) -> tuple[Arg, ...]:
    return tuple(Arg(n, "ptr") for n in names)


# -- RMSNorm ----------------------------------------------------------------------------------------

def norm_layout(hidden: int) -> dict:
    """How a row of `hidden` float32 values is spread: vector width, threads per row, rows per block,
    vectors per thread. A warp per row (4 rows a block) up to 128 vectors, else a block per row with
    at most 4 vectors a thread."""
    vec = _vec(hidden)
    nv = hidden // vec
    if nv <= 128:
        tpr, rows = 32, 4
    else:
        tpr, rows = min(1024, max(64, pow2_at_least(cdiv(nv, 4)))), 1
    return {"vec": vec, "tpr": tpr, "rows": rows, "items": cdiv(nv, tpr)}


def rms_norm_kernel(arch: str, *, hidden: int, eps: float, residual: bool, out_dtype: str, offset: float = 0.0,
                    nodes=()) -> Kernel:
    """y = x / sqrt(mean(x^2) + eps) * (offset + w) over rows of x float32 [M, hidden]; with `residual`
    (add_rms_norm) s = x + r is normalised and also written to `sum` (float32, may be x's buffer).
    w float32 [hidden]; y float32 or half [M, hidden]. offset: the ops' attribute (Gemma's 1 + w)."""
    _arch(arch)
    _positive("rms_norm", hidden=hidden)
    _check(hidden <= MAX_HIDDEN, f"rms_norm: hidden {hidden} exceeds {MAX_HIDDEN}")
    _check(out_dtype in FLOAT_TYPES, f"rms_norm: out_dtype must be float32, bfloat16 or float16, got {out_dtype!r}")
    _check(float(eps) >= 0 and np.isfinite(eps), f"rms_norm: eps must be a finite number >= 0, got {eps!r}")
    _check(np.isfinite(offset), f"rms_norm: offset must be finite, got {offset!r}")
    lay = norm_layout(hidden)
    args = _ptrs("x", *(("r",) if residual else ()), "w", *(("sum",) if residual else ()), "y") + (Arg("M", "i32"),)
    name = (f"rms_norm{'_add' if residual else ''}_h{hidden}_{SHORT[out_dtype]}_{_eps_tag(eps)}"
            f"{'_o' + _bits(offset) if offset else ''}")
    grid = ("M" if lay["rows"] == 1 else f"cdiv(M, {lay['rows']})", "1", "1")
    where = "warp per row, 4 rows/block" if lay["rows"] > 1 else f"block of {lay['tpr']} per row"
    return Kernel(name=name, template="norm.cu.j2", args=args, block=(lay["tpr"] * lay["rows"], 1, 1), grid=grid,
                  params=with_params(hidden=hidden, eps=_f32_literal(eps), residual=bool(residual),
                                     out_type=FLOAT_TYPES[out_dtype], offset=_f32_literal(offset) if offset else "",
                                     **lay),
                  tile=f"{where}, {lay['items']} x float{lay['vec']} per thread", nodes=tuple(nodes))


# -- embedding --------------------------------------------------------------------------------------

EMBED_FORMATS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k", "int8",
                 "int4_g32", "int4_g64", "int4_g128")


def embedding_kernel(arch: str, *, table_dtype: str, hidden: int, nodes=()) -> Kernel:
    """out float32 [T, hidden] = table[ids[t]] (table float32/bfloat16/float16 [vocab, hidden], or
    quantized rows of blocks, dequantized). An id outside [0, vocab) gives a row of zeros."""
    _arch(arch)
    _positive("embedding", hidden=hidden)
    _check(table_dtype in FLOAT_TYPES or table_dtype in EMBED_FORMATS,
           f"embedding: table dtype {table_dtype!r} is not supported")
    quant = table_dtype in QUANT_DTYPES
    if quant:
        try:
            rb = row_bytes(table_dtype, hidden)
        except TypeError as e:
            raise ElementwiseError(f"embedding: {e}") from None
        vec, group = 1, QUANT_DTYPES[table_dtype][0]
    else:
        rb, vec, group = hidden * (4 if table_dtype == "float32" else 2), _vec(hidden), 0
    threads = min(256, max(32, pow2_at_least(cdiv(hidden, vec))))
    return Kernel(name=f"embedding_{table_dtype}_h{hidden}", template="embedding.cu.j2",
                  args=_ptrs("ids", "table", "out") + (Arg("T", "i32"), Arg("vocab", "i32")),
                  block=(threads, 1, 1), grid=("T", "1", "1"),
                  params=with_params(hidden=hidden, fmt=table_dtype, quant=quant, row_bytes=rb, vec=vec,
                                     group=group, threads=threads,
                                     elem_type=FLOAT_TYPES.get(table_dtype, "unsigned char")),
                  tile=f"block of {threads} per token, " + (f"{table_dtype} rows of {rb} bytes" if quant
                                                            else f"{vec}-wide loads"),
                  nodes=tuple(nodes))


# -- q/k/v epilogue -----------------------------------------------------------------------------------

QKV_WARPS = 4


def qkv_post_kernel(arch: str, dtype: str, *, heads: int, kv_heads: int, head_dim: int, rotary_dim: int,
                    qk_norm: bool, eps: float, bias: bool, neox: bool = True, offset: float = 0.0,
                    longrope: tuple[int, float] | None = None, nodes=()) -> Kernel:
    """The fused projection's epilogue. qkv float32 [T, (heads + 2 kv_heads) * head_dim] (q heads, then
    k heads, then v heads); + bias float32 [(heads + 2 kv_heads) * head_dim]; per-head RMSNorm of q
    and k (weights float32 [head_dim], scaled by offset + w); rotate-half rotary on the first
    rotary_dim dims of q and k at positions int32 [T] with inv_freq float32 [rotary_dim / 2]; q, k, v
    half [T, heads|kv_heads, head_dim]. longrope = (original_max_position, attention_factor): a token
    whose extent (int32 [T], the seq_extent op) exceeds original_max_position rotates with
    inv_freq_long instead, and cos/sin are scaled by attention_factor."""
    _arch(arch)
    half = _half(dtype, "qkv_post")
    _positive("qkv_post", heads=heads, kv_heads=kv_heads, head_dim=head_dim, rotary_dim=rotary_dim)
    _check(neox, "qkv_post: only the rotate-half (neox) rotary layout is supported")
    _check(heads % kv_heads == 0, f"qkv_post: {heads} heads are not a multiple of {kv_heads} KV heads")
    _check(head_dim <= MAX_HEAD_DIM, f"qkv_post: head_dim {head_dim} exceeds {MAX_HEAD_DIM}")
    _check(rotary_dim % 2 == 0 and rotary_dim <= head_dim,
           f"qkv_post: rotary_dim {rotary_dim} must be even and at most head_dim {head_dim}")
    _check(float(eps) >= 0 and np.isfinite(eps), f"qkv_post: eps must be a finite number >= 0, got {eps!r}")
    _check(np.isfinite(offset) and (qk_norm or not offset), f"qkv_post: offset {offset!r} needs q/k norms")
    if longrope is not None:
        _check(len(longrope) == 2 and int(longrope[0]) > 0 and np.isfinite(longrope[1]),
               f"qkv_post: longrope must be (original_max_position, attention_factor), got {longrope!r}")
    args = _ptrs("qkv", *(("bias",) if bias else ()), *(("q_norm", "k_norm") if qk_norm else ()), "positions",
                 *(("extent",) if longrope else ()), "inv_freq", *(("inv_freq_long",) if longrope else ()),
                 "q", "k", "v") + (Arg("T", "i32"),)
    name = (f"qkv_post_{SHORT[dtype]}_h{heads}kv{kv_heads}d{head_dim}r{rotary_dim}"
            f"{'_bias' if bias else ''}{'_norm_' + _eps_tag(eps) if qk_norm else ''}"
            f"{'_o' + _bits(offset) if offset else ''}"
            f"{f'_long{int(longrope[0])}_{_bits(longrope[1])}' if longrope else ''}")
    return Kernel(name=name, template="qkv_post.cu.j2", args=args, block=(32 * QKV_WARPS, 1, 1), grid=("T", "1", "1"),
                  params=with_params(heads=heads, kv_heads=kv_heads, head_dim=head_dim, rotary_dim=rotary_dim,
                                     qk_norm=bool(qk_norm), bias=bool(bias), eps=_f32_literal(eps), half=half,
                                     warps=QKV_WARPS, pairs=cdiv(rotary_dim // 2, 32),
                                     tail=cdiv(head_dim - rotary_dim, 32),
                                     offset=_f32_literal(offset) if offset else "", longrope=longrope is not None,
                                     original_max=int(longrope[0]) if longrope else 0,
                                     attention_factor=_f32_literal(longrope[1]) if longrope else ""),
                  tile=f"block per token, a warp per head ({QKV_WARPS} warps)", nodes=tuple(nodes))


# -- paged-KV write ---------------------------------------------------------------------------------

KV_THREADS = 256


def kv_write_kernel(arch: str, dtype: str, *, kv_heads: int, head_dim: int, page_size: int, nodes=()) -> Kernel:
    """k, v half [T, kv_heads, head_dim] -> pages kc, vc half [NP, page_size, kv_heads, head_dim] at page
    page_table[seq_ids[t], positions[t] // page_size] (page_table int32 [S, MP]), slot positions[t] %
    page_size. Rows whose position is negative or past the table, or whose page is negative, are skipped."""
    _arch(arch)
    half = _half(dtype, "kv_write")
    _positive("kv_write", kv_heads=kv_heads, head_dim=head_dim, page_size=page_size)
    row = kv_heads * head_dim
    vec = 8 if row % 8 == 0 else 4 if row % 4 == 0 else 2 if row % 2 == 0 else 1   # halves per copy
    per_token = 2 * (row // vec)
    return Kernel(name=f"kv_write_{SHORT[dtype]}_kv{kv_heads}d{head_dim}p{page_size}", template="kv_write.cu.j2",
                  args=_ptrs("kc", "vc", "k", "v", "positions", "seq_ids", "page_table") + (Arg("T", "i32"),
                                                                                         Arg("MP", "i32")),
                  block=(KV_THREADS, 1, 1), grid=(f"cdiv(T * {per_token}, {KV_THREADS})", "1", "1"),
                  params=with_params(kv_heads=kv_heads, head_dim=head_dim, page_size=page_size, half=half, vec=vec,
                                     per_token=per_token, threads=KV_THREADS),
                  tile=f"{per_token} copies of {2 * vec} bytes per token", nodes=tuple(nodes))


# -- add, take_rows, cast ---------------------------------------------------------------------------

FLAT_THREADS = 256
FLAT_ITEMS = 4


def add_kernel(arch: str, *, nodes=()) -> Kernel:
    """out = a + b, float32, n values (out may be a's or b's buffer)."""
    _arch(arch)
    return Kernel(name="add_f32", template="rows.cu.j2", args=_ptrs("a", "b", "out") + (Arg("n", "i32"),),
                  block=(FLAT_THREADS, 1, 1), grid=(f"cdiv(n, {FLAT_THREADS * FLAT_ITEMS})", "1", "1"),
                  params=with_params(kind="add", threads=FLAT_THREADS, items=FLAT_ITEMS),
                  tile=f"{FLAT_ITEMS} values per thread", nodes=tuple(nodes))


def take_rows_kernel(arch: str, *, width: int, dtype: str = "float32", nodes=()) -> Kernel:
    """out[r] = x[rows[r]] for rows int32 [R] of `width` values of `dtype` (a negative row gives zeros)."""
    _arch(arch)
    _positive("take_rows", width=width)
    _check(dtype in FLOAT_TYPES, f"take_rows: dtype must be float32, bfloat16 or float16, got {dtype!r}")
    nbytes = width * (4 if dtype == "float32" else 2)
    vec = next(v for v in (16, 8, 4, 2) if nbytes % v == 0)
    chunks = nbytes // vec
    ys = cdiv(chunks, FLAT_THREADS)
    _check(ys <= archs.MAX_GRID[1], f"take_rows: rows of {nbytes} bytes are too wide")
    return Kernel(name=f"take_rows_{SHORT[dtype]}_w{width}", template="rows.cu.j2",
                  args=_ptrs("x", "rows", "out") + (Arg("R", "i32"),), block=(FLAT_THREADS, 1, 1),
                  grid=("R", str(ys), "1"),
                  params=with_params(kind="take_rows", threads=FLAT_THREADS, src_type=FLOAT_TYPES[dtype], width=width,
                                     vec_bytes=vec, chunks=chunks),
                  tile=f"row x {ys} blocks of {FLAT_THREADS} {vec}-byte copies", nodes=tuple(nodes))


def cast_kernel(arch: str, src: str, dst: str, nodes=()) -> Kernel:
    """out[i] = dst(x[i]) over n values, float32 / bfloat16 / float16 (round to nearest even)."""
    _arch(arch)
    for d in (src, dst):
        _check(d in FLOAT_TYPES, f"cast: dtype must be float32, bfloat16 or float16, got {d!r}")
    _check(src != dst, f"cast: source and destination are both {src}")
    return Kernel(name=f"cast_{SHORT[src]}_{SHORT[dst]}", template="rows.cu.j2",
                  args=_ptrs("x", "out") + (Arg("n", "i32"),), block=(FLAT_THREADS, 1, 1),
                  grid=(f"cdiv(n, {FLAT_THREADS * FLAT_ITEMS})", "1", "1"),
                  params=with_params(kind="cast", threads=FLAT_THREADS, items=FLAT_ITEMS, src_type=FLOAT_TYPES[src],
                                     dst_type=FLOAT_TYPES[dst]),
                  tile=f"{FLAT_ITEMS} values per thread", nodes=tuple(nodes))


UNARY = {"scale": "x * value", "softcap": "value * tanh(x / value)"}


def unary_kernel(arch: str, op: str, *, value: float, nodes=()) -> Kernel:
    """out = x * value (op scale: Gemma's embedding scale) or value * tanh(x / value) (op softcap:
    Gemma 2's final logits), float32, n values; value is rounded to float32 as the references do."""
    _arch(arch)
    _check(op in UNARY, f"unary: op must be one of {', '.join(UNARY)}, got {op!r}")
    _check(bool(np.isfinite(value)) and (op == "scale" or value > 0), f"{op}: bad constant {value!r}")
    return Kernel(name=f"{op}_f32_{_bits(value)}", template="unary.cu.j2", args=_ptrs("x", "out") + (Arg("n", "i32"),),
                  block=(FLAT_THREADS, 1, 1), grid=(f"cdiv(n, {FLAT_THREADS})", "1", "1"),
                  params=with_params(op=op, formula=UNARY[op], value=_f32_literal(value), threads=FLAT_THREADS),
                  tile="a value per thread", nodes=tuple(nodes))


def seq_extent_kernel(arch: str, *, nodes=()) -> Kernel:
    """extent int32 [T] = 1 + the largest position (int32 [T]) among the tokens of each token's
    sequence (seq_ids int32 [T]): what longrope picks its factors by (the seq_extent op)."""
    _arch(arch)
    return Kernel(name="seq_extent_i32", template="rows.cu.j2",
                  args=_ptrs("positions", "seq_ids", "extent") + (Arg("T", "i32"),), block=(FLAT_THREADS, 1, 1),
                  grid=(f"cdiv(T, {FLAT_THREADS})", "1", "1"), params=with_params(kind="seq_extent", threads=FLAT_THREADS),
                  tile=f"a thread per token, tiles of {FLAT_THREADS} tokens in shared memory", nodes=tuple(nodes))


# -- sampling ---------------------------------------------------------------------------------------

def sample_threads(vocab: int) -> int:
    return 1024 if vocab >= 16384 else 512


def _sample(arch: str, vocab: int, kind: str, args: tuple, nodes) -> Kernel:
    _arch(arch)
    _positive(kind, vocab=vocab)
    _check(vocab <= MAX_VOCAB, f"{kind}: vocab {vocab} exceeds {MAX_VOCAB}")
    if kind == "sample":
        threads = sample_threads(vocab)
        params = with_params(kind=kind, vocab=vocab, threads=threads, vec4=vocab % 4 == 0, list_cap=SAMPLE_LIST,
                             mass_bits=SAMPLE_MASS_BITS)
    else:
        threads = min(1024, max(32, pow2_at_least(cdiv(vocab, 8))))
        params = with_params(kind=kind, vocab=vocab, threads=threads)
    return Kernel(name=f"{kind}_v{vocab}", template="sample.cu.j2", args=args, block=(threads, 1, 1),
                  grid=("R", "1", "1"), params=params,
                  tile=f"block of {threads} per row" + (", 3-level radix select" if kind == "sample" else ""),
                  nodes=tuple(nodes))


def argmax_kernel(arch: str, *, vocab: int, nodes=()) -> Kernel:
    """ids int32 [R] = argmax of each row of logits float32 [R, vocab] (numpy's: the first maximum,
    a NaN counts as the maximum)."""
    return _sample(arch, vocab, "argmax", _ptrs("logits", "ids") + (Arg("R", "i32"),), nodes)


def sample_kernel(arch: str, *, vocab: int, nodes=()) -> Kernel:
    """ids int32 [R]: one token per row of logits float32 [R, vocab], drawn with the row's temperature
    (float32 [R]; <= 0: argmax), top_k (int32 [R]; 0 or >= vocab: off), top_p (float32 [R]; >= 1: off)
    and uniform number u (float32 [R], in [0, 1)) as reft.runtime.sampler.Sampler draws it."""
    return _sample(arch, vocab, "sample", _ptrs("logits", "temperature", "top_k", "top_p", "u", "ids")
                   + (Arg("R", "i32"),), nodes)
