"""Neural-network ops: embedding, linear, RMSNorm, softmax, rotary embedding (and seq_extent, which
longrope reads)."""
from __future__ import annotations

import math

import numpy as np

from ..types import FLOAT_DTYPES, TensorType, np_dtype
from ..quantized import QTensor, quantize_activations
from .autodiff import f32 as to_f32
from .autodiff import linear_grads
from .registry import CONTRACTION, REDUCTION, check, f32, is_float, is_weight, op


# -- embedding(ids[T], table[V, D]) -> [T, D] in `dtype`
def _embedding_infer(ts, a):
    ids, table = ts
    check(ids.dtype in ("int32", "int64") and ids.rank == 1, f"embedding: ids must be int[T], got {ids}")
    check(table.rank == 2 and is_weight(table), f"embedding: table must be float[V, D] or quantized, got {table}")
    check(a["dtype"] in FLOAT_DTYPES, f"embedding: dtype must be a float type, got {a['dtype']}")
    return [TensorType((ids.shape[0], table.shape[1]), a["dtype"])]


def _embedding_ref(xs, a):
    ids, table = xs
    if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
        raise IndexError(f"embedding: token id out of range [0, {table.shape[0]})")
    rows = table.take(ids) if isinstance(table, QTensor) else f32(table[ids])
    return [rows.astype(np_dtype(a["dtype"]))]


def _embedding_vjp(b, node, cts, wants):
    ids, table = node.inputs
    if table.type.quantized:
        raise TypeError(f"embedding: cannot differentiate with respect to a quantized table {table.type}")
    g = cts[0] if cts[0].dtype == table.dtype else b.cast(cts[0], dtype=table.dtype)
    return [None, b.scatter_rows(b.zeros_like(table), ids, g)]     # rows of the table, summed per id


op("embedding", quantized_input=1, infer=_embedding_infer, ref=_embedding_ref, vjp=_embedding_vjp, arity=2,
   attrs=("dtype",),
   doc="Gather rows of a [V, D] table; the result is converted to `dtype`.")


# -- linear(x[..., K], w[N, K], b[N]?) -> [..., N] in x's dtype (weights stay in checkpoint layout)
def _linear_infer(ts, a):
    x, w = ts[0], ts[1]
    check(is_float(x) and is_weight(w), f"linear: float inputs required, got {x.dtype}, {w.dtype}")
    check(w.rank == 2 and x.rank >= 1, f"linear: weight must be [N, K], got {w}")
    check(x.shape[-1] == w.shape[1], f"linear: x {x} and weight {w} disagree on K")
    if len(ts) == 3:
        check(ts[2].shape == (w.shape[0],) and is_float(ts[2]), f"linear: bias must be [{w.shape[0]}], got {ts[2]}")
    return [TensorType(x.shape[:-1] + (w.shape[0],), x.dtype)]


def _linear_ref(xs, a):
    x, w = xs[0], xs[1]
    xf = f32(x)
    if isinstance(w, QTensor) and w.int16_activations:
        xf = quantize_activations(xf)
    y = xf @ f32(w).T
    if len(xs) == 3:
        y = y + f32(xs[2])
    return [y.astype(x.dtype)]


def _linear_vjp(b, node, cts, wants):
    x, w = node.inputs[:2]
    bias = node.inputs[2] if len(node.inputs) == 3 else None
    return linear_grads(b, to_f32(b, cts[0]), x, w, bias, wants)


op("linear", quantized_input=1, infer=_linear_infer, ref=_linear_ref, vjp=_linear_vjp, arity=(2, 3),
   traits={CONTRACTION},
   doc="x @ w.T (+ b); w is [out, in] as Hugging Face stores it.")


# -- rms_norm(x[..., D], w[D]) over the last axis
def _rms_norm_infer(ts, a):
    x, w = ts
    check(is_float(x) and is_float(w) and x.rank >= 1, f"rms_norm: float x of rank >= 1 and float weight required, got {x}, {w}")
    check(w.shape == (x.shape[-1],), f"rms_norm: weight {w} does not match x {x}")
    return [x]


def norm_scale(w, offset) -> np.ndarray:
    """The RMSNorm scale in float32: w, or offset + w for checkpoints that store the scale's offset
    from a constant (Gemma: 1 + w, added in float32 as transformers does)."""
    w = f32(w)
    return w + np.float32(offset) if offset else w


def _rms_norm_ref(xs, a):
    x, w = f32(xs[0]), norm_scale(xs[1], a.get("offset", 0.0))
    inv = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(a["eps"]))
    return [(x * inv.astype(np.float32) * w).astype(xs[0].dtype)]


