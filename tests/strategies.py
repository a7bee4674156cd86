"""Hypothesis strategies shared by the test tiers.

  op_cases(op=None)   (op_name, [numpy inputs], attrs) satisfying the op's preconditions;
                      OP_CASES maps every non-source registered op to its strategy
  symbolize(op, xs, attrs)
                      the case's input types with the token dim (and NP, S, MP, R) made
                      symbolic: (types, attrs, sizes) such that binding `sizes` gives back
                      the concrete shapes
  random_graphs(...)  (graph, weights, feeds): small valid graphs built with GraphBuilder,
                      with duplicated subexpressions (CSE), dead nodes (DCE) and linears
                      sharing an input (projection fusion), and inputs for T bound at random

Array values come from a numpy Generator seeded by hypothesis (fast, still shrinkable).
"""
from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

from reft.ir import GraphBuilder, ops
from reft.ir.types import DTYPES, FLOAT_DTYPES, INT_DTYPES, TensorType, dtype_name, np_dtype

FLOATS = ("float32", "float16", "bfloat16")
INTS = ("int32", "int64")
ALL_DTYPES = tuple(DTYPES)

dims = st.integers(1, 6)
float_dtypes = st.sampled_from(FLOATS)
int_dtypes = st.sampled_from(INTS)
seeds = st.integers(0, 2**32 - 1)


def rand(rng: np.random.Generator, shape, dtype: str, lo: float = -2.0, hi: float = 2.0) -> np.ndarray:
    """Random array of an IR dtype (uniform in [lo, hi), integers for int dtypes)."""
    if dtype in INT_DTYPES:
        return rng.integers(int(lo), int(hi), size=shape).astype(np_dtype(dtype))
    return rng.uniform(lo, hi, size=shape).astype(np.float32).astype(np_dtype(dtype))


def shapes(min_rank: int = 1, max_rank: int = 3):
    return st.lists(dims, min_size=min_rank, max_size=max_rank).map(tuple)


def _rng(draw) -> np.random.Generator:
    return np.random.default_rng(draw(seeds))


# -- elementwise ---------------------------------------------------------------------

@st.composite
def _binary(draw, op):
    rng = _rng(draw)
    full = draw(shapes(1, 3))
    xs = []
    for _ in range(2):
        s = [1 if draw(st.integers(0, 3)) == 0 else d for d in full]   # broadcast some dims
        drop = draw(st.integers(0, len(s) - 1)) if draw(st.booleans()) else 0  # and leading dims
        xs.append(rand(rng, tuple(s[drop:]), draw(float_dtypes)))
    return op, xs, {}


@st.composite
def _unary(draw, op):
    rng = _rng(draw)
    return op, [rand(rng, draw(shapes(1, 3)), draw(float_dtypes), -4, 4)], {}


@st.composite
def _scale(draw):
    rng = _rng(draw)
    return "scale", [rand(rng, draw(shapes(1, 3)), draw(float_dtypes))], {"factor": draw(st.sampled_from([8.0, 0.3, -2.5]))}


@st.composite
def _softcap(draw):
    rng = _rng(draw)
    return "softcap", [rand(rng, draw(shapes(1, 3)), draw(float_dtypes), -20, 20)], \
        {"cap": draw(st.sampled_from([1.0, 5.0, 30.0]))}


@st.composite
def _cast(draw):
    rng = _rng(draw)
    src, dst = draw(st.sampled_from(ALL_DTYPES)), draw(st.sampled_from(ALL_DTYPES))
    x = rand(rng, draw(shapes(1, 3)), src, 0, 100)        # in range of every dtype
    return "cast", [x], {"dtype": dst}


# -- nn --------------------------------------------------------------------------------

@st.composite
def _embedding(draw):
    rng = _rng(draw)
    V, D, T = draw(dims), draw(dims), draw(dims)
    ids = rand(rng, (T,), draw(int_dtypes), 0, V)
    return "embedding", [ids, rand(rng, (V, D), draw(float_dtypes))], {"dtype": draw(float_dtypes)}


@st.composite
def _linear(draw, lead=shapes(0, 2), size=dims):
    rng = _rng(draw)
    lead, K, N = draw(lead), draw(size), draw(size)
    xs = [rand(rng, lead + (K,), draw(float_dtypes)), rand(rng, (N, K), draw(float_dtypes))]
    if draw(st.booleans()):
        xs.append(rand(rng, (N,), draw(float_dtypes)))
    return "linear", xs, {}


@st.composite
def _rms_norm(draw):
    rng = _rng(draw)
    s = draw(shapes(1, 3))
    eps = draw(st.sampled_from([1e-6, 1e-5, 0.1]))
    return "rms_norm", [rand(rng, s, draw(float_dtypes)), rand(rng, (s[-1],), draw(float_dtypes))], \
        {"eps": eps, **norm_offset(draw)}


def norm_offset(draw) -> dict:
    """No offset attribute, or Gemma's (the norm scales by 1 + w)."""
    return {"offset": 1.0} if draw(st.booleans()) else {}


def rope_attrs(draw, head_dim: int) -> dict:
    """theta, rotary_dim <= head_dim and one of the scalings, with small original contexts so
    that llama3's low/medium/high frequency bands all occur at small rotary dims."""
    a = {"theta": draw(st.sampled_from([10000.0, 500000.0, 100.0])),
         "rotary_dim": 2 * draw(st.integers(1, head_dim // 2))}
    kind = draw(st.sampled_from(["default", "linear", "llama3", "longrope", "yarn", None]))
    if kind == "longrope":
        half = a["rotary_dim"] // 2
        a.update(scaling="longrope", original_max_position=draw(st.sampled_from([4, 16])),
                 short_factor=tuple(draw(st.lists(st.sampled_from([1.0, 1.5, 3.0]), min_size=half, max_size=half))),
                 long_factor=tuple(draw(st.lists(st.sampled_from([1.0, 4.0, 20.0]), min_size=half, max_size=half))),
                 attention_factor=draw(st.sampled_from([1.0, 1.3])))
    elif kind == "linear":
        a.update(scaling="linear", factor=draw(st.sampled_from([2.0, 4.0, 0.5])))
    elif kind == "llama3":
        a.update(scaling="llama3", factor=draw(st.sampled_from([8.0, 32.0])),
                 low_freq_factor=1.0, high_freq_factor=draw(st.sampled_from([2.0, 4.0])),
                 original_max_position=draw(st.sampled_from([16, 256, 2048, 8192])))
    elif kind == "yarn":   # small original contexts put the ramp's ends inside small rotary dims
        a.update(scaling="yarn", factor=draw(st.sampled_from([4.0, 32.0])),
                 original_max_position=draw(st.sampled_from([64, 512, 4096])),
                 beta_fast=draw(st.sampled_from([32.0, 8.0])), beta_slow=1.0, truncate=draw(st.booleans()),
                 attention_factor=draw(st.sampled_from([1.0, 1.35])))
    elif kind == "default":
        a["scaling"] = "default"
    return a


def rope_inputs(draw, rng, pos, attrs) -> list:
    """positions, and for longrope each token's seq_extent (of the positions' dtype) on both sides
    of the original context."""
    if attrs.get("scaling") != "longrope":
        return [pos]
    return [pos, rand(rng, pos.shape, dtype_name(pos.dtype), 1, 2 * attrs["original_max_position"] + 1)]


@st.composite
def _rope(draw):
    rng = _rng(draw)
    T, H, D = draw(dims), draw(st.integers(1, 4)), draw(st.integers(2, 8))
    pos = rand(rng, (T,), draw(int_dtypes), 0, draw(st.sampled_from([8, 5000])))
    a = rope_attrs(draw, D)
    return "rope", [rand(rng, (T, H, D), draw(float_dtypes)), *rope_inputs(draw, rng, pos, a)], a


@st.composite
def _seq_extent(draw):
    _, sid, pos = draw(token_batch())
    return "seq_extent", list(_meta(draw, sid, pos)), {}


# -- views -----------------------------------------------------------------------------

def _factor(draw, n: int, max_parts: int = 3) -> tuple[int, ...]:
    """A random factorisation of n into at most max_parts dims."""
    out = []
    for _ in range(draw(st.integers(0, max_parts - 1))):
        d = draw(st.sampled_from([k for k in range(1, n + 1) if n % k == 0]))
        out.append(d)
        n //= d
    return tuple(out) + (n,)


@st.composite
def _reshape(draw):
    rng = _rng(draw)
    s = draw(shapes(1, 3))
    if draw(st.booleans()):   # keep the leading (token) dim
        target = (s[0],) + (_factor(draw, math.prod(s[1:])) if len(s) > 1 else ())
    else:
        target = _factor(draw, math.prod(s))
    return "reshape", [rand(rng, s, draw(float_dtypes))], {"shape": target}


@st.composite
def _transpose(draw):
    rng = _rng(draw)
    s = draw(shapes(1, 4))
    perm = tuple(draw(st.permutations(range(len(s)))))
    return "transpose", [rand(rng, s, draw(st.sampled_from(FLOATS + INTS)))], {"perm": perm}


def _composition(draw, n: int) -> tuple[int, ...]:
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=n - 1))) if n > 1 else []
    b = [0] + cuts + [n]
    return tuple(b[i + 1] - b[i] for i in range(len(b) - 1))