def rms_norm_vjp(b, g, x, w, eps, wants, offset=0.0):
    """[dx, dw] of rms_norm(x, w) given g = dL/dy, in x's and w's dtypes."""
    dx, dw = b.rms_norm_grad(to_f32(b, g), to_f32(b, x), w, eps=eps, **({"offset": offset} if offset else {}))
    return [(dx if x.dtype == "float32" else b.cast(dx, dtype=x.dtype)) if wants[0] else None,
            (dw if w.dtype == "float32" else b.cast(dw, dtype=w.dtype)) if wants[1] else None]


op("rms_norm", infer=_rms_norm_infer, ref=_rms_norm_ref, arity=2, traits={REDUCTION}, attrs=("eps",),
   defaults={"offset": 0.0},
   vjp=lambda b, node, cts, wants: rms_norm_vjp(b, cts[0], *node.inputs, node.attrs["eps"], wants,
                                                node.attrs.get("offset", 0.0)),
   doc="x / sqrt(mean(x^2) + eps) * (offset + w) over the last axis.")


# -- softmax over the last axis
def _softmax_ref(xs, a):
    x = f32(xs[0])
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return [(e / e.sum(axis=-1, keepdims=True)).astype(xs[0].dtype)]


def _softmax_vjp(b, node, cts, wants):
    x = node.inputs[0]
    g = b.softmax_grad(to_f32(b, cts[0]), to_f32(b, node.out))
    return [g if x.dtype == "float32" else b.cast(g, dtype=x.dtype)]


op("softmax", infer=lambda ts, a: (check(is_float(ts[0]), "softmax: float input required"), [ts[0]])[1],
   ref=_softmax_ref, vjp=_softmax_vjp, arity=1, traits={REDUCTION}, doc="Softmax over the last axis.")


# -- rope(x[T, H, D], positions[T][, extent[T]]) rotary embedding, "rotate half" layout (Hugging Face)
ROPE_TYPES = ("default", "linear", "llama3", "longrope", "yarn")
ROPE_DEFAULTS = {"scaling": "default", "factor": 1.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position": 8192, "short_factor": (), "long_factor": (), "attention_factor": 1.0,
                 "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True}
SCALED_COS_SIN = ("longrope", "yarn")     # scalings whose cos and sin are multiplied by attention_factor


def yarn_ramp(a: dict) -> np.ndarray:
    """YaRN's blend per frequency, float32[rotary_dim // 2]: 0 keeps the original frequency
    (extrapolation, fast dims), 1 takes it divided by `factor` (interpolation, slow dims), linear
    between the dims where `beta_fast` and `beta_slow` rotations fit in the original context
    (floored / ceiled when `truncate`), as transformers' _compute_yarn_parameters."""
    dim, base, old = a["rotary_dim"], a["theta"], a["original_max_position"]

    def dim_of(rotations):
        return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(a["beta_fast"]), dim_of(a["beta_slow"])
    if a["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001   # as transformers: no division by zero
    return np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)


def rope_inv_freq(a: dict, long: bool = False) -> np.ndarray:
    """Inverse frequencies for the rotary dims, after rope scaling (longrope: with the short
    factors, or the long ones when `long`). Shape [rotary_dim // 2]."""
    dim = a["rotary_dim"]
    base = a["theta"] ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)
    kind = a["scaling"]
    if kind == "longrope":    # transformers: 1 / (ext_factors * base ** (i / dim)), float32
        ext = np.asarray(a["long_factor"] if long else a["short_factor"], np.float32)
        return (1.0 / (ext * base)).astype(np.float32)
    if kind == "yarn":        # float32 throughout, in transformers' order of operations
        extrapolate = np.float32(1) - yarn_ramp(a)
        inv_inter = np.float32(1) / (np.float32(a["factor"]) * base)
        return (inv_inter * (np.float32(1) - extrapolate) + (np.float32(1) / base) * extrapolate).astype(np.float32)
    inv = 1.0 / base
    if kind == "linear":
        inv = inv / a["factor"]
    elif kind == "llama3":
        factor, lo, hi, old = a["factor"], a["low_freq_factor"], a["high_freq_factor"], a["original_max_position"]
        lo_wavelen, hi_wavelen = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > lo_wavelen, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        mid = ~(wavelen < hi_wavelen) & ~(wavelen > lo_wavelen)
        inv = np.where(mid, smoothed, scaled)
    return inv.astype(np.float32)


def _rope_infer(ts, a):
    x, pos = ts[:2]
    check(is_float(x) and x.rank == 3, f"rope: x must be float[T, H, D], got {x}")
    check(pos.dtype in ("int32", "int64") and pos.shape == (x.shape[0],), f"rope: positions must be int[{x.shape[0]}], got {pos}")
    check(a["scaling"] in ROPE_TYPES, f"rope: scaling must be one of {ROPE_TYPES}, got {a['scaling']!r}")
    d = x.shape[2]
    check(isinstance(d, int) and a["rotary_dim"] % 2 == 0 and 0 < a["rotary_dim"] <= d,
          f"rope: rotary_dim {a['rotary_dim']} does not fit head dim {d}")
    longrope = a["scaling"] == "longrope"
    check(len(ts) == 2 + longrope, f"rope: {'longrope takes' if longrope else 'takes'} {2 + longrope} inputs"
          f" (x, positions{', extent' if longrope else ''}), got {len(ts)}")
    if a["scaling"] == "yarn":
        check(a["factor"] > 0 and a["original_max_position"] > 0 and a["beta_fast"] > 0 and a["beta_slow"] > 0,
              f"rope: yarn needs a positive factor, original context and betas, got {a['factor']!r}, "
              f"{a['original_max_position']!r}, {a['beta_fast']!r}, {a['beta_slow']!r}")
    if longrope:
        check(ts[2] == pos, f"rope: extent must be {pos} like positions, got {ts[2]}")
        half = a["rotary_dim"] // 2
        check(len(a["short_factor"]) == half and len(a["long_factor"]) == half,
              f"rope: longrope needs {half} short and long factors, got"
              f" {len(a['short_factor'])}, {len(a['long_factor'])}")
    return [x]


def rope_rotate(x, pos, a: dict, sign: float = 1.0, extent=None) -> np.ndarray:
    """Rotate each pair (j, j + r/2) of the first r = rotary_dim dims by sign * angle (x: (T, H, D));
    sign -1 is the inverse rotation (rope_grad). longrope: a token whose sequence reaches past
    original_max_position in this batch (extent[t] > it) takes the long factors; longrope and yarn
    scale cos/sin by attention_factor, as transformers computes them."""
    x = f32(x)
    r = a["rotary_dim"]
    inv = rope_inv_freq(a)[None, :]                                            # (1, r/2)
    if a["scaling"] == "longrope":
        inv = np.where((extent > a["original_max_position"])[:, None], rope_inv_freq(a, long=True)[None, :], inv)
    freqs = pos.astype(np.float32)[:, None] * inv                              # (T, r/2)
    emb = np.concatenate([freqs, freqs], axis=-1)                              # (T, r)
    cos, sin = np.cos(emb)[:, None, :], np.float32(sign) * np.sin(emb)[:, None, :]   # (T, 1, r)
    if a["scaling"] in SCALED_COS_SIN:
        m = np.float32(a["attention_factor"])
        cos, sin = cos * m, sin * m
    xr = x[..., :r]
    rot = np.concatenate([-xr[..., r // 2:], xr[..., : r // 2]], axis=-1)
    out = x.copy()
    out[..., :r] = xr * cos + rot * sin
    return out


def _rope_ref(xs, a):
    return [rope_rotate(xs[0], xs[1], a, extent=xs[2] if len(xs) == 3 else None).astype(xs[0].dtype)]


def _rope_vjp(b, node, cts, wants):
    x = node.inputs[0]
    g = b.rope_grad(to_f32(b, cts[0]), *node.inputs[1:], **node.attrs)
    return [g if x.dtype == "float32" else b.cast(g, dtype=x.dtype)] + [None] * (len(node.inputs) - 1)


op("rope", infer=_rope_infer, ref=_rope_ref, vjp=_rope_vjp, arity=(2, 3),
   attrs=("theta", "rotary_dim"), defaults=ROPE_DEFAULTS,
   doc="Rotary position embedding on the first rotary_dim dims of each head (rotate-half layout); "
       "longrope (Phi-3) takes each token's seq_extent as a third input; yarn (GPT-OSS) blends scaled and "
       "original frequencies.")


# -- seq_extent(positions[T], seq_ids[T]) -> [T]
def _seq_extent_infer(ts, a):
    pos, sid = ts
    check(pos.dtype in ("int32", "int64") and pos.rank == 1, f"seq_extent: positions must be int[T], got {pos}")
    check(sid.dtype in ("int32", "int64") and sid.shape == pos.shape, f"seq_extent: seq_ids must be int[T], got {sid}")
    return [pos]


def _seq_extent_ref(xs, a):
    pos, sid = xs
    out = np.zeros_like(pos)
    for s in np.unique(sid):
        rows = sid == s
        out[rows] = pos[rows].max() + 1
    return [out]


op("seq_extent", infer=_seq_extent_infer, ref=_seq_extent_ref, arity=2,
   vjp=lambda b, node, cts, wants: [None, None],
   doc="For each token, 1 + the largest position of its sequence in this batch (transformers' "
       "seq_len = max(position_ids) + 1 of one forward call): what longrope picks its factors by.")