@st.composite
def _split(draw):
    rng = _rng(draw)
    s = draw(shapes(1, 3))
    axis = draw(st.integers(-len(s), len(s) - 1))
    return "split", [rand(rng, s, draw(float_dtypes))], {"axis": axis, "sizes": _composition(draw, s[axis])}


@st.composite
def _concat(draw):
    rng = _rng(draw)
    s = list(draw(shapes(1, 3)))
    axis = draw(st.integers(-len(s), len(s) - 1))
    dt = draw(st.sampled_from(FLOATS + INTS))
    xs = []
    for _ in range(draw(st.integers(1, 3))):
        s[axis] = draw(dims)
        xs.append(rand(rng, tuple(s), dt))
    return "concat", xs, {"axis": axis}


@st.composite
def _take_rows(draw):
    rng = _rng(draw)
    s = draw(shapes(1, 3))
    rows = rand(rng, (draw(dims),), draw(int_dtypes), 0, s[0])
    return "take_rows", [rand(rng, s, draw(st.sampled_from(FLOATS + INTS))), rows], {}


# -- attention -------------------------------------------------------------------------

@st.composite
def heads(draw):
    """(H, Hkv, D) with H a multiple of Hkv."""
    hkv = draw(st.integers(1, 3))
    return hkv * draw(st.integers(1, 3)), hkv, draw(st.integers(1, 8))


@st.composite
def token_batch(draw, max_seqs: int = 3, max_new: int = 4, max_past: int = 6):
    """A flattened batch of several sequences: list of (seq_id, past, new) and the row order.

    Sequence `seq_id` has `past` cached tokens and `new` tokens in this batch at positions
    past..past+new-1. Rows of different sequences are interleaved when `order` is shuffled.
    Returns (seqs, seq_ids[T], positions[T]) as int64 arrays.
    """
    n = draw(st.integers(1, max_seqs))
    ids = draw(st.permutations(range(n + draw(st.integers(0, 1)))))[:n]
    seqs = [(sid, draw(st.integers(0, max_past)), draw(st.integers(1, max_new))) for sid in ids]
    sid = np.concatenate([np.full(new, s) for s, _, new in seqs]).astype(np.int64)
    pos = np.concatenate([np.arange(past, past + new) for _, past, new in seqs]).astype(np.int64)
    if draw(st.booleans()):
        order = np.asarray(draw(st.permutations(range(len(sid)))), dtype=np.int64)
        sid, pos = sid[order], pos[order]
    return seqs, sid, pos


def page_layout(draw, seqs, page_size: int, int_dtype: str = "int32"):
    """A valid page table for the sequences (every position < past+new has a page), pages of
    all sequences drawn from one shuffled pool with spare pages. Returns (page_table, n_pages)."""
    lengths = {s: past + new for s, past, new in seqs}
    n_rows = max(lengths) + 1
    need = {s: -(-L // page_size) for s, L in lengths.items()}
    mp = max(need.values())
    n_pages = sum(need.values()) + draw(st.integers(0, 2))
    pool = list(draw(st.permutations(range(n_pages))))
    table = np.zeros((n_rows, mp), dtype=np_dtype(int_dtype))
    for s in sorted(need):
        for j in range(need[s]):
            table[s, j] = pool.pop()
    return table, n_pages


def fill_cache(kc, vc, k_hist, v_hist, seqs, table):
    """Write each sequence's positions 0..past+new-1 (k_hist[s] is [L, Hkv, D]) into the caches."""
    write = ops.get("kv_cache_write").ref
    for s, past, new in seqs:
        L = past + new
        pos = np.arange(L, dtype=np.int64)
        write([kc, vc, k_hist[s], v_hist[s], pos, np.full(L, s, dtype=np.int64), table], {})
    return kc, vc


def _meta(draw, sid, pos):
    dt = draw(int_dtypes)
    return pos.astype(np_dtype(dt)), sid.astype(np_dtype(draw(int_dtypes)))


def _attn_attrs(draw, D):
    scale = draw(st.sampled_from([1.0 / math.sqrt(D), 1.0, 0.3]))
    a = {"scale": scale}
    w = draw(st.integers(0, 5))
    if w or draw(st.booleans()):
        a["sliding_window"] = w
    if draw(st.booleans()):
        a["softcap"] = draw(st.sampled_from([0.5, 2.0, 50.0]))
    return a


@st.composite
def _causal_attention(draw):
    rng = _rng(draw)
    H, Hkv, D = draw(heads())
    _, sid, pos = draw(token_batch())
    T = len(sid)
    qdt, kdt = draw(float_dtypes), draw(float_dtypes)
    pos, sid = _meta(draw, sid, pos)
    xs = [rand(rng, (T, H, D), qdt), rand(rng, (T, Hkv, D), kdt), rand(rng, (T, Hkv, D), kdt), pos, sid]
    return "causal_attention", xs + sinks(draw, rng, H), _attn_attrs(draw, D)


def sinks(draw, rng, H: int) -> list:
    """No attention sinks, or a float32 logit per query head (GPT-OSS; plans keep them float32), from
    negligible to dominating the keys."""
    return [rand(rng, (H,), "float32", -4, 6)] if draw(st.booleans()) else []


def _paged_setup(draw, rng):
    H, Hkv, D = draw(heads())
    seqs, sid, pos = draw(token_batch())
    ps = draw(st.integers(1, 4))
    table, n_pages = page_layout(draw, seqs, ps, draw(int_dtypes))
    cdt = draw(float_dtypes)
    kc = rand(rng, (n_pages, ps, Hkv, D), cdt)
    vc = rand(rng, (n_pages, ps, Hkv, D), cdt)
    return H, Hkv, D, seqs, sid, pos, table, kc, vc


@st.composite
def _kv_cache_write(draw):
    rng = _rng(draw)
    H, Hkv, D, seqs, sid, pos, table, kc, vc = _paged_setup(draw, rng)
    T, kdt = len(sid), draw(float_dtypes)
    pos, sid = _meta(draw, sid, pos)
    return "kv_cache_write", [kc, vc, rand(rng, (T, Hkv, D), kdt), rand(rng, (T, Hkv, D), kdt), pos, sid, table], {}


@st.composite
def _paged_attention(draw):
    rng = _rng(draw)
    H, Hkv, D, seqs, sid, pos, table, kc, vc = _paged_setup(draw, rng)
    # every position a query may read (0..past+new-1 of its sequence) is written first
    hist = {s: past + new for s, past, new in seqs}
    kh = {s: rand(rng, (L, Hkv, D), "float32") for s, L in hist.items()}
    vh = {s: rand(rng, (L, Hkv, D), "float32") for s, L in hist.items()}
    fill_cache(kc, vc, kh, vh, seqs, table)
    pos, sid = _meta(draw, sid, pos)
    q = rand(rng, (len(sid), H, D), draw(float_dtypes))
    return "paged_attention", [q, kc, vc, pos, sid, table, *sinks(draw, rng, H)], _attn_attrs(draw, D)


# -- fused ops (made by the fusion passes) ---------------------------------------------

@st.composite
def _add_rms_norm(draw):
    rng = _rng(draw)
    s, dt = draw(shapes(1, 3)), draw(float_dtypes)
    eps = draw(st.sampled_from([1e-6, 1e-5, 0.1]))
    return "add_rms_norm", [rand(rng, s, dt), rand(rng, s, dt), rand(rng, (s[-1],), draw(float_dtypes))], \
        {"eps": eps, **norm_offset(draw)}


@st.composite
def _linear_glu(draw, tokens=dims):
    rng = _rng(draw)
    T, K, F = draw(tokens), draw(st.integers(1, 40)), draw(st.integers(1, 24))
    xs = [rand(rng, (T, K), draw(float_dtypes)), rand(rng, (2 * F, K), draw(float_dtypes))]
    if draw(st.booleans()):
        xs.append(rand(rng, (2 * F,), draw(float_dtypes)))
    return "linear_glu", xs, {"act": draw(st.sampled_from(["silu", "gelu_tanh"]))}


@st.composite
def _qkv_rope(draw, tokens=dims):
    rng = _rng(draw)
    T, K = draw(tokens), draw(st.integers(1, 40))
    Hkv = draw(st.integers(1, 3))
    H, D = Hkv * draw(st.integers(1, 3)), 2 * draw(st.integers(1, 6))
    dt = draw(float_dtypes)
    xs = [rand(rng, (T, K), dt), rand(rng, ((H + 2 * Hkv) * D, K), draw(float_dtypes))]
    bias, norm = draw(st.booleans()), draw(st.booleans())
    if bias:
        xs.append(rand(rng, ((H + 2 * Hkv) * D,), draw(float_dtypes)))
    ra = rope_attrs(draw, D)
    xs += rope_inputs(draw, rng, rand(rng, (T,), draw(int_dtypes), 0, draw(st.sampled_from([8, 5000]))), ra)
    if norm:
        xs += [rand(rng, (D,), draw(float_dtypes), 0.5, 1.5), rand(rng, (D,), draw(float_dtypes), 0.5, 1.5)]
    attrs = dict(ra, heads=H, kv_heads=Hkv, head_dim=D, bias=bias, qk_norm=norm,
                 eps=draw(st.sampled_from([1e-6, 1e-5])), **(norm_offset(draw) if norm else {}))
    return "qkv_rope", xs, attrs


# -- optimizer ---------------------------------------------------------------------------

@st.composite
def _grad_norm_sq(draw):
    rng = _rng(draw)
    return "grad_norm_sq", [rand(rng, draw(shapes(1, 3)), "float32") for _ in range(draw(st.integers(1, 4)))], {}


@st.composite
def _adamw_update(draw):
    rng = _rng(draw)
    s = draw(shapes(1, 3))
    xs = [rand(rng, s, "float32"), rand(rng, s, "float32"), rand(rng, s, "float32", -0.1, 0.1),
          rand(rng, s, "float32", 0, 0.01), np.array(draw(st.sampled_from([1e-4, 3e-3, 0.1])), np.float32),
          np.array(draw(st.integers(1, 1000)), np.int32)]
    max_norm = draw(st.sampled_from([0.0, 0.5, 100.0]))
    if max_norm:
        xs.append(np.array(float((xs[1].astype(np.float64) ** 2).sum()) * 3, np.float32))   # as if other grads added
    attrs = dict(beta1=draw(st.sampled_from([0.9, 0.8])), beta2=draw(st.sampled_from([0.999, 0.95])),
                 eps=draw(st.sampled_from([1e-8, 1e-6])), weight_decay=draw(st.sampled_from([0.0, 0.1])),
                 max_norm=max_norm)
    return "adamw_update", xs, attrs


OP_CASES: dict[str, st.SearchStrategy] = {
    "add_rms_norm": _add_rms_norm(),
    "linear_glu": _linear_glu(),
    "qkv_rope": _qkv_rope(),
    "add": _binary("add"),
    "mul": _binary("mul"),
    "silu": _unary("silu"),
    "gelu_tanh": _unary("gelu_tanh"),
    "scale": _scale(),
    "softcap": _softcap(),
    "softmax": _unary("softmax"),
    "cast": _cast(),
    "embedding": _embedding(),
    "linear": _linear(),
    "rms_norm": _rms_norm(),
    "rope": _rope(),
    "seq_extent": _seq_extent(),
    "reshape": _reshape(),
    "transpose": _transpose(),
    "split": _split(),
    "concat": _concat(),
    "take_rows": _take_rows(),
    "causal_attention": _causal_attention(),
    "kv_cache_write": _kv_cache_write(),
    "paged_attention": _paged_attention(),
    "grad_norm_sq": _grad_norm_sq(),
    "adamw_update": _adamw_update(),
}


def matmul_cases(tokens: st.SearchStrategy[int]) -> dict[str, st.SearchStrategy]:
    """linear / linear_glu / qkv_rope cases with `tokens` rows of x (K up to 40: whole and partial
    16-value chunks)."""
    return {"linear": _linear(tokens.map(lambda t: (t,)), st.integers(1, 40)),
            "linear_glu": _linear_glu(tokens), "qkv_rope": _qkv_rope(tokens)}


def op_cases(op: str | None = None) -> st.SearchStrategy:
    """(op_name, inputs, attrs) for `op`, or for any non-source registered op."""
    if op is not None:
        return OP_CASES[op]
    return st.sampled_from(sorted(OP_CASES)).flatmap(OP_CASES.__getitem__)


def input_types(xs) -> list[TensorType]:
    return [TensorType(tuple(int(d) for d in x.shape), dtype_name(x.dtype)) for x in xs]


# -- symbolic dims ---------------------------------------------------------------------

def _lead(n_inputs, name="T"):
    return lambda xs, a: [{0: name}] * n_inputs


def _broadcast_axes(xs, a):
    rank = max(x.ndim for x in xs)
    out0 = max(x.shape[0] for x in xs if x.ndim == rank)
    return [{0: "T"} if x.ndim == rank and x.shape[0] == out0 else {} for x in xs]


def _if_rank2(xs, a):
    return [{0: "T"} if xs[0].ndim >= 2 else {}] + [{}] * (len(xs) - 1)


def _off_axis(xs, a):
    return [{0: "T"} if a["axis"] % xs[0].ndim != 0 else {}] * len(xs)


def _reshape_axes(xs, a):
    keep = xs[0].ndim >= 1 and len(a["shape"]) >= 1 and a["shape"][0] == xs[0].shape[0]
    return [{0: "T"} if keep else {}]


_CACHE = {0: "NP"}
_TABLE = {0: "S", 1: "MP"}
_T = {0: "T"}
SYMBOLIC_AXES = {
    "add": _broadcast_axes, "mul": _broadcast_axes,
    "silu": _lead(1), "gelu_tanh": _lead(1), "softmax": _lead(1), "cast": _lead(1),
    "scale": _lead(1), "softcap": _lead(1), "seq_extent": _lead(2),
    "embedding": lambda xs, a: [_T, {}],
    "linear": _if_rank2, "rms_norm": _if_rank2,
    "rope": lambda xs, a: [_T] * len(xs),
    "reshape": _reshape_axes,
    "transpose": _lead(1),
    "split": _off_axis, "concat": _off_axis,
    "take_rows": lambda xs, a: [_T, {0: "R"}],
    "causal_attention": lambda xs, a: [_T] * 5 + [{}],
    "kv_cache_write": lambda xs, a: [_CACHE, _CACHE, _T, _T, _T, _T, _TABLE],
    "paged_attention": lambda xs, a: [_T, _CACHE, _CACHE, _T, _T, _TABLE, {}],
    "add_rms_norm": lambda xs, a: [{0: "T"} if xs[0].ndim >= 2 else {}] * 2 + [{}],
    "linear_glu": lambda xs, a: [_T] + [{}] * (len(xs) - 1),
    "qkv_rope": lambda xs, a: [_T, {}] + [{}] * a["bias"] + [_T] * (1 + (a.get("scaling") == "longrope"))
    + [{}] * (2 * a["qk_norm"]),
    "grad_norm_sq": lambda xs, a: [_T] + [{}] * (len(xs) - 1),
    "adamw_update": lambda xs, a: [_T] * 4 + [{}] * (len(xs) - 4),
}


def symbolize(op: str, xs, attrs: dict):
    """Input types of a case with its token dim (and pool/table/rows dims) symbolic.

    Returns (types, attrs, sizes): binding `sizes` in the types gives the concrete shapes.
    """
    axes = SYMBOLIC_AXES[op](xs, attrs)
    sizes: dict[str, int] = {}
    types = []
    for x, ax in zip(xs, axes):
        shape = list(int(d) for d in x.shape)
        for i, name in ax.items():
            assert sizes.setdefault(name, shape[i]) == shape[i], (op, name, sizes, x.shape)
            shape[i] = name
        types.append(TensorType(tuple(shape), dtype_name(x.dtype)))
    if op == "reshape" and axes[0]:
        attrs = {**attrs, "shape": ("T",) + tuple(attrs["shape"][1:])}
    return types, attrs, sizes


# -- random graphs ---------------------------------------------------------------------

_PROJ = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj")


@st.composite
def random_graphs(draw, max_steps: int = 10, attention: bool | None = None,
                  dtypes: tuple[str, ...] = ("float32",)):
    """(graph, weights, feeds): a small valid graph over inputs with symbolic dim T.

    Values flow through chains of add/mul/silu/gelu_tanh/rms_norm/softmax/linear/split/
    concat/reshape/cast; some steps repeat an earlier node exactly (work for CSE), some
    results reach no output (work for DCE), and `linear` groups read one input with
    several weights, biased, unbiased or mixed (work for projection fusion). With
    `attention` (None: sometimes) the graph takes `positions`/`seq_ids` and adds a
    causal_attention layer. Weights are float32 unless `dtypes` allows more.
    """
    b = GraphBuilder("forward")
    rng = _rng(draw)
    weights: dict[str, np.ndarray] = {}
    feeds: dict[str, np.ndarray] = {}
    T = draw(st.integers(1, 6))
    n_params = [0]

    def param(kind: str, shape, dtype="float32"):
        name = f"model.layers.{n_params[0]}.{kind}"
        n_params[0] += 1
        weights[name] = rand(rng, shape, dtype, -0.5, 0.5) if not kind.endswith("norm.weight") \
            else rand(rng, shape, dtype, 0.5, 1.5)
        return b.param(name, shape, dtype)

    D = draw(st.sampled_from([2, 4, 6, 8]))
    x = b.input("x", ("T", D), "float32")
    feeds["x"] = rand(rng, (T, D), "float32")
    pool = [x]
    if draw(st.booleans()):
        y = b.input("y", ("T", D), "float32")
        feeds["y"] = rand(rng, (T, D), "float32")
        pool.append(y)
    emitted: list[tuple] = []        # (op, inputs, attrs) already built, for duplicates

    def emit(op, *args, **attrs):
        emitted.append((op, args, attrs))
        return b.emit(op, *args, **attrs)

    def pick(pred=lambda v: True):
        cands = [v for v in pool if pred(v)]
        if not cands:
            return None
        if draw(st.booleans()):      # favour recent values so chains get deep
            return cands[-1 - draw(st.integers(0, min(len(cands), 3) - 1))]
        return cands[draw(st.integers(0, len(cands) - 1))]

    def rank2(v):
        return v.type.rank == 2

    for _ in range(draw(st.integers(1, max_steps))):
        step = draw(st.sampled_from(["unary", "binary", "bias", "rms_norm", "linear", "proj_group",
                                     "split_concat", "reshape", "cast", "duplicate"]))
        if step == "duplicate" and emitted:
            op, args, attrs = emitted[draw(st.integers(0, len(emitted) - 1))]
            out = emit(op, *args, **attrs)
            pool.extend(out if isinstance(out, list) else [out])
        elif step == "unary":
            pool.append(emit(draw(st.sampled_from(["silu", "gelu_tanh", "softmax"])), pick()))
        elif step == "binary":
            a = pick()
            others = [v for v in pool if v.type.shape == a.type.shape and v.type.dtype in FLOAT_DTYPES]
            pool.append(emit(draw(st.sampled_from(["add", "mul"])), a, others[draw(st.integers(0, len(others) - 1))]))
        elif step == "bias":
            a = pick()
            w = param("scale.weight", (a.type.shape[-1],), draw(st.sampled_from(dtypes)))
            pool.append(emit(draw(st.sampled_from(["add", "mul"])), a, w))
        elif step == "rms_norm":
            a = pick()
            w = param("input_layernorm.weight", (a.type.shape[-1],), draw(st.sampled_from(dtypes)))
            pool.append(emit("rms_norm", a, w, eps=draw(st.sampled_from([1e-6, 1e-5]))))
        elif step == "linear":
            a = pick()
            n = draw(st.sampled_from([2, 4, 6, 8]))
            args = [a, param("mlp.down_proj.weight", (n, a.type.shape[-1]), draw(st.sampled_from(dtypes)))]
            if draw(st.booleans()):
                args.append(param("mlp.down_proj.bias", (n,), draw(st.sampled_from(dtypes))))
            pool.append(emit("linear", *args))
        elif step == "proj_group":
            a = pick()
            bias = draw(st.sampled_from(["all", "none", "mixed"]))
            dt = draw(st.sampled_from(dtypes))
            layer = n_params[0]
            for j, proj in enumerate(draw(st.lists(st.sampled_from(_PROJ), min_size=2, max_size=4, unique=True))):
                n = draw(st.sampled_from([2, 4, 6]))
                name = f"model.layers.{layer}.self_attn.{proj}"
                w = b.param(f"{name}.weight", (n, a.type.shape[-1]), dt)
                weights[f"{name}.weight"] = rand(rng, (n, a.type.shape[-1]), dt, -0.5, 0.5)
                args = [a, w]
                if bias == "all" or (bias == "mixed" and j % 2 == 0):
                    args.append(b.param(f"{name}.bias", (n,), dt))
                    weights[f"{name}.bias"] = rand(rng, (n,), dt, -0.5, 0.5)
                pool.append(emit("linear", *args))
            n_params[0] += 1
        elif step == "split_concat":
            a = pick(lambda v: rank2(v) and v.type.shape[1] >= 2)
            if a is None:
                continue
            sizes = _composition(draw, a.type.shape[1])
            parts = emit("split", a, axis=draw(st.sampled_from([1, -1])), sizes=sizes)
            parts = parts if isinstance(parts, list) else [parts]
            pool.extend(parts)
            if draw(st.booleans()):
                order = draw(st.permutations(range(len(parts))))
                pool.append(emit("concat", *[parts[i] for i in order], axis=1))
        elif step == "reshape":
            a = pick(rank2)
            d = a.type.shape[1]
            f = draw(st.sampled_from([k for k in range(1, d + 1) if d % k == 0]))
            r = emit("reshape", a, shape=("T", f, d // f))
            if draw(st.booleans()):
                r = emit("softmax", r)
            pool.append(emit("reshape", r, shape=("T", d)))
        elif step == "cast":
            a = pick()
            mid = draw(st.sampled_from(["float16", "bfloat16", "float32"]))
            pool.append(emit("cast", emit("cast", a, dtype=mid), dtype=a.type.dtype))

    if attention or (attention is None and draw(st.booleans())):
        pool.append(_attention_layer(draw, b, rng, pick(rank2), weights, feeds, T, n_params[0]))
        n_params[0] += 1

    # outputs: the last value, plus maybe others; everything else is dead
    live = [pool[-1]] + draw(st.lists(st.sampled_from(pool), max_size=2))
    for i, v in enumerate(dict.fromkeys(live)):
        b.output(f"out{i}", v)
    if draw(st.booleans()):          # logits only for some rows (symbolic R)
        rows = b.input("rows", ("R",), "int32")
        R = draw(st.integers(1, 4))
        feeds["rows"] = rng.integers(0, T, size=R).astype(np.int32)
        b.output("rows_out", b.take_rows(pool[-1], rows))
    return b.graph, weights, feeds


def _attention_layer(draw, b: GraphBuilder, rng, x, weights, feeds, T, layer):
    """q/k/v projections of x, rope, causal GQA attention, o_proj; feeds positions/seq_ids."""
    H, Hkv, Dh = draw(heads().filter(lambda h: h[2] % 2 == 0))
    d = x.type.shape[1]
    pos = b.input("positions", ("T",), "int32")
    sid = b.input("seq_ids", ("T",), "int32")
    s, p = _fit_batch(draw, T)
    feeds["positions"], feeds["seq_ids"] = p.astype(np.int32), s.astype(np.int32)

    def w(name, shape):
        weights[name] = rand(rng, shape, "float32", -0.5, 0.5)
        return b.param(name, shape)

    pre = f"model.layers.{layer}.self_attn"
    q = b.reshape(b.linear(x, w(f"{pre}.q_proj.weight", (H * Dh, d))), shape=("T", H, Dh))
    k = b.reshape(b.linear(x, w(f"{pre}.k_proj.weight", (Hkv * Dh, d))), shape=("T", Hkv, Dh))
    v = b.reshape(b.linear(x, w(f"{pre}.v_proj.weight", (Hkv * Dh, d))), shape=("T", Hkv, Dh))
    ra = {"theta": 10000.0, "rotary_dim": Dh}
    q, k = b.rope(q, pos, **ra), b.rope(k, pos, **ra)
    win = draw(st.sampled_from([0, 0, 2]))
    o = b.causal_attention(q, k, v, pos, sid, scale=1.0 / math.sqrt(Dh), sliding_window=win)
    return b.linear(b.reshape(o, shape=("T", H * Dh)), w(f"{pre}.o_proj.weight", (d, H * Dh)))


def _fit_batch(draw, T: int):
    """seq_ids, positions for T rows split into 1..3 sequences starting at position 0."""
    cuts = sorted(draw(st.sets(st.integers(1, T - 1), max_size=min(2, T - 1)))) if T > 1 else []
    bounds = [0] + cuts + [T]
    sid = np.concatenate([np.full(bounds[i + 1] - bounds[i], i) for i in range(len(bounds) - 1)])
    pos = np.concatenate([np.arange(bounds[i + 1] - bounds[i]) for i in range(len(bounds) - 1)])
    return sid.astype(np.int64), pos.astype(np.int64)


__all__ = ["OP_CASES", "op_cases", "symbolize", "input_types", "random_graphs", "token_batch",
           "page_layout", "fill_cache", "heads", "rand", "rope_attrs"]

# -- backward and loss ops: their cases live in tests/strategies_grad.py, merged into the tables above
from strategies_grad import AWAITING_CPU_KERNELS, GRAD_OP_CASES, GRAD_SYMBOLIC_AXES  # noqa: E402

OP_CASES.update(GRAD_OP_CASES)
SYMBOLIC_AXES.update(GRAD_SYMBOLIC_AXES)
__all__ += ["AWAITING_CPU_KERNELS"]

# -- mixture-of-experts ops: their cases live in tests/strategies_moe.py
from strategies_moe import MOE_OP_CASES, MOE_SYMBOLIC_AXES  # noqa: E402

OP_CASES.update(MOE_OP_CASES)
SYMBOLIC_AXES.update(MOE_SYMBOLIC_AXES)

# -- multi-head latent attention ops and DeepSeek-V3's grouped router (its correction bias is a second
#    input): their cases live in tests/strategies_mla.py
from strategies_mla import GROUPED_ROUTER, MLA_OP_CASES, MLA_SYMBOLIC_AXES, head_linear_cases  # noqa: E402

OP_CASES.update(MLA_OP_CASES)
SYMBOLIC_AXES.update(MLA_SYMBOLIC_AXES)
OP_CASES["moe_router"] = st.one_of(MOE_OP_CASES["moe_router"], GROUPED_ROUTER)
SYMBOLIC_AXES["moe_router"] = lambda xs, a: [{0: "T"}] + [{}] * (len(xs) - 1)
__all__ += ["head_linear_cases"]


# -- multi-adapter LoRA (reft/ir/ops/lora.py): N past one 256-column block, rows of the base model (-1)
@st.composite
def _lora_add(draw):
    rng = _rng(draw)
    T, K, N = draw(st.integers(1, 6)), draw(st.integers(1, 40)), draw(st.sampled_from([1, 7, 16, 33, 300]))
    S, R = draw(st.integers(1, 3)), draw(st.integers(1, 8))
    xs = [rand(rng, (T, N), "float32"), rand(rng, (T, K), "float32"), rand(rng, (S, R, K), "float32"),
          rand(rng, (S, R, N), "float32"), rng.integers(-1, S, T).astype(np.int32)]
    return "lora_add", xs, {}


OP_CASES["lora_add"] = _lora_add()
SYMBOLIC_AXES["lora_add"] = lambda xs, a: [{0: "T"}, {0: "T"}, {}, {}, {0: "T"}]
